"""Copying memory task (Arjovsky, Shah & Bengio 2016, "Unitary Evolution Recurrent Neural Networks", sec. 4.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_device, check_int, validation_generator
from .base import Task

N_SYMBOLS = 8  # symbols are the categories 1..8
N_RECALL = 10  # symbols to remember
DELIMITER = N_SYMBOLS + 1  # input category 9; category 0 is the blank


class Copying(Task):
    """Remember 10 symbols over a delay of ``T`` steps, then reproduce them.

    With ``T`` = the ``seq_len`` option (the delay), a sequence has ``T + 20`` steps: 10 symbols drawn uniformly from 8,
    ``T - 1`` blanks, a delimiter, then 10 blanks. The target is ``T + 10`` blanks followed by the 10 symbols.

    Shapes: ``x`` float one-hot ``[B, T + 20, 10]`` (blank 0, symbols 1..8, delimiter 9); ``y`` long ``[B, T + 20]``
    over 9 classes (blank 0, symbols 1..8); outputs ``[B, T + 20, 9]``. The attribute ``seq_len`` is ``T + 20`` and
    ``delay`` is ``T``.

    The loss is the cross-entropy averaged over all steps and the batch. The memoryless baseline predicts blank for the
    first ``T + 10`` steps and a uniform symbol for the last 10: ``10 log(8) / (T + 20)``. ``metrics`` reports the
    accuracy over the 10 recall steps only, since blanks dominate the other steps; a constant guess scores
    ``chance_accuracy = 1/8`` there.
    """

    name = "copying"
    kind = "classification"
    readout = "all"
    input_size = DELIMITER + 1
    output_size = N_SYMBOLS + 1

    def __init__(self, *, seq_len: int, device: torch.device | str, seed: int, val_size: int = 1000) -> None:
        self.delay = check_int("seq_len", seq_len, 1)
        check_int("seed", seed, 0)
        check_int("val_size", val_size, 1)
        self.device = check_device(device)
        self.seq_len = self.delay + 2 * N_RECALL
        self.baseline = N_RECALL * math.log(N_SYMBOLS) / self.seq_len
        self.chance_accuracy = 1 / N_SYMBOLS  # a fixed symbol at every recall step
        self._val = self.sample(val_size, generator=validation_generator(self.device, seed))

    def sample(self, batch_size: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        symbols = torch.randint(1, N_SYMBOLS + 1, (batch_size, N_RECALL), generator=generator, device=device)  # [B, 10]
        tokens = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)  # [B, T + 20]
        tokens[:, :N_RECALL] = symbols
        tokens[:, self.delay + N_RECALL - 1] = DELIMITER
        y = torch.zeros_like(tokens)  # [B, T + 20]
        y[:, -N_RECALL:] = symbols
        x = F.one_hot(tokens, self.input_size).float()  # [B, T + 20, 10]
        return x, y

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._val

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), y.flatten())  # [B * (T + 20), 9] against [B * (T + 20)]

    def metrics(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        pred = outputs[:, -N_RECALL:].argmax(dim=-1)  # [B, 10]
        return {"accuracy": (pred == y[:, -N_RECALL:]).double().mean().item()}
