"""Iteration benchmark: wall time and peak memory of one full training iteration, TP variants vs BPTT.

One iteration is what a training step costs: ``optimizer.zero_grad``, the method's forward pass, targets and update
(``Method.backward``) and an SGD step, on fixed random data that lives on the device (``x ~ randn [B, T, D]`` and a
10-class cross-entropy on the readout of the last state ``h_T``). Every variant of a shape starts from the same seed,
so it gets the same initial weights and data.

Variants (names for ``bench(variants=...)`` and ``--variants``):

- ``bptt``: :class:`seqtp.BPTT` through ``torch.nn.RNN`` (backend ``cudnn`` where cuDNN takes the input, else
  ``torch``).
- ``tp-{mode}-{update}`` for ``mode`` in ``linearized``, ``difference``, ``exact`` and ``update`` in ``local``,
  ``through_time``: :class:`seqtp.TargetProp` with ``reg=1.0``, ``target_lr=0.1`` (backend ``torch``: the reference
  recursion :meth:`seqtp.AnalyticInverse.propagate`).
- ``tp-linearized-local-naive``: the same computation written like the paper's public code (Roulet & Harchaoui,
  TMLR 2023): a Python loop over time that, at every step, computes ``a'(h_t)``, solves with the Cholesky factor
  (``torch.cholesky_solve``) instead of reusing a precomputed ``M``, and adds the step's local loss to a sum that is
  differentiated by autograd at the end (:class:`_NaiveTargetProp`). It is the baseline the batched implementation is
  measured against; ``tests/test_bench.py`` checks that it computes the same gradients.
- ``tp-{mode}-local-{backend}`` (CUDA only): the fast paths of :class:`seqtp.AnalyticInverse`: ``triton`` (the fused
  kernel; the exact rule as the difference rule on corrected direct shifts), ``triton_fused`` (the kernel also
  accumulates the local update's gradients, ``fuse_local_update=True``) and ``cuda_graph``.

Cells (``bench(cells=...)``, ``--cell``): ``elman`` (default; ``torch.nn.RNN``), ``gru`` and ``lstm``
(``torch.nn.GRU`` / ``torch.nn.LSTM`` inside :class:`seqtp.RNNModel`). For GRU and LSTM, the ``tp-{mode}-{update}``
variants run ``solver="auto"`` (:func:`seqtp.inverses.auto_solver_name`: the dense inverse for moderate state
sizes, else Gauss-Newton-CG), and the Elman-only variants (the naive loop, the CUDA backends) are left out. Each row
names its ``cell`` and TP ``solver`` (``None`` for BPTT); BPTT runs on every cell, and each TP row's ratios are to the
BPTT row of the same cell and shape.

The command line (``seqtp bench``) is :func:`add_arguments` + :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ._cells import activation, inverse_activation_grad, make_cell
from ._model import CELL_KINDS, RNNModel
from .inverses import AnalyticInverse, FactorizationError, auto_solver_name
from .methods import BPTT, UPDATES, Method, TargetProp

Shape = tuple[int, int, int, int]  # (batch B, seq_len T, hidden H, input D)

DEFAULT_SHAPES: list[Shape] = [(512, 784, 128, 1), (128, 1000, 128, 10), (256, 784, 512, 1)]
"""The GPU shapes ``(batch, seq_len, hidden, input)``: pixel MNIST, a long 10-input task, a wide pixel MNIST."""

CPU_SHAPE: Shape = (64, 200, 128, 1)
"""The default shape on CPU (the GPU shapes take minutes per variant there)."""

NUM_CLASSES = 10
REG = 1.0
TARGET_LR = 0.1
LR = 1e-3  # SGD learning rate: small, so repeated steps on the same batch stay finite
ROW_KEYS = (
    "method", "mode", "update", "backend", "cell", "solver", "batch", "seq_len", "hidden", "input",
    "median_ms", "min_ms", "max_ms", "peak_mem_mb",
)  # fmt: skip


def _variant_specs() -> dict[str, dict]:
    """``name -> {"method", "mode", "update", "backend"}``; BPTT's backend (``None`` here) is resolved per run."""
    specs = {"bptt": {"method": "bptt", "mode": None, "update": None, "backend": None}}
    for mode in AnalyticInverse.fused_rules:  # the rules of the analytic inverse's own paths
        for update in UPDATES:
            specs[f"tp-{mode}-{update}"] = {"method": "tp", "mode": mode, "update": update, "backend": "torch"}
    specs["tp-linearized-local-naive"] = {"method": "tp", "mode": "linearized", "update": "local", "backend": "naive"}
    for mode, backends in (("linearized", ("triton", "triton_fused", "cuda_graph")),
                           ("difference", ("triton", "triton_fused")), ("exact", ("triton",))):
        for backend in backends:  # CUDA only
            specs[f"tp-{mode}-local-{backend}"] = {"method": "tp", "mode": mode, "update": "local", "backend": backend}
    return specs


