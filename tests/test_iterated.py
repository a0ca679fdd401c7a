"""Float64 tests of the iterated approximate inverse (Bengio 2020, arXiv:2007.15139)."""

from __future__ import annotations

import math

import pytest
import torch

import seqtp
from seqtp._cells import make_cell
from seqtp.inverses import AnalyticInverse, InverseSolver, IteratedInverse, LearnedInverse, make_solver

F64 = torch.float64
SIGMAS = (0.5, 0.8, 0.9, 1.0, 1.1, 1.2)  # singular values of W: sigma_min = 0.5


def elman_problem(*, nonlinearity="identity", batch=5, seq_len=7, input_size=3, seed=0, scale=1.0):
    """An Elman cell whose ``W = Q1 diag(SIGMAS) Q2^T`` has known singular values, inputs and forward states."""
    torch.manual_seed(seed)
    hidden = len(SIGMAS)
    model = seqtp.RNNModel(input_size, hidden, 2, nonlinearity=nonlinearity).to(F64)
    gen = torch.Generator().manual_seed(seed + 1)
    q1, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=F64))
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(scale * q1 @ torch.diag(torch.tensor(SIGMAS, dtype=F64)) @ q2.T)
    cell = make_cell(model)
    x = 0.5 * torch.randn(batch, seq_len, input_size, dtype=F64)
    return cell, x, cell.unroll(x)


def rnn_problem(kind, *, batch=8, seq_len=10, input_size=3, hidden=6, seed=0):
    torch.manual_seed(seed)
    module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind](input_size, hidden, batch_first=True).to(F64)
    cell = make_cell(module)
    x = torch.randn(batch, seq_len, input_size, dtype=F64)
    return cell, x, cell.unroll(x)


def reachable_target(cell, x, states, t, *, size, seed=3):
    """``u* = s_{t-1} + perturbation`` ``[B, S]`` and ``v = f(u*, x_t)``: a target with a known exact preimage."""
    gen = torch.Generator().manual_seed(seed)
    u_star = states[:, t - 1] + size * torch.randn(states[:, t - 1].shape, generator=gen, dtype=F64)
    return u_star, cell.step(u_star, x[:, t])


def iterate_errors(cell, x, states, t, v, u_star, *, reg, max_steps, base=None):
    """``max_b |u_k - u*|`` for ``k = 1 .. max_steps`` (the iteration is deterministic: ``steps=k`` gives ``u_k``)."""
    errors = []
    for k in range(1, max_steps + 1):
        solver = IteratedInverse(reg=reg, steps=k, base=base).bind(cell, x, states)
        errors.append(float((solver.invert(t, v) - u_star).norm(dim=-1).max()))
    return errors


def contraction_bound(reg):
    """``|I - M W| = r / (sigma_min^2 + r)``: ``I - M W = r (W^T W + r I)^{-1}`` is symmetric positive definite."""
    return reg / (min(SIGMAS) ** 2 + reg)


def test_one_step_is_the_difference_target():
    """K = 1: ``u_1 = s_{t-1} + g(v) - g(s_t)``, the DTP difference target, to the last bit."""
    cell, x, states = elman_problem(nonlinearity="tanh")
    solver = IteratedInverse(reg=0.3, steps=1).bind(cell, x, states)
    base = AnalyticInverse(reg=0.3).bind(cell, x, states)
    for t in range(1, states.shape[1]):
        v = states[:, t] + 0.1 * torch.randn_like(states[:, t])  # [B, H]
        expected = states[:, t - 1] + base.difference(t, v - states[:, t])
        assert torch.equal(solver.invert(t, v), expected)
    report = solver.report()
    assert report["iterations"] == 1.0 and math.isnan(report["contraction_rate"])


def test_matrix_identity_of_the_contraction():
    """For the analytic base, ``I - M W = r (W^T W + r I)^{-1}`` and its norm is ``r / (sigma_min^2 + r)``."""
    cell, x, states = elman_problem()
    reg = 0.25
    solver = AnalyticInverse(reg=reg).bind(cell, x, states)
    w = cell.params["weight_hh_l0"]
    eye = torch.eye(w.shape[0], dtype=F64)
    contraction = eye - solver.inverse.M @ w  # [H, H]
    torch.testing.assert_close(contraction, reg * torch.linalg.inv(w.T @ w + reg * eye))
    assert float(torch.linalg.matrix_norm(contraction, ord=2)) == pytest.approx(contraction_bound(reg), rel=1e-10)


