"""Decaying target shifts never become subnormal floats (slow on x86 cores), on every solver, rule and update.

With a large ``reg`` the linearized shifts (and the difference rule's on relu cells, where ``a(0 + delta) - a(0) =
delta``) decay geometrically backwards in time; without the flush of :func:`seqtp.inverses.flush_tiny` they pass
through float32's subnormal range (below ``2^-126``) before they underflow to zero. The flush zeroes entries at or
below ``2^-63`` (float32), where nothing that uses the shifts can see them: the tests check that it removes every
subnormal value of the recursion's output, that it moves the shifts by at most the floor itself (``1e-19``, against
shifts of ``1e-2``) and the gradients by less than float32's resolution, and that it leaves the process's
flush-denormal mode alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqtp
import seqtp.inverses.base as solvers_module
from seqtp.inverses import MODES, SOLVERS, flush_floor, flush_tiny
from seqtp.kernels import triton_available

ROOT = Path(__file__).resolve().parents[1]
TINY32 = torch.finfo(torch.float32).tiny
B, T, H, REG = 4, 120, 16, 10.0  # reg 10: the linearized shifts shrink by ~0.1 per step, past 1e-38 within T


def subnormals(t: torch.Tensor) -> int:
    a = t.detach().abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


def problem(nonlinearity: str = "tanh", dtype=torch.float32, seed: int = 0, seq_len: int = T):
    """A model, its inputs and states, and direct shifts ``1e-2 * N(0, 1)`` at the last step only."""
    torch.manual_seed(seed)
    model = seqtp.RNNModel(1, H, 3, nonlinearity=nonlinearity).to(dtype)
    x = torch.randn(B, seq_len, 1).to(dtype)  # drawn in float32 for every dtype: the same problem
    with torch.no_grad():
        states = model.states(x)  # [B, T, H]
    direct = torch.zeros_like(states)
    direct[:, -1] = 1e-2 * torch.randn(B, H).to(dtype)
    return model, x, states, direct


def bound_solver(name: str, model, x, states):
    solver = SOLVERS[name](reg=REG, **({"backend": "torch"} if name == "analytic" else {}))
    cell = seqtp.make_cell(model)
    solver.bind(cell, x, states)
    if name == "learned":  # a contracting feedback map, so that its linearized shifts decay too
        solver.feedback.V.data.mul_(0.05)
        solver._cache = None
    return solver


def no_flush(monkeypatch):
    monkeypatch.setattr(solvers_module, "flush_tiny", lambda d: d)


# (solver, mode, nonlinearity) cases whose unflushed recursion goes subnormal (checked, so the tests can fail)
# Cases whose unflushed shifts go subnormal (the negative control). The dense solver's CG rescales every row by
# |J^T delta| before solving and stops at a relative tolerance, so its unflushed shifts stay normal here.
# The exact inverse has no regularization: its shifts grow (by up to sigma_min(W)^-T) instead of decaying; the L-DRL
# feedback starts as a random orthogonal Q, whose shifts shrink by phi' only.
DECAYING = ({(name, "linearized", "tanh") for name in SOLVERS if name not in ("dense", "exact", "ldrl")}
            | {("analytic", "difference", "relu")})
CASES = sorted(DECAYING | {(name, mode, "tanh") for name in SOLVERS for mode in MODES})


def test_flush_floor_is_the_square_root_of_the_smallest_normal():
    assert flush_floor(torch.float32) == 2.0**-63 == TINY32**0.5
    assert flush_floor(torch.float64) == 2.0**-511 == torch.finfo(torch.float64).tiny ** 0.5
    for half in (torch.float16, torch.bfloat16):  # computed in float32
        assert flush_floor(half) == flush_floor(torch.float32)
    assert (2 * flush_floor(torch.float32)) ** 2 > TINY32  # products of kept entries are normal
    floor = flush_floor(torch.float32)
    x = torch.tensor([floor, -floor, 2 * floor, -2 * floor, 1e-30, 1e-40, 0.5, float("nan"), float("inf")])
    want = torch.tensor([0, 0, 2 * floor, -2 * floor, 0, 0, 0.5, float("nan"), float("inf")])
    assert torch.equal(flush_tiny(x).isnan(), want.isnan())
    assert torch.equal(flush_tiny(x).nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize(("name", "mode", "nonlinearity"), CASES)
def test_recursion_output_has_no_subnormals(name, mode, nonlinearity, monkeypatch):
    """Every solver and rule: no subnormal shift with the flush; the decaying cases had some without it. The flush
    moves the shifts by at most the floor (absolute, against shifts of 1e-2: 1e-17 of them)."""
    # the iterated inverse tends to the unregularized inverse, whose shifts decay more slowly
    model, x, states, direct = problem(nonlinearity, seq_len=2 * T if name == "iterated" else T)
    flushed = bound_solver(name, model, x, states).propagate(direct, mode=mode)
    assert subnormals(flushed) == 0
    no_flush(monkeypatch)
    raw = bound_solver(name, model, x, states).propagate(direct, mode=mode)
    if (name, mode, nonlinearity) in DECAYING:
        assert subnormals(raw) > 0
    assert (flushed - raw).abs().max() <= 2 * flush_floor(torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_tp_iteration_is_unchanged_beyond_float32_resolution(name, mode, update, monkeypatch):
    """A whole TP iteration in float32 (every solver, rule and update): the shifts it propagates have no subnormal
    entry, and its gradients differ from the unflushed ones by less than float32's resolution of the gradient
    (``eps * |g|``), while it agrees with the float64 iteration to float32 accuracy (1e-4 relative: T = 120 steps of
    float32 rounding on shifts of 1e-2)."""
    def run(dtype, flush):
        model, x, states, direct = problem(dtype=dtype)
        y = torch.arange(B) % 3
        solver = SOLVERS[name](reg=REG, **({"backend": "torch"} if name == "analytic" else {}))
        seen = []
        propagate = solver.propagate

        def recording(direct, **kw):
            if name == "learned":
                solver.feedback.V.data.mul_(0.05)  # as in bound_solver: contracting, so that shifts decay
                solver._cache = None
            out = propagate(direct, **kw)
            seen.append(out)
            return out

        solver.propagate = recording
        method = seqtp.TargetProp(reg=REG, target_lr=0.1, mode=mode, update=update, solver=solver)
        with monkeypatch.context() as m:
            if not flush:
                no_flush(m)
            method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
        grads = torch.cat([p.grad.flatten() for p in model.rnn.parameters()])
        return grads, seen[0]

    g32, shifts = run(torch.float32, True)
    assert subnormals(shifts) == 0
    g32_raw, _ = run(torch.float32, False)
    assert (g32 - g32_raw).norm() <= torch.finfo(torch.float32).eps * g32_raw.norm()
    # Agreement with float64, except: the learned inverses (learned, ldrl) draw their fit noise (and the learned one
    # its feedback weights) in the run's dtype; the exact inverse amplifies the shifts to ~1e21 over these 120 steps
    # (the atanh clamp then decides); GAIT's rule through a solver whose difference cancels (all but the exact one)
    # loses ulp / gamma per step.
    if name not in ("learned", "ldrl", "exact") and mode != "gait":
        g64, _ = run(torch.float64, True)
        assert (g32.double() - g64).norm() <= 1e-4 * g64.norm()


def ftz_on() -> bool:
    """Whether the calling thread flushes subnormal results (probe: half of float32's smallest normal)."""
    return float(torch.tensor(TINY32) * 0.5) == 0.0


@pytest.mark.parametrize("user_setting", [False, True])
def test_flush_denormal_mode_of_the_process_is_left_alone(user_setting):
    """The fix needs no global state: the flush-denormal mode a user chose is the same after a TP backward, also after
    one that raises (NaN weights: the factorization fails)."""
    if user_setting and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        assert ftz_on() == user_setting
        model, x, _, _ = problem()
        y = torch.arange(B) % 3
        method = seqtp.TargetProp(reg=REG, target_lr=0.1, mode="linearized", update="through_time")
        method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
        assert ftz_on() == user_setting
        with torch.no_grad():
            model.rnn.weight_hh_l0.fill_(float("nan"))
        with pytest.raises(seqtp.FactorizationError):
            method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
        assert ftz_on() == user_setting
    finally:
        torch.set_flush_denormal(False)


def kernel_subnormals() -> str:
    """Under TRITON_INTERPRET=1: ``"<kernel subnormals> <reference subnormals> <max |kernel - flushed torch|>"`` for
    the decaying linearized case and the relu difference case, through both tilings (H = 16 on chip, 136 streamed)."""
    from seqtp.inverses import torch_shifts
    from seqtp.kernels._triton import FLUSH_FLOOR, fused_shifts

    assert FLUSH_FLOOR == flush_floor(torch.float32)
    got, ref, diff = 0, 0, 0.0
    for hidden in (16, 136):
        for mode, nl in (("linearized", "tanh"), ("difference", "relu")):
            g = torch.Generator().manual_seed(0)
            z = torch.randn(3, 80, hidden, generator=g)
            states = {"tanh": 0.5 * torch.tanh(z), "relu": torch.relu(z)}[nl]  # [B, T, H]
            direct = torch.zeros_like(states)
            direct[:, -1] = 1e-2 * torch.randn(3, hidden, generator=g)
            w = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))[0]
            m = torch.linalg.solve(w.T @ w + REG * torch.eye(hidden, dtype=torch.float64), w.T).float()  # |M| = 1/11
            out = fused_shifts(states, direct, m, mode=mode, nonlinearity=nl, eps=1e-3, precision="ieee")
            want = torch_shifts(states, direct, m, mode=mode, nonlinearity=nl, eps=1e-3)
            solvers_module.flush_tiny = lambda d: d
            ref += subnormals(torch_shifts(states, direct, m, mode=mode, nonlinearity=nl, eps=1e-3))
            solvers_module.flush_tiny = flush_tiny
            got += subnormals(out)
            diff = max(diff, float((out - want).abs().max()))
    return f"{got} {ref} {diff}"