CUDA_ONLY_BACKENDS = ("triton", "triton_fused", "cuda_graph")
SOLVER_BACKENDS = {  # a TP row's backend -> the options of seqtp.AnalyticInverse
    "torch": {"backend": "torch"},
    "triton": {"backend": "triton"},
    "triton_fused": {"backend": "triton", "fuse_local_update": True},
    "cuda_graph": {"backend": "cuda_graph"},
}


VARIANTS: dict[str, dict] = _variant_specs()
"""All variants, by name, in benchmark order (``bench(variants=None)`` runs them all)."""


def variant_name(row: dict) -> str:
    """The variant name of a result row (or spec): ``bptt``, ``tp-linearized-local``, ``tp-linearized-local-naive``."""
    if row["method"] == "bptt":
        return "bptt"
    name = f"tp-{row['mode']}-{row['update']}"
    return name if row["backend"] == "torch" else f"{name}-{row['backend']}"


def parse_variants(text: str | Sequence[str] | None) -> list[str]:
    """Variant names from a comma list (or a list of names); ``None`` or ``"all"`` means every variant.

    ``through-time`` is accepted for ``through_time``.

    Raises:
        ValueError: on an unknown or empty name list.
    """
    if text is None:
        return list(VARIANTS)
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [item.strip().replace("through-time", "through_time") for item in items if item.strip()]
    if names == ["all"]:
        return list(VARIANTS)
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise ValueError(f"unknown variants {', '.join(bad) or '(empty)'}; choose from {', '.join(VARIANTS)}")
    return names


class _NaiveTargetProp(Method):
    """Linearized TP with the local update, one Python step per time step as in the paper's public code.

    Same contract and same result as ``TargetProp(mode="linearized", update="local")`` (without ``shift_cap``):
    direct targets ``dhat_t = -target_lr * B * dL/dh_t``, then backwards in time
    ``v_{t-1} = h_{t-1} + dhat_{t-1} + (W^T W + r I)^{-1} W^T (a'(h_t) * (v_t - h_t))``, where every step recomputes
    ``a'(h_t)`` and calls ``torch.cholesky_solve`` with the factor of ``W^T W + r I``, and the local loss
    ``(1/B) sum_t 1/2 |phi(W h_{t-1} + U x_t + b) - v_t|^2`` (``h_{t-1}``, ``v_t`` constant) is accumulated step by
    step and differentiated with autograd once at the end.

    Args:
        reg: ``r > 0`` of the regularized inverse. target_lr: ``gamma_h``. eps: clamp margin of ``atanh``.
    """

    def __init__(self, *, reg: float, target_lr: float, eps: float = 1e-3):
        self.reg, self.target_lr, self.eps = float(reg), float(target_lr), float(eps)

    def backward(self, model, x, loss_fn):
        batch, seq_len, _ = x.shape
        with torch.no_grad():
            states = model.states(x)  # [B, T, H]
        leaf = states.requires_grad_()
        loss = loss_fn(leaf)
        loss.backward()  # readout .grad, and dL/dh_t in leaf.grad
        direct = leaf.grad * (-self.target_lr * batch)  # [B, T, H]: dhat_t
        hs = leaf.detach()  # [B, T, H]
        rnn, nl = model.rnn, model.nonlinearity
        w = rnn.weight_hh_l0  # [H, H]
        with torch.no_grad():
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            chol = torch.linalg.cholesky(w.T @ w + self.reg * eye)  # [H, H] lower factor of W^T W + r I
        h_zero = hs.new_zeros(batch, hs.shape[2])  # [B, H]: h_0
        target = hs[:, -1] + direct[:, -1]  # [B, H]: v_T
        local_loss = 0.0
        for t in range(seq_len - 1, -1, -1):
            h_prev = hs[:, t - 1] if t > 0 else h_zero  # [B, H]
            z = F.linear(x[:, t], rnn.weight_ih_l0, rnn.bias_ih_l0) + F.linear(h_prev, w, rnn.bias_hh_l0)  # [B, H]
            local_loss = local_loss + 0.5 * (activation(z, nl) - target).square().sum() / batch
            if t > 0:
                with torch.no_grad():
                    a_grad = inverse_activation_grad(hs[:, t], nl, eps=self.eps)  # [B, H]: a'(h_t)
                    rhs = ((a_grad * (target - hs[:, t])) @ w).T  # [H, B]: W^T (a'(h_t) * delta_t)
                    shift = torch.cholesky_solve(rhs, chol).T  # [B, H]
                    target = hs[:, t - 1] + direct[:, t - 1] + shift  # [B, H]: v_{t-1}
        local_loss.backward()
        return loss.detach(), {}


