"""The Elman RNN with a linear readout (``torch.nn.RNN`` layout, cuDNN forward on GPU)."""

from __future__ import annotations

import torch
from torch import nn

from ._cells import check_nonlinearity, elman_forward


class RNNModel(nn.Module):
    """A single-layer Elman RNN ``h_t = phi(W h_{t-1} + U x_t + b)``, ``h_0 = 0``, with a linear readout.

    ``self.rnn`` is a genuine ``torch.nn.RNN`` (``batch_first=True``), so its ``state_dict`` (``weight_ih_l0``,
    ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``) is interchangeable with a plain ``torch.nn.RNN``'s:
    ``model.rnn.load_state_dict(plain.state_dict())`` and back. ``phi = identity`` (which ``torch.nn.RNN`` lacks)
    keeps that layout and runs the reference loop of :func:`seqtp._cells.elman_forward`.

    Args:
        input_size, hidden_size, output_size: ``D``, ``H`` and ``C``.
        nonlinearity: ``"tanh"`` (default), ``"relu"`` or ``"identity"``.
        readout: ``"last"`` (one output per sequence, from ``h_T``) or ``"all"`` (one output per step).
        init: ``"orthogonal"`` (default: ``W`` orthogonal as in the paper's code, ``U`` and biases as in
            ``torch.nn.RNN``) or ``"default"`` (``torch.nn.RNN``'s uniform init).

    Shapes: ``forward(x)`` with ``x`` ``[B, T, D]`` returns ``(outputs, states)``, ``outputs`` ``[B, C]`` or
    ``[B, T, C]``, ``states`` ``[B, T, H]``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        nonlinearity: str = "tanh",
        readout: str = "last",
        init: str = "orthogonal",
    ):
        super().__init__()
        self.nonlinearity = check_nonlinearity(nonlinearity)
        if readout not in ("last", "all"):
            raise ValueError(f"readout must be 'last' or 'all', got {readout!r}")
        if init not in ("orthogonal", "default"):
            raise ValueError(f"init must be 'orthogonal' or 'default', got {init!r}")
        self.readout_mode = readout
        cudnn_nl = "relu" if nonlinearity == "relu" else "tanh"
        self.rnn = nn.RNN(input_size, hidden_size, nonlinearity=cudnn_nl, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)
        if init == "orthogonal":
            nn.init.orthogonal_(self.rnn.weight_hh_l0)

    def states(self, x: torch.Tensor, *, truncation: int | None = None) -> torch.Tensor:
        """The states ``h_1 .. h_T`` ``[B, T, H]`` for inputs ``x`` ``[B, T, D]``.

        Args:
            truncation: if given, the state is detached every ``truncation`` steps (truncated BPTT: gradients flow
                back at most ``truncation`` steps).
        """
        seq_len = x.shape[1]
        chunk = seq_len if truncation is None else truncation
        h, out = None, []
        for start in range(0, seq_len, chunk):
            xs = x[:, start : start + chunk]  # [B, chunk, D]
            if self.nonlinearity == "identity":
                r = self.rnn
                bias = r.bias_ih_l0 + r.bias_hh_l0
                hs = elman_forward(xs, r.weight_ih_l0, r.weight_hh_l0, bias, "identity", None if h is None else h[0])
            else:
                hs, _ = self.rnn(xs, h)  # [B, chunk, H]
            out.append(hs)
            h = hs[:, -1].detach().unsqueeze(0)  # [1, B, H]: the next chunk starts from a detached state
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [B, T, H]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """Readout outputs from states ``[B, T, H]``: ``[B, C]`` (``readout="last"``) or ``[B, T, C]``."""
        return self.readout(states[:, -1] if self.readout_mode == "last" else states)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.states(x)
        return self.read(states), states
