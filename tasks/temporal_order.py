"""Temporal order problem (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory", experiments 6a and 6b; as used by
Manchev & Spratling 2020, "Target Propagation in Recurrent Neural Networks", JMLR)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_device, check_int, validation_generator
from .base import Task

# Alphabet (one-hot of size 8): distractors a, b, c, d = 0..3, relevant symbols X = 4 and Y = 5, start marker B = 6,
# end marker E = 7.
N_DISTRACTORS = 4
X_SYMBOL = 4
START = 6
END = 7
ALPHABET = 8

# Windows of the relevant positions, in tenths of T, both ends included: step t_i is uniform in
# [T * lo // 10, T * hi // 10]. The original uses lengths 100..110 with t1 in [10, 20], t2 in [50, 60] (6a) and
# t1 in [10, 20], t2 in [33, 43], t3 in [66, 76] (6b); these windows scale that to any T >= 10 (6b rounded to tenths).
WINDOWS = {1: ((1, 2), (5, 6)), 3: ((1, 2), (3, 4), (6, 7))}


class TemporalOrder(Task):
    """Classify the order in which X and Y appear at a few relevant steps amid distractors.

    A sequence of ``T`` steps starts with B, ends with E, and holds X or Y (uniformly) at 2 relevant steps (``bits=1``,
    experiment 6a, 4 classes) or 3 (``bits=3``, experiment 6b, 8 classes), and uniform distractors a..d elsewhere.
    The relevant steps are drawn in ``WINDOWS`` (all disjoint for ``T >= 10``). The class is the binary code of the
    X/Y sequence with X = 0, Y = 1 and the first relevant step as the most significant bit (XX, XY, YX, YY = 0..3,
    the original's classes Q, R, S, U).

    Shapes: ``x`` float one-hot ``[B, T, 8]``; ``y`` long ``[B]``; outputs ``[B, 4]`` or ``[B, 8]``. The loss is the
    cross-entropy; the memoryless baseline is a uniform guess, ``log(n_classes)``; a constant guess is right with
    probability ``chance_accuracy = 1 / n_classes``.
    """

    name = "temporal_order"
    kind = "classification"
    readout = "last"
    input_size = ALPHABET

    def __init__(
        self, *, seq_len: int, device: torch.device | str, seed: int, val_size: int = 1000, bits: int = 1
    ) -> None:
        if bits not in WINDOWS:
            raise ValueError(f"task.bits must be 1 or 3, got {bits!r}")
        self.seq_len = check_int("seq_len", seq_len, 10)
        check_int("seed", seed, 0)
        check_int("val_size", val_size, 1)
        self.device = check_device(device)
        self.bits = bits
        self.output_size = 2 ** len(WINDOWS[bits])
        self.baseline = math.log(self.output_size)
        self.chance_accuracy = 1 / self.output_size  # the classes are equally likely
        self._windows = [(seq_len * lo // 10, seq_len * hi // 10 + 1) for lo, hi in WINDOWS[bits]]  # half-open
        self._val = self.sample(val_size, generator=validation_generator(self.device, seed))

    def sample(self, batch_size: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        n = len(self._windows)
        tokens = torch.randint(N_DISTRACTORS, (batch_size, self.seq_len), generator=generator, device=device)  # [B, T]
        tokens[:, 0] = START
        tokens[:, -1] = END
        relevant = torch.randint(2, (batch_size, n), generator=generator, device=device)  # [B, n]; 0 = X, 1 = Y
        positions = torch.stack(
            [
                lo + torch.randint(hi - lo, (batch_size,), generator=generator, device=device)
                for lo, hi in self._windows
            ],
            1,
        )  # [B, n]
        tokens.scatter_(1, positions, X_SYMBOL + relevant)
        weights = 2 ** torch.arange(n - 1, -1, -1, device=device)  # [n]; the first relevant step is the top bit
        y = (relevant * weights).sum(dim=1)  # [B]
        x = F.one_hot(tokens, ALPHABET).float()  # [B, T, 8]
        return x, y

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._val

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, y)  # [B, C] against [B]
