"""GaussNewtonInverse: agreement with the analytic Elman inverse and with dense float64 solves, exactness at
``v = s_t``, convergence rates, diagnostics and errors (float64, CPU)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from seqtp._cells import ElmanCell, make_cell
from seqtp.inverses import MODES, RULES, AnalyticInverse, GaussNewtonInverse

DT = torch.float64
TIGHT = {"tol": 1e-12, "cg_tol": 1e-13, "max_iter": 50}
REPORT_KEYS = {
    "gn_iterations_max", "gn_iterations_mean", "cg_iterations_max", "cg_iterations_mean",
    "final_relative_residual_max", "final_gradient_norm_max", "converged", "line_search_backtracks_max",
    "invert_calls", "linearized_calls",
}


def setup(kind: str, *, nonlinearity: str = "tanh", batch: int = 4, steps: int = 6, inputs: int = 3,
          hidden: int = 5, seed: int = 0, dtype: torch.dtype = DT):
    """A cell of ``kind`` (``elman``, ``gru``, ``lstm``), inputs ``[B, T, D]`` and its states ``[B, T, S]``."""
    torch.manual_seed(seed)
    if kind == "elman":
        module = torch.nn.RNN(inputs, hidden, nonlinearity="relu" if nonlinearity == "relu" else "tanh",
                              batch_first=True)
    else:
        module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind](inputs, hidden, batch_first=True)
    module = module.to(dtype)
    cell = ElmanCell(module, nonlinearity="identity") if nonlinearity == "identity" else make_cell(module)
    x = (0.8 * torch.randn(batch, steps, inputs, dtype=DT)).to(dtype)
    return cell, x, cell.unroll(x)


def row_problem(cell, x, states, t: int, b: int):
    """Step ``t``'s output-space residual map of row ``b`` (1-D in, 1-D out) and ``s_{t-1}`` of that row."""
    prev = states[b, t - 1] if t > 0 else torch.zeros_like(states[b, 0])
    return (lambda u: cell.step(u, x[b, t])), prev


def dense_gauss_newton(fn, prev, target, reg: float, iters: int = 60) -> torch.Tensor:
    """Dense float64 Gauss-Newton for ``argmin_u |fn(u) - target|^2 + reg |u - prev|^2`` (one row)."""
    u = prev.clone()
    eye = torch.eye(prev.shape[0], dtype=prev.dtype)
    for _ in range(iters):
        jac = torch.func.jacrev(fn)(u)  # [S', S]
        grad = jac.T @ (fn(u) - target) + reg * (u - prev)
        u = u - torch.linalg.solve(jac.T @ jac + reg * eye, grad)
    jac = torch.func.jacrev(fn)(u)
    assert (jac.T @ (fn(u) - target) + reg * (u - prev)).norm() < 1e-13  # a stationary point
    return u


def dense_linearized(fn, prev, delta, reg: float) -> torch.Tensor:
    jac = torch.func.jacrev(fn)(prev)  # [S', S]
    eye = torch.eye(prev.shape[0], dtype=prev.dtype)
    return torch.linalg.solve(jac.T @ jac + reg * eye, jac.T @ delta)


def objective(cell, x, states, t, v, u, reg):
    prev = states[:, t - 1]
    return (cell.step(u, x[:, t]) - v).square().sum(-1) + reg * (u - prev).square().sum(-1)  # [B]


# -- 1. pre-activation space on Elman = the analytic inverse ---------------------------------------------------------

@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_preactivation_space_matches_analytic_inverse(nonlinearity):
    cell, x, states = setup("elman", nonlinearity=nonlinearity, steps=8)
    reg = 0.7
    gn = GaussNewtonInverse(reg=reg, space="preactivation", **TIGHT).bind(cell, x, states)
    ref = AnalyticInverse(reg=reg).bind(cell, x, states)
    gen = torch.Generator().manual_seed(1)
    for t in (1, 4, 7):
        v = states[:, t] + 0.1 * torch.randn(states[:, t].shape, generator=gen, dtype=DT)
        torch.testing.assert_close(gn.invert(t, v), ref.invert(t, v), rtol=0, atol=1e-10)
        delta = torch.randn(states[:, t].shape, generator=gen, dtype=DT)
        torch.testing.assert_close(gn.linearized(t, delta), ref.linearized(t, delta), rtol=0, atol=1e-10)
    direct = 0.05 * torch.randn(states.shape, generator=gen, dtype=DT)
    for mode in MODES:
        got = gn.bind(cell, x, states).propagate(direct, mode=mode)
        torch.testing.assert_close(got, ref.propagate(direct, mode=mode), rtol=0, atol=1e-10)
        assert gn.report()["converged"] == 1.0


