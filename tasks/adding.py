"""Adding problem (Hochreiter & Schmidhuber 1997; in the form of Le, Jaitly & Hinton 2015, "A Simple Way to
Initialize Recurrent Networks of Rectified Linear Units", sec. 4.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_device, check_int, validation_generator
from .base import Task

VARIANTS = ("le2015", "paper")
UNIFORM_VARIANCE = 1 / 12  # variance of U[0, 1)


class Adding(Task):
    """Add (or average) the two marked values of a sequence of uniform numbers.

    Shapes: ``x`` float ``[B, T, 2]``: channel 0 is uniform in ``[0, 1)``, channel 1 is 1 at the two marked steps and
    0 elsewhere; ``y`` float ``[B, 1]``; outputs ``[B, 1]``. The loss is the mean squared error.

    Variants (option ``variant``):

    - ``"le2015"`` (default; Le et al. 2015): the target is the sum of the two marked values; the first marker is
      uniform in ``[0, T // 2)``, the second in ``[T // 2, T)``. Needs ``T >= 2``.
    - ``"paper"``: the variant in the code of Roulet & Harchaoui (TMLR 2023, "Target Propagation via Regularized
      Inversion for Recurrent Neural Networks"): the target is the mean of the two values; the first marker is uniform
      in ``[0, T // 10)``, the second in ``[T // 10, T // 10 + 4T // 10)``, i.e. ``[0.1T, 0.5T)``. Needs ``T >= 10``.

    The baseline is the variance of the target, the MSE of the best memoryless predictor (the constant target mean):
    ``2/12 = 0.167`` for the sum, ``2/12 / 4 = 1/24`` for the mean.
    """

    name = "adding"
    kind = "regression"
    readout = "last"
    input_size = 2
    output_size = 1

    def __init__(
        self, *, seq_len: int, device: torch.device | str, seed: int, val_size: int = 1000, variant: str = "le2015"
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"task.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.seq_len = check_int("seq_len", seq_len, 2 if variant == "le2015" else 10)
        check_int("seed", seed, 0)
        check_int("val_size", val_size, 1)
        self.device = check_device(device)
        self.variant = variant
        self._scale = 1.0 if variant == "le2015" else 0.5  # sum or mean of the two values
        self.baseline = self._scale**2 * 2 * UNIFORM_VARIANCE  # variance of the target
        if variant == "le2015":
            self._windows = ((0, seq_len // 2), (seq_len // 2, seq_len))  # half-open marker windows
        else:
            self._windows = ((0, seq_len // 10), (seq_len // 10, seq_len // 10 + 4 * seq_len // 10))
        self._val = self.sample(val_size, generator=validation_generator(self.device, seed))

    def sample(self, batch_size: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = generator.device
        values = torch.rand(batch_size, self.seq_len, generator=generator, device=device)  # [B, T]
        positions = torch.stack(
            [
                lo + torch.randint(hi - lo, (batch_size,), generator=generator, device=device)
                for lo, hi in self._windows
            ],
            1,
        )  # [B, 2]
        markers = torch.zeros_like(values).scatter_(1, positions, 1.0)  # [B, T]
        x = torch.stack([values, markers], dim=-1)  # [B, T, 2]
        y = values.gather(1, positions).sum(dim=1, keepdim=True) * self._scale  # [B, 1]
        return x, y

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._val

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, y)  # [B, 1] against [B, 1]
