"""The task contract: a pure batch generator plus its loss, metric and memoryless baseline.

A task never imports the CLI, the config module or the training loop: it is built from plain keyword arguments and
draws every random number from a ``torch.Generator`` it is given, on the device it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch


class Task(ABC):
    """A sequence task.

    Shapes (``batch`` = B, ``seq_len`` = T, ``input_size`` = D, ``output_size`` = C):

    - ``sample(batch_size, generator=g)`` returns ``(x, y)``:
      ``x`` is float ``[B, T, D]`` on ``generator.device``;
      ``y`` is ``[B]`` long (``kind == "classification"`` with ``readout == "last"``),
      ``[B, T]`` long (classification with ``readout == "all"``), or ``[B, C]`` float (regression).
    - ``loss(outputs, y)``: ``outputs`` are the readout's outputs, ``[B, C]`` for ``readout == "last"`` or
      ``[B, T, C]`` for ``readout == "all"``; returns a scalar, the **mean over the batch** of the per-sample loss
      (for per-step losses, the per-sample loss is the mean over steps).
    - ``metrics(outputs, y)``: a dict of floats (``{"accuracy": ...}`` for classification; may be empty).
    - ``baseline``: the loss of the best memoryless predictor (``None`` where not meaningful).
    - ``chance_accuracy``: the accuracy (as ``metrics`` measures it) of the best constant guess, which ignores the
      input (``None`` for regression).
    - ``validation_set()``: a fixed ``(x, y)`` used for every evaluation (same for every method and seed of the
      training run), built deterministically at construction.

    Attributes:
        name: the registry name.
        kind: ``"classification"`` or ``"regression"``.
        readout: ``"last"`` (one output per sequence) or ``"all"`` (one output per step).
        seq_len, input_size, output_size: the dimensions above.
        note: a one-line remark that every output of a run must carry (e.g. "MNIST: 10k test-split subset").
    """

    name: str
    kind: Literal["classification", "regression"]
    readout: Literal["last", "all"]
    seq_len: int
    input_size: int
    output_size: int
    baseline: float | None = None
    chance_accuracy: float | None = None
    note: str = ""

    @abstractmethod
    def sample(self, batch_size: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a training batch ``(x, y)`` on ``generator.device`` (shapes in the class docstring)."""

    @abstractmethod
    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed validation set ``(x, y)``."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar batch-mean loss of the readout ``outputs`` against ``y``."""

    def metrics(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Evaluation metrics beyond the loss; accuracy for classification tasks."""
        if self.kind != "classification":
            return {}
        pred = outputs.argmax(dim=-1)  # [B] or [B, T]
        return {"accuracy": (pred == y).double().mean().item()}
