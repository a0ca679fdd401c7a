"""Backpropagation through time, the reference every other method is measured against."""

from __future__ import annotations

import torch

from .base import Method, hidden_states


class BPTT(Method):
    """Backpropagation through time through ``torch.nn.RNN`` (cuDNN on GPU).

    Args:
        clip: if given, clip the global gradient norm of all parameters to this value.
        truncation: if given, truncated BPTT: the state is detached every ``truncation`` steps.
    """

    config_defaults = {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "clip": 1.0}
    search_space = ("lr=1e-4:1", "clip=1e-2:1e2")

    def __init__(self, *, clip: float | None = None, truncation: int | None = None):
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if truncation is not None and truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        self.clip, self.truncation = clip, truncation

    def backward(self, model, x, loss_fn):
        loss = loss_fn(hidden_states(model, x, truncation=self.truncation))
        loss.backward()
        stats = {}
        if self.clip is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        return loss.detach(), stats
