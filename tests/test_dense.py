"""The dense inverse: its Jacobians, its solves against Gauss-Newton-CG and an independent dense computation, the
choice of ``solver="auto"``, and whole TP iterations with it."""

from __future__ import annotations

import pytest
import torch

import seqtp
from seqtp.inverses import DENSE_MAX_STATE, auto_solver_name, make_solver
from seqtp.inverses.dense import LINEAR_SOLVERS, factorize, step_jacobian

F64 = torch.float64
MODULES = {
    "elman": lambda d, h: torch.nn.RNN(d, h, batch_first=True),
    "gru": lambda d, h: torch.nn.GRU(d, h, batch_first=True),
    "lstm": lambda d, h: torch.nn.LSTM(d, h, batch_first=True),
}
REG = 0.5


def _setup(kind: str, *, batch=4, seq_len=7, input_size=3, hidden=5, seed=0):
    torch.manual_seed(seed)
    module = MODULES[kind](input_size, hidden).to(F64)
    cell = seqtp.make_cell(module)
    x = torch.randn(batch, seq_len, input_size, dtype=F64)
    states = cell.unroll(x)  # [B, T, S]
    direct = 0.1 * torch.randn_like(states)  # [B, T, S]
    return module, cell, x, states, direct


def _reference_jacobians(cell, state, x):
    """``d f / d s`` ``[N, S, S]`` row by row with ``torch.autograd.functional.jacobian``."""
    return torch.stack([torch.autograd.functional.jacobian(lambda u, n=n: cell.step(u, x[n]), state[n])
                        for n in range(state.shape[0])])


