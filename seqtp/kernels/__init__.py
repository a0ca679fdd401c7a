"""Fast paths for the target recursion: a fused Triton kernel and a CUDA-graph capture of the torch loop.

Optional: triton is imported lazily, only when a kernel is used. The pure-torch recursion in
:meth:`seqtp.AnalyticInverse.propagate` stays the reference; ``tests/test_kernels.py`` checks both fast paths
against it.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (it is not a dependency of seqtp)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ("auto", "torch", "triton", "cuda_graph")
SINGLE_TILE_MAX = 128  # the kernel keeps M on chip up to this hidden size; above, auto prefers the CUDA graph


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(backend: str, states: torch.Tensor) -> str:
    """Resolve ``backend`` for a recursion (any rule) on ``states``.

    ``auto`` picks ``triton`` on a CUDA tensor in float32/bfloat16/float16 with ``H <= 128`` when triton imports, else
    ``cuda_graph`` on CUDA, else ``torch``. Under Triton's interpreter (:func:`interpreting`) CPU tensors count as
    CUDA ones for ``triton``.

    Raises:
        ValueError: an unknown backend, or one that cannot run on these inputs (named in the message).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = states.is_cuda
    kernel_ok = (on_cuda or interpreting()) and states.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend == "auto":
        if kernel_ok and states.shape[-1] <= SINGLE_TILE_MAX and triton_available():
            return "triton"
        return "cuda_graph" if on_cuda else "torch"
    if backend == "triton" and not (kernel_ok and triton_available()):
        raise ValueError("backend 'triton' needs triton and a CUDA tensor in float32/bfloat16/float16 (got device "
                         f"{states.device}, dtype {states.dtype})")
    if backend == "cuda_graph" and not on_cuda:
        raise ValueError(f"backend 'cuda_graph' needs a CUDA tensor (got device {states.device})")
    return backend