def _make_method(spec: dict, cell: str = "elman") -> Method:
    if spec["method"] == "bptt":
        return BPTT()
    if spec["backend"] == "naive":
        return _NaiveTargetProp(reg=REG, target_lr=TARGET_LR)
    if cell != "elman":
        return TargetProp(reg=REG, target_lr=TARGET_LR, mode=spec["mode"], update=spec["update"], solver="auto")
    return TargetProp(reg=REG, target_lr=TARGET_LR, mode=spec["mode"], update=spec["update"],
                      solver="analytic", solver_options=SOLVER_BACKENDS[spec["backend"]])


def applies_to(spec: dict, cell: str) -> bool:
    """Whether the variant ``spec`` runs on ``cell``: every variant on Elman; BPTT and the ``torch``-backend TP
    variants (then with ``solver="auto"``) on GRU and LSTM."""
    return cell == "elman" or spec["backend"] in (None, "torch")


def parse_cells(text: str | Sequence[str] | None) -> list[str]:
    """Cell names from a comma list (or a list); ``None`` means ``["elman"]``.

    Raises:
        ValueError: an unknown or empty cell list.
    """
    if text is None:
        return ["elman"]
    items = text.split(",") if isinstance(text, str) else list(text)
    cells = [c.strip() for c in items if c.strip()]
    bad = [c for c in cells if c not in CELL_KINDS]
    if bad or not cells:
        raise ValueError(f"unknown cells {', '.join(bad) or '(empty)'}; choose from {', '.join(CELL_KINDS)}")
    return cells


def _check_shape(shape: Sequence[int]) -> Shape:
    try:
        dims = tuple(operator.index(v) for v in shape)
    except TypeError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"a shape is (batch, seq_len, hidden, input) of positive ints, got {shape!r}")
    return dims  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _silenced_fds():
    """Send the process's file descriptors 1 and 2 to ``os.devnull`` for the block: the profiler's C++ side
    (kineto's ``profiler_start``/``profiler_stop`` lines, the allocator's warning about blocks allocated before the
    profile) writes there directly, past ``sys.stdout``/``sys.stderr``. Python's streams are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(fd) for fd in (1, 2)]
    except OSError:  # no such descriptors (an embedded interpreter): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _cpu_peak_bytes(step: Callable[[], None]) -> int | None:
    """Peak of the tensor memory allocated by ``step()`` above what was allocated before it, on CPU.

    ``tracemalloc`` does not see torch's C++ allocator, so this runs ``step`` under ``torch.profiler`` with
    ``profile_memory=True`` and walks its event tree: every allocation and free of the CPU allocator is an event with
    a signed size; their running sum in time order, and its maximum, is the peak. This reads the profiler's
    experimental event tree (``kineto_results.experimental_event_tree``), a private API: ``None`` if it is missing.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _silenced_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError, RuntimeError):
        return None
    allocs, stack = [], list(roots)
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            allocs.append((event.start_time_ns, event.extra_fields.alloc_size))  # size < 0: a free
        stack.extend(event.children)
    allocs.sort(key=lambda a: a[0])
    current = peak = 0
    for _, size in allocs:
        current += size
        peak = max(peak, current)
    return peak


def _peak_mem_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory (MB) of one ``step()`` above the memory held before it (model, data, optimizer state)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type == "cpu":
        peak = _cpu_peak_bytes(step)
        return None if peak is None else peak / 2**20
    return None


