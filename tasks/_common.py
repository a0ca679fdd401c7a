"""Option checks and the validation-set generator shared by the tasks."""

from __future__ import annotations

import torch

# The validation generator is seeded with ``seed + VALIDATION_SEED_OFFSET`` so that a training generator seeded with
# the same ``seed`` does not replay the validation set as its first batches. A prime far above the seeds of runs, and
# below 2**32: the CPU generator keeps only the low 32 bits of a seed.
VALIDATION_SEED_OFFSET = 1_000_003


def check_int(option: str, value: object, minimum: int | None = None) -> int:
    """``value`` if it is an int (>= ``minimum`` if given), else a one-line ``ValueError`` naming ``task.<option>``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"task.{option} must be an integer{bound}, got {value!r}")
    return value


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, else a one-line ``ValueError``."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"task.device must be a torch device, got {device!r}") from err


def validation_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator, on ``device``, from which a task draws its fixed validation set."""
    return torch.Generator(device=device).manual_seed(seed + VALIDATION_SEED_OFFSET)