@pytest.mark.parametrize("kind", list(MODULES))
def test_step_jacobian_equals_autograd(kind):
    _, cell, _, _, _ = _setup(kind)
    state = 0.7 * torch.randn(6, cell.state_size, dtype=F64)
    x = torch.randn(6, cell.input_size, dtype=F64)
    ref = _reference_jacobians(cell, state, x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(step_jacobian(cell, state, x).dense(), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", list(MODULES))
def test_factor_solves_the_normal_equations(kind):
    """The (block-eliminated) factor solves ``(J^T J + r I) x = b`` and gives ``(J^T J + r I)^{-1} J^T d``."""
    _, cell, _, _, _ = _setup(kind)
    state = 0.7 * torch.randn(6, cell.state_size, dtype=F64)
    x = torch.randn(6, cell.input_size, dtype=F64)
    jac = _reference_jacobians(cell, state, x)  # [N, S, S]
    gram = jac.mT @ jac + REG * torch.eye(cell.state_size, dtype=F64)  # [N, S, S]
    factor = factorize(step_jacobian(cell, state, x), REG)
    b, d = torch.randn(2, 6, cell.state_size, dtype=F64)
    torch.testing.assert_close(factor.solve(b), torch.linalg.solve(gram, b), rtol=0, atol=1e-12)
    expected = torch.linalg.solve(gram, (jac.mT @ d.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(factor.linearized(d), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS)
@pytest.mark.parametrize("kind", list(MODULES))
def test_linearized_equals_independent_dense_solve(kind, linear_solver):
    """Every step of the linearized rule against ``(J^T J + r I)^{-1} J^T delta`` from autograd Jacobians, and the
    whole propagation against the same recursion written out densely (chunked over steps: two steps per chunk)."""
    _, cell, x, states, direct = _setup(kind)
    batch, seq_len, size = states.shape
    solver = seqtp.DenseInverse(reg=REG, chunk_bytes=2 * batch * size * size * 8,
                                linear_solver=linear_solver).bind(cell, x, states)
    prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)  # [B, T, S]
    eye = torch.eye(size, dtype=F64)
    delta = direct[:, -1]
    expected = [delta]
    for t in range(seq_len - 1, 0, -1):
        jac = _reference_jacobians(cell, prev[:, t], x[:, t])  # [B, S, S]
        step = torch.linalg.solve(jac.mT @ jac + REG * eye, (jac.mT @ delta.unsqueeze(-1)).squeeze(-1))  # [B, S]
        torch.testing.assert_close(solver.linearized(t, delta), step, rtol=0, atol=1e-12)
        delta = direct[:, t - 1] + step
        expected.append(delta)
    expected = torch.stack(expected[::-1], dim=1)  # [B, T, S]
    solver.bind(cell, x, states)
    torch.testing.assert_close(solver.propagate(direct, mode="linearized"), expected, rtol=0, atol=1e-12)
    assert solver.report()["factorized_steps"] == seq_len - 1


@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_dense_equals_gauss_newton_output_space(kind, mode):
    _, cell, x, states, direct = _setup(kind)
    dense = seqtp.DenseInverse(reg=REG, tol=1e-13, max_iter=50).bind(cell, x, states)
    gn = seqtp.GaussNewtonInverse(reg=REG, space="output", tol=1e-13, max_iter=50, cg_tol=1e-14).bind(cell, x, states)
    got, ref = dense.propagate(direct, mode=mode), gn.propagate(direct, mode=mode)
    assert (got - states).abs().max() > 1e-3  # the shifts are not trivial
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    if mode != "linearized":
        report = dense.report()
        assert report["converged"] == 1.0 and report["gn_iterations_max"] >= 1


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_invert_is_the_regularized_inverse(kind):
    """``psi_t(v)``: zero gradient of the objective, and ``psi_t(s_t) = s_{t-1}``."""
    _, cell, x, states, _ = _setup(kind)
    solver = seqtp.DenseInverse(reg=REG, tol=1e-14, max_iter=50).bind(cell, x, states)
    t = 3
    v = states[:, t] + 0.3 * torch.randn_like(states[:, t])
    u = solver.invert(t, v).requires_grad_()
    objective = (cell.step(u, x[:, t]) - v).square().sum() + REG * (u - states[:, t - 1]).square().sum()
    (grad,) = torch.autograd.grad(objective, u)
    assert grad.abs().max() < 1e-10
    torch.testing.assert_close(solver.invert(t, states[:, t]), states[:, t - 1], rtol=0, atol=1e-14)


def test_auto_choice():
    small = {kind: seqtp.make_cell(MODULES[kind](2, 8)) for kind in MODULES}
    assert auto_solver_name(small["elman"]) == "analytic"
    assert auto_solver_name(small["gru"]) == "dense" and auto_solver_name(small["lstm"]) == "dense"
    assert isinstance(make_solver("auto", cell=small["gru"], reg=1.0), seqtp.DenseInverse)
    big_gru = seqtp.make_cell(MODULES["gru"](2, DENSE_MAX_STATE + 1))
    big_lstm = seqtp.make_cell(MODULES["lstm"](2, DENSE_MAX_STATE // 2 + 1))  # S = 2H > DENSE_MAX_STATE
    edge_lstm = seqtp.make_cell(MODULES["lstm"](2, DENSE_MAX_STATE // 2))
    assert auto_solver_name(big_gru) == "gauss_newton" == auto_solver_name(big_lstm)
    assert auto_solver_name(edge_lstm) == "dense"
    assert seqtp.SOLVERS["dense"] is seqtp.DenseInverse


@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_tp_iterations_equal_with_dense_and_gauss_newton(kind, update):
    """Three TP training steps (linearized rule) move the weights identically with either solver."""
    weights = {}
    for solver, options in (("dense", {}), ("gauss_newton", {"cg_tol": 1e-14})):
        module, _, x, _, _ = _setup(kind, batch=6, seq_len=9)
        head = torch.nn.Linear(5, 3).to(F64)
        y = torch.randint(0, 3, (6,))
        params = [*module.parameters(), *head.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1)
        gn_options = options if solver == "gauss_newton" else None
        for _ in range(3):
            optimizer.zero_grad()
            seqtp.tp_backward(module, x, lambda s, head=head, y=y: torch.nn.functional.cross_entropy(head(s[:, -1]), y),
                              reg=REG,
                              target_lr=0.5, update=update, solver=solver, solver_options=gn_options)
            optimizer.step()
        weights[solver] = torch.cat([p.detach().flatten() for p in params])
    assert (weights["dense"] - torch.cat([p.detach().flatten() for p in _initial_params(kind)])).abs().max() > 1e-4
    torch.testing.assert_close(weights["dense"], weights["gauss_newton"], rtol=0, atol=1e-10)


def _initial_params(kind):
    module, _, _, _, _ = _setup(kind, batch=6, seq_len=9)
    head = torch.nn.Linear(5, 3).to(F64)
    return [*module.parameters(), *head.parameters()]


def test_options_are_checked():
    for bad in ({"tol": -1.0}, {"max_iter": 0}, {"max_backtracks": -1}, {"chunk_bytes": 0}, {"reg": 0.0},
                {"linear_solver": "lu"}, {"cg_tol": -1.0}, {"cg_max_iter": 0}, {"cg_check_every": 0}):
        with pytest.raises(ValueError):
            seqtp.DenseInverse(**{"reg": 1.0, **bad})
    with pytest.raises(ValueError, match="solver 'dense'"):
        make_solver("dense", cell=seqtp.make_cell(MODULES["gru"](2, 4)), reg=1.0, space="output")


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS)
def test_non_finite_states_raise_factorization_error(linear_solver):
    _, cell, x, states, direct = _setup("gru")
    states = states.clone()
    states[0, 2, 0] = float("nan")
    with pytest.raises(seqtp.FactorizationError):
        seqtp.DenseInverse(reg=REG, linear_solver=linear_solver).bind(cell, x, states).propagate(direct)


@pytest.mark.parametrize("cg_tol", [1e-3, 1e-7])
@pytest.mark.parametrize("kind", list(MODULES))
def test_cg_equals_cholesky_within_its_tolerance(kind, cg_tol):
    """Each CG step is within ``cond * cg_tol`` (relative, ``cond = (|J|^2 + r) / r``) of the Cholesky step, where
    ``|s_k| <= cg_tol |s_0|``; whole propagations with the default tolerance agree to roundoff."""
    _, cell, x, states, direct = _setup(kind, hidden=8)
    cg = seqtp.DenseInverse(reg=REG, linear_solver="cg", cg_tol=cg_tol).bind(cell, x, states)
    chol = seqtp.DenseInverse(reg=REG, linear_solver="cholesky").bind(cell, x, states)
    prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)  # [B, T, S]
    for t in range(1, states.shape[1]):
        delta = direct[:, t] + 0.5 * torch.randn_like(direct[:, t])  # [B, S]
        got, ref = cg.linearized(t, delta), chol.linearized(t, delta)  # [B, S]
        sigma = torch.linalg.matrix_norm(_reference_jacobians(cell, prev[:, t], x[:, t]), ord=2)  # [B]
        bound = (sigma.square() + REG) / REG * cg_tol * ref.norm(dim=-1)  # [B]
        assert ((got - ref).norm(dim=-1) <= bound + 1e-14).all()
    report = cg.report()
    assert report["cg_relative_residual_max"] <= cg_tol and report["cg_iterations_max"] >= 1
    cg = seqtp.DenseInverse(reg=REG).bind(cell, x, states)
    chol.bind(cell, x, states)
    torch.testing.assert_close(cg.propagate(direct), chol.propagate(direct), rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", list(MODULES))
def test_cg_error_falls_with_iterations(kind):
    """With ``cg_tol = 0`` the error of the CG step against the Cholesky step falls strictly with ``cg_max_iter``
    (CG's error norm is monotone) and reaches roundoff."""
    _, cell, x, states, direct = _setup(kind, hidden=8)
    t = 4
    ref = seqtp.DenseInverse(reg=REG, linear_solver="cholesky").bind(cell, x, states).linearized(t, direct[:, t])
    errors = []
    for iters in (1, 2, 3, 4, cell.state_size):  # CG reaches u* in S iterations in exact arithmetic
        cg = seqtp.DenseInverse(reg=REG, cg_tol=0.0, cg_max_iter=iters).bind(cell, x, states)
        errors.append(float((cg.linearized(t, direct[:, t]) - ref).norm(dim=-1).max()))  # the largest row error
        assert cg.report()["cg_iterations_max"] == iters
    assert errors[0] > 1e-4 * float(ref.norm(dim=-1).max())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-12