def _interpreter_ok() -> bool:
    if not triton_available():
        return False
    import numpy

    major, minor = (int(v) for v in numpy.__version__.split(".")[:2])
    return (major, minor) < (2, 3)  # Triton 3.6's interpreter breaks on NumPy >= 2.3


@pytest.mark.skipif(not _interpreter_ok(), reason="needs triton and numpy < 2.3 for TRITON_INTERPRET=1")
def test_triton_kernel_output_has_no_subnormals_in_interpreter_mode():
    """The fused kernel flushes like the torch loop: on inputs whose unflushed recursion goes subnormal, the kernel's
    output has none, and it equals the flushed torch recursion up to float32 rounding of the shifts (1e-2)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "import test_subnormals\nprint(test_subnormals.kernel_subnormals())")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got, ref, diff = out.stdout.split()[-3:]
    assert int(got) == 0 and int(ref) > 0
    assert float(diff) < 1e-8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cuda_graph", "triton"])
def test_fast_paths_output_has_no_subnormals_on_gpu(backend):
    """The CUDA graph (the torch loop, captured) and the kernel flush on the GPU too (deterministic property)."""
    if backend == "triton" and not triton_available():
        pytest.skip("needs triton")
    model, x, states, direct = problem()
    model, x, states, direct = model.cuda(), x.cuda(), states.cuda(), direct.cuda()
    solver = SOLVERS["analytic"](reg=REG, backend=backend).bind(seqtp.make_cell(model), x, states)
    for mode in MODES:
        assert subnormals(solver.propagate(direct, mode=mode)) == 0