UNCAPTURABLE = ("naive", "cuda_graph")  # a host sync (torch.linalg.cholesky's check); a capture of its own


def _captured(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after two warm-up calls on a side stream); returns its replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class _Run:
    """One variant on one shape: its model, data and iteration, built and warmed up (and captured, with ``graph``);
    :meth:`time_once` times one iteration, :meth:`row` finishes the result row (with the peak memory)."""

    def __init__(self, spec: dict, shape: Shape, *, device: torch.device, dtype: torch.dtype, warmup: int, seed: int,
                 graph: bool, cell: str = "elman"):
        batch, seq_len, hidden, input_size = shape
        self.device, self.graph, self.times, self.peak = device, graph, [], None
        torch.manual_seed(seed)
        model = RNNModel(input_size, hidden, NUM_CLASSES, cell=cell).to(device=device, dtype=dtype)
        solver = None
        if spec["method"] == "tp":
            solver = "analytic" if cell == "elman" else auto_solver_name(make_cell(model))
        x = torch.randn(batch, seq_len, input_size, device=device, dtype=dtype)  # [B, T, D]
        y = torch.randint(0, NUM_CLASSES, (batch,), device=device)  # [B]
        backend = spec["backend"]
        if backend is None:  # BPTT: whether nn.RNN takes the cuDNN path for this input
            backend = "cudnn" if device.type == "cuda" and torch.backends.cudnn.is_acceptable(x) else "torch"
        self._row = {**spec, "backend": f"{backend}+graph" if graph else backend, "cell": cell, "solver": solver,
                     "batch": batch, "seq_len": seq_len, "hidden": hidden, "input": input_size}
        self.timed: Callable[[], None] | None = None
        if graph and backend in UNCAPTURABLE:
            self._fail(f"backend {backend} cannot be captured in a CUDA graph")
            return
        method = _make_method(spec, cell)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        self.optimizer = optimizer

        def loss_fn(states: torch.Tensor) -> torch.Tensor:  # states [B, T, H] -> scalar batch mean
            return F.cross_entropy(model.read(states), y)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            method.backward(model, x, loss_fn)
            optimizer.step()

        self.step = step
        try:
            for _ in range(warmup):
                step()
            if graph:  # the peak is that of the capture, which allocates the graph's memory
                optimizer.zero_grad(set_to_none=True)
                box = []
                self.peak = _peak_mem_mb(lambda: box.append(_captured(step, device)), device)
                self.timed = box[0]
            else:
                self.timed = step
        except (torch.cuda.OutOfMemoryError, FactorizationError) as e:
            self._fail(f"{type(e).__name__}: {e}")
        except RuntimeError as e:
            if not graph:
                raise
            self._fail(f"CUDA graph capture failed: {str(e).splitlines()[0]}")  # go on with the other variants

    def _fail(self, message: str) -> None:
        self._row.update(error=message)
        self.timed = None

    def time_once(self) -> None:
        if self.timed is None:
            return
        try:
            _sync(self.device)
            start = time.perf_counter()
            self.timed()
            _sync(self.device)
        except (torch.cuda.OutOfMemoryError, FactorizationError) as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        self.times.append((time.perf_counter() - start) * 1e3)

    def row(self) -> dict:
        row = dict(self._row, median_ms=None, min_ms=None, max_ms=None, peak_mem_mb=None)
        if self.timed is None:
            return row
        if not self.graph:
            self.optimizer.zero_grad(set_to_none=True)  # the peak then counts the gradients the iteration allocates
            self.peak = _peak_mem_mb(self.step, self.device)
        times = self.times
        row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), peak_mem_mb=self.peak)
        return row


