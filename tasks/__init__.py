"""Sequence tasks: pure batch generators on a device, with their loss, metrics, memoryless baseline and chance
accuracy.

Installed as ``seqtp.tasks`` (the folder ``tasks/`` of the repository, mapped by ``package-dir``); the modules
import only torch and each other (relatively), nothing else of ``seqtp``.

``make_task(name, **options)`` builds one from the registry ``TASKS``; every task takes the keyword-only options
``seq_len``, ``device``, ``seed`` and ``val_size`` plus its own (see each class).
"""

from __future__ import annotations

import inspect

from .adding import Adding
from .base import Task
from .copying import Copying
from .mnist import PermutedMNIST, PixelMNIST
from .temporal_order import TemporalOrder

TASKS: dict[str, type[Task]] = {
    "copying": Copying,
    "adding": Adding,
    "pixel_mnist": PixelMNIST,
    "permuted_mnist": PermutedMNIST,
    "temporal_order": TemporalOrder,
}


def make_task(name: str, **options: object) -> Task:
    """Build the task ``name`` from its options; a ``ValueError`` for an unknown task or option."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    cls = TASKS[name]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ValueError(f"task {name!r}: {err}") from None
    return cls(**options)


__all__ = ["TASKS", "Adding", "Copying", "PermutedMNIST", "PixelMNIST", "Task", "TemporalOrder", "make_task"]