def test_preactivation_space_is_exact_after_one_iteration():
    cell, x, states = setup("elman")
    gn = GaussNewtonInverse(reg=0.5, space="preactivation").bind(cell, x, states)
    gn.invert(3, states[:, 3] + 0.2 * torch.randn(states[:, 3].shape, dtype=DT))
    report = gn.report()
    assert report["gn_iterations_max"] == 1.0 and report["converged"] == 1.0


def test_output_and_preactivation_spaces_are_different_objectives():
    """Identity Elman: the same problem, so the same inverse; tanh: the output space weights the fit by phi'."""
    for nonlinearity, same in (("identity", True), ("tanh", False)):
        cell, x, states = setup("elman", nonlinearity=nonlinearity)
        v = states[:, 3] + 0.2 * torch.randn(states[:, 3].shape, dtype=DT)
        out = GaussNewtonInverse(reg=0.5, **TIGHT).bind(cell, x, states).invert(3, v)
        pre = GaussNewtonInverse(reg=0.5, space="preactivation", **TIGHT).bind(cell, x, states).invert(3, v)
        assert ((out - pre).abs().max() < 1e-10) == same


# -- 2. output space = a dense float64 solve of the same objective ---------------------------------------------------

@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("line_search", [True, False])
def test_output_space_matches_dense_solve(kind, line_search):
    cell, x, states = setup(kind)
    reg = 0.5
    gn = GaussNewtonInverse(reg=reg, line_search=line_search, **TIGHT).bind(cell, x, states)
    gen = torch.Generator().manual_seed(2)
    for t in (1, 3, 5):
        v = states[:, t] + 0.15 * torch.randn(states[:, t].shape, generator=gen, dtype=DT)
        delta = torch.randn(states[:, t].shape, generator=gen, dtype=DT)
        got, lin = gn.invert(t, v), gn.linearized(t, delta)
        for b in range(states.shape[0]):
            fn, prev = row_problem(cell, x, states, t, b)
            torch.testing.assert_close(got[b], dense_gauss_newton(fn, prev, v[b], reg), rtol=0, atol=1e-8)
            torch.testing.assert_close(lin[b], dense_linearized(fn, prev, delta[b], reg), rtol=0, atol=1e-10)
    assert gn.report()["converged"] == 1.0


# -- 3. psi_t(s_t) = s_{t-1} ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_no_iteration_at_the_forward_state(kind):
    """``psi_t(s_t) = s_{t-1}`` (checked for every solver in tests/test_contract.py) costs no Gauss-Newton step."""
    cell, x, states = setup(kind)
    gn = GaussNewtonInverse(reg=0.3).bind(cell, x, states)
    for t in range(1, states.shape[1]):
        gn.invert(t, states[:, t])
    assert gn.report()["gn_iterations_max"] <= 1.0  # 0 when f(s_{t-1}, x_t) reproduces s_t bit for bit


# -- 4. convergence rates --------------------------------------------------------------------------------------------

def test_gauss_newton_converges_fast_on_a_gru():
    """Per row, the error falls geometrically with the iterations, at a rate that shrinks with the target shift
    (Gauss-Newton's local rate is proportional to the residual at the solution; 0 for a reachable target)."""
    cell, x, states = setup("gru", batch=6, hidden=8)
    reg, t = 0.5, 3
    noise = torch.randn(states[:, t].shape, dtype=DT)
    rates = []
    for shift in (0.2, 0.05):
        v = states[:, t] + shift * noise
        exact = torch.stack([dense_gauss_newton(*row_problem(cell, x, states, t, b), v[b], reg)
                             for b in range(states.shape[0])])
        errors = [(states[:, t - 1] - exact).norm(dim=-1)]  # [B] per iteration count
        for k in (1, 2, 3, 4):
            gn = GaussNewtonInverse(reg=reg, tol=0.0, max_iter=k, cg_tol=0.0).bind(cell, x, states)
            errors.append((gn.invert(t, v) - exact).norm(dim=-1))
            assert gn.report()["gn_iterations_max"] == k
        ratios = torch.stack([e1 / e0 for e0, e1 in pairwise(errors)])  # [4, B]
        assert float(ratios.max()) < 0.25, ratios  # at least geometric
        assert float(errors[-1].max() / errors[0].max()) < 1e-4
        rates.append(ratios.mean())
    assert float(rates[1]) < 0.5 * float(rates[0]), rates  # faster for a smaller shift