@pytest.mark.parametrize("nonlinearity", ["identity", "tanh"])
def test_error_shrinks_geometrically_at_the_predicted_rate(nonlinearity):
    """``|u_k - u*|`` shrinks by a near-constant ratio ``<= rho = r / (sigma_min^2 + r) < 1`` that tends to ``rho``
    (for an unsaturated tanh ``g o f`` is the same affine map), and the report's rate agrees."""
    cell, x, states = elman_problem(nonlinearity=nonlinearity, scale=0.6 if nonlinearity == "tanh" else 1.0)
    reg, t = 0.25 * (0.36 if nonlinearity == "tanh" else 1.0), 4  # same rho: sigma_min scales with `scale`
    rho = contraction_bound(0.25)
    u_star, v = reachable_target(cell, x, states, t, size=0.1)
    errors = iterate_errors(cell, x, states, t, v, u_star, reg=reg, max_steps=14)
    ratios = [b / a for a, b in zip(errors, errors[1:], strict=False)]
    assert all(r <= rho + 1e-6 for r in ratios), ratios
    assert ratios[-1] == pytest.approx(rho, rel=1e-3)
    assert max(ratios) - min(ratios) < 0.1  # geometric: roughly constant ratios
    solver = IteratedInverse(reg=reg, steps=14).bind(cell, x, states)
    solver.invert(t, v)
    rate = solver.report()["contraction_rate"]
    assert 0.9 * rho < rate <= rho + 1e-6


@pytest.mark.parametrize("nonlinearity", ["identity", "tanh"])
def test_converged_iterate_solves_the_step(nonlinearity):
    """For a reachable target ``v = f(u*)`` the fixed point is ``u*``: ``f(u_K) = v`` to high accuracy."""
    cell, x, states = elman_problem(nonlinearity=nonlinearity, scale=0.6 if nonlinearity == "tanh" else 1.0)
    solver = IteratedInverse(reg=0.05, steps=40).bind(cell, x, states)
    for t in (1, 3, 6):
        u_star, v = reachable_target(cell, x, states, t, size=0.2)
        u = solver.invert(t, v)
        torch.testing.assert_close(cell.step(u, x[:, t]), v, rtol=0, atol=1e-10)
        torch.testing.assert_close(u, u_star, rtol=0, atol=1e-9)
    # the single-step (difference) target does not solve it: the refinement is what makes the inverse exact
    u_1 = IteratedInverse(reg=0.05, steps=1).bind(cell, x, states).invert(6, v)
    assert float((cell.step(u_1, x[:, 6]) - v).norm()) > 1e-3


def test_large_reg_converges_slowly():
    """A large ``reg`` makes ``|I - M W| = r / (sigma_min^2 + r)`` close to 1: 5 steps barely reduce the error, and
    the report shows a rate close to 1 (the documented weak regime of the analytic base)."""
    cell, x, states = elman_problem()
    reg, t = 100.0, 4
    rho = contraction_bound(reg)  # 0.9975
    u_star, v = reachable_target(cell, x, states, t, size=0.1)
    errors = iterate_errors(cell, x, states, t, v, u_star, reg=reg, max_steps=5)
    assert errors[-1] > 0.95 * errors[0]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))  # still a contraction, only slow
    solver = IteratedInverse(reg=reg, steps=5).bind(cell, x, states)
    solver.invert(t, v)
    assert 0.98 < solver.report()["contraction_rate"] <= rho + 1e-9


class ScaledInverse(AnalyticInverse):
    """``g = alpha * psi``: a bad approximate inverse, ``I - G A = I - alpha M W`` has eigenvalues below -1."""

    def __init__(self, *, reg, alpha):
        super().__init__(reg=reg)
        self.alpha = alpha

    def invert(self, t, v):
        return self.alpha * super().invert(t, v)

    def linearized(self, t, delta):
        return self.alpha * super().linearized(t, delta)

    def difference(self, t, delta):
        return self.alpha * super().difference(t, delta)


def test_divergence_when_the_contraction_fails():
    """With ``Lip(g o f - I) > 1`` the iteration diverges and the report's rate says so (> 1)."""
    cell, x, states = elman_problem()
    reg, alpha, t = 0.01, 2.5, 4
    base = ScaledInverse(reg=reg, alpha=alpha)
    u_star, v = reachable_target(cell, x, states, t, size=0.1)
    errors = iterate_errors(cell, x, states, t, v, u_star, reg=reg, max_steps=8, base=base)
    assert errors[-1] > 10 * errors[0]
    solver = IteratedInverse(base=base, steps=8).bind(cell, x, states)
    solver.invert(t, v)
    rate = solver.report()["contraction_rate"]
    eye = torch.eye(len(SIGMAS), dtype=F64)
    radius = float(torch.linalg.eigvals(eye - alpha * base.inverse.M @ cell.params["weight_hh_l0"]).abs().max())
    assert radius > 1 and rate > 1
    assert rate == pytest.approx(radius, rel=0.05)