def bench(
    shapes: Sequence[Sequence[int]],
    *,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    variants: str | Sequence[str] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    progress: bool = False,
    graph: bool = False,
    cells: str | Sequence[str] | None = None,
) -> list[dict]:
    """Time full training iterations of each variant on each shape.

    Each timed iteration is ``zero_grad`` + ``Method.backward`` (forward, targets, update) + ``SGD.step`` on data
    already on ``device``. On CUDA the device is synchronized before and after it and the wall time between is
    recorded (``perf_counter``), so launch overhead, the Python loops and the GPU work all count. The bench itself
    adds no host sync inside an iteration; the methods may (on the CPU ``ElmanInverse`` checks its Cholesky
    factorization, the naive variant's ``torch.linalg.cholesky`` checks everywhere). All variants of a shape are
    built and run ``warmup`` untimed iterations first, then are timed in turns (one iteration of each, ``repeats``
    times), so that drifts of the machine's speed hit every variant alike.

    Peak memory is measured on one more, untimed, iteration, as the peak of the tensor memory allocated during the
    iteration minus what was allocated before it (model, data, optimizer state; gradients are freed first, so they
    count): on CUDA by ``torch.cuda.max_memory_allocated``, on CPU by the allocation events of ``torch.profiler``
    (``profile_memory=True``; ``tracemalloc`` misses torch's C++ allocations). It is ``None`` on other devices or if
    the profiler's (private) event tree is unavailable.

    With ``graph=True`` (CUDA), each variant's whole iteration is captured once in a CUDA graph after the warm-up
    (TP and BPTT iterations have no host sync) and the timed iterations are replays: launch overhead and Python no
    longer count. The peak memory is then that of the capture. Such rows have ``"+graph"`` appended to their
    backend; the naive loop and the ``cuda_graph`` backend cannot be captured and get an ``"error"``.

    Args:
        shapes: ``(batch, seq_len, hidden, input)`` tuples.
        device: where the model and data live (``"cpu"``, ``"cuda"``, ``"cuda:1"``; not ``"auto"``).
        dtype: the model and data dtype.
        variants: names (see :data:`VARIANTS`), as a list or a comma list; ``None``: all (on CPU, all but the
            CUDA-only ``triton`` and ``cuda_graph`` backends).
        repeats: timed iterations per variant (>= 1). warmup: untimed iterations before them (>= 0).
        seed: seeds the initial weights and data, the same for every variant of a shape.
        progress: print each row to stderr as it finishes.
        graph: capture each iteration in a CUDA graph and time its replays (CUDA only).
        cells: ``elman``, ``gru``, ``lstm``, as a list or a comma list (default: ``elman``); on GRU and LSTM only
            the variants of :func:`applies_to` run.

    Returns:
        One row per (shape, cell, variant), shapes outermost, then cells: ``{"method", "mode", "update",
        "backend", "cell", "solver", "batch", "seq_len", "hidden", "input", "median_ms", "min_ms", "max_ms",
        "peak_mem_mb"}`` (``solver``: the TP inverse, ``None`` for BPTT). A variant that runs out of
        memory or whose factorization fails gets ``None`` times and an extra ``"error"`` message.

    Raises:
        ValueError: on a bad shape, variant or cell name, ``repeats`` or ``warmup``, or ``graph`` off CUDA.
    """
    device = torch.device(device)
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True (--graph) needs a CUDA device, got {device}")
    names = parse_variants(variants)
    if variants is None and device.type != "cuda":  # the default set on CPU leaves out the CUDA-only backends
        names = [n for n in names if VARIANTS[n]["backend"] not in CUDA_ONLY_BACKENDS]
    cell_names = parse_cells(cells)
    checked = [_check_shape(s) for s in shapes]
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    rows = []
    for shape in checked:
        runs = {}
        for cell in cell_names:  # build and warm up every variant of the shape, then time them in turns
            for name in names:
                if applies_to(VARIANTS[name], cell):
                    runs[cell, name] = _Run(VARIANTS[name], shape, device=device, dtype=dtype, warmup=warmup,
                                            seed=seed, graph=graph, cell=cell)
        for _ in range(repeats):
            for run in runs.values():
                run.time_once()
        for (cell, name), run in runs.items():
            row = run.row()
            rows.append(row)
            if progress:
                took = "failed" if row["median_ms"] is None else f"{row['median_ms']:.2f} ms"
                print(f"bench: {cell} {name} {shape}: {took}", file=sys.stderr, flush=True)
            del run.timed  # a captured graph's memory goes with it
        del runs
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """An aligned text table of result rows, with each TP row's time and memory as a ratio of the BPTT row of the
    same shape (``-`` where there is none).

    Args:
        rows: rows from :func:`bench`.

    Returns:
        The table, one line per row after a header (no trailing newline).
    """
    shape_keys = ("batch", "seq_len", "hidden", "input")
    group_keys = ("cell", *shape_keys)
    bptt = {tuple(r.get(k, "elman") for k in group_keys): r for r in rows if r["method"] == "bptt"}
    header = ["variant", "backend", "cell", "solver", "B", "T", "H", "D", "median ms", "min ms", "max ms", "peak MB",
              "time/BPTT", "mem/BPTT"]
    lines = [header]
    for r in rows:
        base = bptt.get(tuple(r.get(k, "elman") for k in group_keys))
        t_ratio = m_ratio = None
        if r["method"] != "bptt" and base is not None:
            if r["median_ms"] is not None and base["median_ms"]:
                t_ratio = r["median_ms"] / base["median_ms"]
            if r["peak_mem_mb"] is not None and base["peak_mem_mb"]:
                m_ratio = r["peak_mem_mb"] / base["peak_mem_mb"]
        lines.append([
            variant_name(r), r["backend"], r.get("cell", "elman"), r.get("solver") or "-",
            *(str(r[k]) for k in shape_keys),
            _fmt(r["median_ms"], ".2f"), _fmt(r["min_ms"], ".2f"), _fmt(r["max_ms"], ".2f"),
            _fmt(r["peak_mem_mb"], ".1f" if (r["peak_mem_mb"] or 0) >= 10 else ".3f"),
            _fmt(t_ratio, ".2f") + ("x" if t_ratio is not None else ""),
            _fmt(m_ratio, ".2f") + ("x" if m_ratio is not None else ""),
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def device_name(device: str | torch.device) -> str:
    """A readable name of ``device``: the GPU's name on CUDA, the CPU model and core count on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json(
    rows: Sequence[dict], path: str | Path, *, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> None:
    """Write ``{"device", "torch", "dtype", "results"}`` to ``path`` (parent folders are created).

    Args:
        rows: rows from :func:`bench`. path: the JSON file. device: the device they ran on (named by
        :func:`device_name`). dtype: the dtype they ran in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "results": [dict(r) for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``seqtp bench`` options to ``parser`` (to be run by :func:`run_from_args`)."""
    parser.add_argument("--batch", type=int, help="batch size B (with --seq-len --hidden [--input]: one shape)")
    parser.add_argument("--seq-len", type=int, help="sequence length T")
    parser.add_argument("--hidden", type=int, help="hidden size H")
    parser.add_argument("--input", type=int, default=1, help="input size D (default: 1)")
    parser.add_argument("--cell", default="elman", help="elman | gru | lstm, or a comma list (default: elman)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default: float32")
    parser.add_argument("--repeats", type=int, default=20, help="timed iterations per variant (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default: 0)")
    parser.add_argument("--variants", help=f"comma-separated, default all: {','.join(VARIANTS)}")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (default: torch's)")
    parser.add_argument("--graph", action="store_true",
                        help="CUDA: capture each iteration in a CUDA graph and time its replays")


def run_from_args(args: argparse.Namespace, device: torch.device) -> int:
    """Run the benchmark from :func:`add_arguments`'s options, print the table, write the JSON if asked.

    With ``--batch --seq-len --hidden`` (and ``--input``, default 1) one shape; without them the shapes are
    :data:`DEFAULT_SHAPES` on CUDA and :data:`CPU_SHAPE` on CPU.

    Args:
        args: the parsed options. device: the resolved device (the CLI resolves ``auto``).

    Returns:
        The exit status: 0, or 2 on a bad option (the message goes to stderr).
    """
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        dims = (args.batch, args.seq_len, args.hidden, args.input)
        if all(d is not None for d in dims[:3]):
            shapes = [dims]
        elif any(d is not None for d in dims[:3]):
            raise ValueError("give all of --batch --seq-len --hidden (and optionally --input), or none")
        else:
            shapes = DEFAULT_SHAPES if device.type == "cuda" else [CPU_SHAPE]
        dtype = DTYPES[args.dtype]
        rows = bench(shapes, device=device, dtype=dtype, variants=args.variants, repeats=args.repeats,
                     warmup=args.warmup, seed=args.seed, progress=True, graph=args.graph, cells=args.cell)
    except ValueError as e:
        print(f"seqtp bench: error: {e}", file=sys.stderr)
        return 2
    print(f"device: {device_name(device)}, torch {torch.__version__}, {args.dtype}, {args.repeats} repeats")
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, device=device, dtype=dtype)
        print(f"wrote {args.json}")
    return 0
