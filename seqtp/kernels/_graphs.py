"""CUDA-graph capture of the pure-torch target recursion: the fallback fast path where the Triton kernel does not
apply. The Python loop of ``T`` small launches is recorded once per (shapes, dtype, device, options) and replayed:
one launch per iteration instead of ``~3 T``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_GRAPHS = 4  # captured graphs kept (least recently used dropped); each holds static copies of its inputs
_GRAPHS: OrderedDict = OrderedDict()


def graphed(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, **options) -> torch.Tensor:
    """``fn(*tensors, **options)`` through a CUDA graph captured at the first call with these shapes and options.

    The inputs are copied into the graph's static buffers, the graph is replayed, and a copy of its output is
    returned (the static output is overwritten by the next replay). ``fn`` must be capturable: no host syncs, no
    data-dependent control flow, no allocation that depends on values.
    """
    key = (fn, tuple((t.shape, t.dtype, t.device) for t in tensors), tuple(sorted(options.items())))
    entry = _GRAPHS.get(key)
    if entry is None:
        static = [t.clone() for t in tensors]
        stream = torch.cuda.Stream(device=tensors[0].device)
        stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with torch.cuda.stream(stream):  # warm up outside the capture (allocator, cuBLAS handles)
            fn(*static, **options)
        torch.cuda.current_stream(tensors[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static, **options)
        entry = (graph, static, out)
        _GRAPHS[key] = entry
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    graph, static, out = entry
    for buf, t in zip(static, tensors, strict=True):
        buf.copy_(t)
    graph.replay()
    return out.clone()