def test_guard_freezes_diverging_rows_only():
    """``guard=True``: rows stop at the first growing step, so the divergent case stays bounded (and says so in
    ``guarded``), while a contracting case is unchanged."""
    cell, x, states = elman_problem()
    t = 4
    u_star, v = reachable_target(cell, x, states, t, size=0.1)
    base = ScaledInverse(reg=0.01, alpha=2.5)
    free = IteratedInverse(base=base, steps=8).bind(cell, x, states).invert(t, v)
    guarded = IteratedInverse(base=base, steps=8, guard=True).bind(cell, x, states)
    u = guarded.invert(t, v)
    first = IteratedInverse(base=base, steps=1).bind(cell, x, states).invert(t, v)
    assert float((free - u_star).norm()) > 10 * float((first - u_star).norm())
    assert float((u - u_star).norm()) <= 2 * float((first - u_star).norm())
    assert guarded.report()["guarded"] == 1.0
    for rule in ("invert", "linearized"):
        plain = IteratedInverse(reg=0.25, steps=8).bind(cell, x, states)
        safe = IteratedInverse(reg=0.25, steps=8, guard=True).bind(cell, x, states)
        arg = v if rule == "invert" else v - states[:, t]
        torch.testing.assert_close(getattr(safe, rule)(t, arg), getattr(plain, rule)(t, arg), rtol=0, atol=0)
        assert safe.report()["guarded"] == 0.0 and "guarded" not in plain.report()


def test_tol_stops_early():
    cell, x, states = elman_problem()
    u_star, v = reachable_target(cell, x, states, 4, size=0.1)
    solver = IteratedInverse(reg=0.05, steps=50, tol=1e-8).bind(cell, x, states)
    solver.invert(4, v)
    report = solver.report()
    assert report["iterations"] < 50
    assert report["final_step_norm"] <= 1e-8


def test_linearized_is_the_jacobian_of_the_iteration():
    """The explicit linearized rule equals forward-mode autodiff of ``invert`` at ``s_t`` (same K)."""
    cell, x, states = elman_problem(nonlinearity="tanh", scale=0.6)
    solver = IteratedInverse(reg=0.2, steps=4).bind(cell, x, states)
    for t in (1, 5):
        delta = 0.1 * torch.randn_like(states[:, t])  # [B, H]
        _, expected = torch.func.jvp(lambda v, t=t: solver.invert(t, v), (states[:, t],), (delta,))
        torch.testing.assert_close(solver.linearized(t, delta), expected, rtol=1e-10, atol=1e-12)


def test_fixed_point_with_a_learned_base():
    """``psi_t(s_t) = s_{t-1}`` even over a base that is not a fixed point (analytic base: tests/test_contract.py)."""
    cell, x, states = rnn_problem("gru")
    solver = IteratedInverse(base=LearnedInverse(), steps=5).bind(cell, x, states)
    for t in range(1, states.shape[1]):
        torch.testing.assert_close(solver.invert(t, states[:, t]), states[:, t - 1], rtol=0, atol=1e-12)
        zero = solver.difference(t, torch.zeros_like(states[:, t]))
        torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-12)


def test_report_keys():
    cell, x, states = elman_problem(nonlinearity="tanh")
    solver = IteratedInverse(reg=0.3, steps=3).bind(cell, x, states)
    assert solver.report() == {}
    solver.propagate(0.01 * torch.randn_like(states), mode="difference")
    report = solver.report()
    assert set(report) == {"iterations", "contraction_rate", "final_step_norm", "calls"}
    assert report["calls"] == states.shape[1] - 1 and report["iterations"] == 3.0
    assert all(isinstance(v, float) for v in report.values())
    assert 0 < report["contraction_rate"] < 1
    solver.bind(cell, x, states)
    assert solver.report() == {}


@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
def test_propagate_all_modes(mode):
    cell, x, states = elman_problem(nonlinearity="tanh")
    direct = torch.zeros_like(states)
    direct[:, -1] = 0.05 * torch.randn_like(states[:, -1])
    deltas = IteratedInverse(reg=0.3, steps=5).bind(cell, x, states).propagate(direct, mode=mode, shift_cap=1.0)
    assert deltas.shape == states.shape and torch.isfinite(deltas).all()
    torch.testing.assert_close(deltas[:, -1], direct[:, -1])
    assert float(deltas[:, 0].norm()) > 0