def test_conjugate_gradient_is_exact_after_state_size_iterations():
    cell, x, states = setup("lstm", hidden=6)  # S = 12
    reg, t = 0.05, 4
    delta = torch.randn(states[:, t].shape, dtype=DT)
    exact = torch.stack([dense_linearized(*row_problem(cell, x, states, t, b), delta[b], reg)
                         for b in range(states.shape[0])])
    gn = GaussNewtonInverse(reg=reg, cg_tol=0.0).bind(cell, x, states)
    got = gn.linearized(t, delta)
    assert float((got - exact).norm() / exact.norm()) < 1e-12
    assert gn.report()["cg_iterations_max"] <= cell.state_size
    few = GaussNewtonInverse(reg=reg, cg_tol=0.0, cg_max_iter=2).bind(cell, x, states).linearized(t, delta)
    assert float((few - exact).norm() / exact.norm()) > 1e-6


# -- batching, line search, dtypes -----------------------------------------------------------------------------------

def test_line_search_decreases_the_objective_far_from_the_solution():
    cell, x, states = setup("gru", batch=16, hidden=6)
    reg, t = 0.05, 3
    v = states[:, t] + 1.5 * torch.randn(states[:, t].shape, dtype=DT)  # far away, partly unreachable
    start = objective(cell, x, states, t, v, states[:, t - 1], reg)
    values = [start]
    for k in (1, 2, 4, 8):
        gn = GaussNewtonInverse(reg=reg, tol=0.0, max_iter=k).bind(cell, x, states)
        values.append(objective(cell, x, states, t, v, gn.invert(t, v), reg))
    for before, after in pairwise(values):
        assert bool((after <= before * (1 + 1e-12)).all())
    assert bool((values[-1] < 0.9 * start).all())


def test_float32_follows_float64():
    cell64, x64, states64 = setup("gru", batch=8, steps=10, hidden=6)
    cell32, x32, states32 = setup("gru", batch=8, steps=10, hidden=6, dtype=torch.float32)
    direct = 0.1 * torch.randn(states64.shape, dtype=DT)
    for mode in [m for m, rule in RULES.items() if "gru" in rule.cells]:
        ref = GaussNewtonInverse(reg=1.0).bind(cell64, x64, states64).propagate(direct, mode=mode)
        gn = GaussNewtonInverse(reg=1.0).bind(cell32, x32, states32)
        got = gn.propagate(direct.float(), mode=mode)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)
        assert gn.report()["converged"] == 1.0, gn.report()


# -- 5. diagnostics and errors ---------------------------------------------------------------------------------------

def test_report_keys_and_values():
    cell, x, states = setup("gru", steps=7)
    gn = GaussNewtonInverse(reg=0.5, max_iter=15)
    direct = 0.1 * torch.randn(states.shape, dtype=DT)
    for mode, inverts, linears in (("linearized", 0, 6), ("difference", 12, 0), ("exact", 6, 0)):
        gn.bind(cell, x, states)
        assert gn.report()["invert_calls"] == 0.0  # reset at bind
        gn.propagate(direct, mode=mode)
        report = gn.report()
        assert set(report) == REPORT_KEYS and all(isinstance(v, float) for v in report.values())
        assert report["invert_calls"] == inverts and report["linearized_calls"] == linears
        assert report["converged"] == 1.0
        assert 1 <= report["cg_iterations_max"] <= cell.state_size
        assert 0 < report["cg_iterations_mean"] <= report["cg_iterations_max"]
        if mode == "linearized":
            assert report["gn_iterations_max"] == 0.0
            assert report["final_relative_residual_max"] <= gn.cg_tol
        else:
            assert 1 <= report["gn_iterations_max"] <= gn.max_iter
            assert 0 < report["gn_iterations_mean"] <= report["gn_iterations_max"]
            assert report["final_relative_residual_max"] <= gn.tol
            assert 0 <= report["final_gradient_norm_max"] < 1e-5
    unconverged = GaussNewtonInverse(reg=0.5, max_iter=1, tol=1e-12).bind(cell, x, states)
    unconverged.propagate(direct, mode="exact")
    assert unconverged.report()["converged"] == 0.0


def test_errors():
    cell, x, states = setup("gru")
    with pytest.raises(TypeError, match="preactivation"):
        GaussNewtonInverse(reg=1.0, space="preactivation").bind(cell, x, states)
    for reg in (0.0, -1.0):
        with pytest.raises(ValueError, match="reg"):
            GaussNewtonInverse(reg=reg)
    for options, name in (({"space": "input"}, "space"), ({"max_iter": 0}, "max_iter"),
                          ({"cg_max_iter": 0}, "cg_max_iter"), ({"tol": -1.0}, "tol"), ({"eps": 1.0}, "eps"),
                          ({"max_backtracks": -1}, "max_backtracks")):
        with pytest.raises(ValueError, match=name):
            GaussNewtonInverse(reg=1.0, **options)
    with pytest.raises(ValueError, match="shape"):
        GaussNewtonInverse(reg=1.0).bind(cell, x, states[..., :3])