class ChordInverse(InverseSolver):
    """``g(v) = s_{t-1} + J_f(s_{t-1})^{-1} (v - s_t)``: the local linear inverse, for any cell (iterating it is the
    chord method, which converges for targets close to ``s_t``)."""

    def bind(self, cell, x, states):
        super().bind(cell, x, states)
        batch, seq_len, size = states.shape
        jac = torch.func.vmap(torch.func.jacrev(cell.step))(self.prev.reshape(-1, size), x.reshape(batch * seq_len, -1))
        self.jinv = torch.linalg.inv(jac).reshape(batch, seq_len, size, size)  # [B, T, S, S]
        return self

    def invert(self, t, v):
        return self.prev[:, t] + (self.jinv[:, t] @ (v - self.states[:, t]).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(("kind", "size"), [("gru", 0.05), ("lstm", 1e-3)])
def test_gated_cells_with_a_local_linear_base_converge(kind, size):
    """GRU/LSTM: with a local linear inverse as ``g`` the iteration converges to ``f(u) = v`` for targets close
    enough to ``s_t`` (LSTM: the step's Jacobian has condition number ~1e4 here, so the basin is small; at
    ``size=0.05`` the iteration diverges)."""
    cell, x, states = rnn_problem(kind)
    solver = IteratedInverse(base=ChordInverse(reg=1.0), steps=30).bind(cell, x, states)
    t = 5
    u_star, v = reachable_target(cell, x, states, t, size=size)
    u = solver.invert(t, v)
    torch.testing.assert_close(cell.step(u, x[:, t]), v, rtol=0, atol=1e-10)
    assert solver.report()["contraction_rate"] < 0.5


def test_gru_with_a_learned_base():
    """GRU with a trained learned inverse as ``g``: more iterations reduce the residual ``|f(u) - v|``; ``fit`` and
    ``state_dict`` reach the base; all rules run."""
    cell, x, states = rnn_problem("gru")
    learned = LearnedInverse(feedback_lr=0.03, seed=1, reduction="sum")
    solver = IteratedInverse(base=learned, steps=20)
    assert solver.trainable and solver.stateful and not IteratedInverse().trainable
    for _ in range(400):
        solver.fit(cell, x, states)
    solver.bind(cell, x, states)
    t = 5
    _, v = reachable_target(cell, x, states, t, size=0.05)

    def residual(steps):
        u = IteratedInverse(base=learned, steps=steps).bind(cell, x, states).invert(t, v)
        return float((cell.step(u, x[:, t]) - v).norm(dim=-1).max())

    assert residual(20) < 0.25 * residual(1)
    for mode in ("linearized", "difference", "exact"):
        deltas = solver.propagate(0.01 * torch.randn_like(states), mode=mode)
        assert deltas.shape == states.shape and torch.isfinite(deltas).all()
    report = solver.report()
    assert {"iterations", "contraction_rate", "final_step_norm", "base_fit_loss"} <= set(report)
    assert solver.state_dict()["base"]["feedback"]["V"].shape == (6, 6)
    other = IteratedInverse(base=LearnedInverse(seed=5))
    other.load_state_dict(solver.state_dict())
    torch.testing.assert_close(other.base.feedback.V, learned.feedback.V, rtol=0, atol=0)


def test_invalid_options():
    with pytest.raises(ValueError):
        IteratedInverse(reg=1.0, steps=0)
    with pytest.raises(ValueError):
        IteratedInverse(reg=1.0, tol=-1.0)
    with pytest.raises(ValueError):
        IteratedInverse(reg=0.0)
    with pytest.raises(TypeError):
        IteratedInverse(base="analytic")
    cell, x, states = rnn_problem("gru")
    with pytest.raises(TypeError, match="base="):
        IteratedInverse(reg=1.0).bind(cell, x, states)


def test_make_solver_builds_it():
    """The name ``"iterated"`` of ``seqtp.SOLVERS`` maps here, with its own options."""
    cell, _, _ = elman_problem()
    assert seqtp.SOLVERS["iterated"] is IteratedInverse
    solver = make_solver("iterated", cell=cell, reg=0.5, steps=3, eps=1e-4)
    assert isinstance(solver, IteratedInverse) and solver.steps == 3 and solver.base.eps == 1e-4
