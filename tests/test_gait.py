"""Float64 tests of GAIT-prop through time (``seqtp.methods.gait``) against BPTT, its first-order expansion in
``gamma``, a literal implementation of the rule and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import seqtp
from seqtp._cells import activation_grad_from_output
from seqtp.inverses import FactorizationError
from seqtp.methods import local_update_grads
from seqtp.methods.gait import GAITProp, inverse_increment

F64 = torch.float64
B, T, D, H, C = 5, 7, 3, 6, 2
TARGET_LR = 0.7  # not 1, so that a missing or doubled target_lr factor shows


def make_problem(*, nonlinearity="tanh", scales=None, readout="last", seed=0, dtype=F64):
    """``(model, x, loss_fn)`` with an orthogonal ``W`` (from QR), times ``diag(scales)`` on the right if given."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = seqtp.RNNModel(D, H, C, nonlinearity=nonlinearity, readout=readout).to(dtype)
    q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=F64))  # [H, H] orthogonal
    if scales is not None:
        q = q * torch.as_tensor(scales, dtype=F64)  # [H, H]: columns scaled
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(q)
    x = torch.randn(B, T, D, generator=gen, dtype=F64).to(dtype)
    y = torch.randn(*((B, C) if readout == "last" else (B, T, C)), generator=gen, dtype=F64).to(dtype)

    def loss_fn(states):  # squared error per sample (summed over steps for readout="all"), batch mean
        return (model.read(states) - y).square().flatten(1).sum(-1).mean()

    return model, x, loss_fn


def rnn_grads(model, method=None, x=None, loss_fn=None):
    """The flat gradient of the RNN's parameters written by ``method.backward`` (BPTT's ``loss.backward()`` if
    ``None``), from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    if method is None:
        loss_fn(model.states(x)).backward()
    else:
        method.backward(model, x, loss_fn)
    return torch.cat([p.grad.flatten() for p in model.rnn.parameters()])


def rel_err(u, g):
    return float((u - g).norm() / g.norm())


def bptt_adjoint(model, x, loss_fn):
    """``dL/dh_t`` ``[B, T, H]`` (total derivative through later steps), from a graph with one tensor per step."""
    r = model.rnn
    h, steps = x.new_zeros(x.shape[0], H), []
    for t in range(x.shape[1]):
        z = x[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + r.bias_hh_l0 + h @ r.weight_hh_l0.T  # [B, H]
        h = seqtp._cells.activation(z, model.nonlinearity)
        steps.append(h)
    grads = torch.autograd.grad(loss_fn(torch.stack(steps, dim=1)), steps)
    return torch.stack(grads, dim=1).detach()  # [B, T, H]


def first_order_update(model, x, loss_fn, target_lr):
    """``u1`` with ``u(gamma) = target_lr * g + gamma * u1 + O(gamma^2)`` for tanh and orthogonal ``W``, from the
    expansion in GAITProp's docstring: ``eps = eps0 + gamma eps1``, ``eps0 = -target_lr B lambda``, ``eps1_T = 0``,
    ``eps1_{t-1} = W^T (phi'_t eps1_t + h_t phi'_t^2 eps0_t^2)`` (``a''(h)/2 phi'^4 = h phi'^2`` for tanh)."""
    states = model.states(x).detach()  # [B, T, H]
    eps0 = -target_lr * x.shape[0] * bptt_adjoint(model, x, loss_fn)  # [B, T, H]
    grad = activation_grad_from_output(states, "tanh")  # [B, T, H]
    w = model.rnn.weight_hh_l0.detach()
    eps1 = torch.zeros_like(eps0)
    for t in range(T - 1, 0, -1):
        eps1[:, t - 1] = (grad[:, t] * eps1[:, t] + states[:, t] * grad[:, t].square() * eps0[:, t].square()) @ w
    params = seqtp._cells.make_cell(model).elman_params()
    return _flat_rnn_order(local_update_grads(params, x, states, eps1))


def _flat_rnn_order(grads):
    """``(dU, dW, db)`` flattened in ``model.rnn.parameters()`` order (``weight_ih, weight_hh, bias_ih, bias_hh``)."""
    g_ih, g_hh, g_b = grads
    return torch.cat([g_ih.flatten(), g_hh.flatten(), g_b, g_b])


# ---------------------------------------------------------------------------------------------------------------------
# The theorem: orthogonal W


def test_orthogonal_tanh_converges_first_order_in_gamma():
    model, x, loss_fn = make_problem()
    g = TARGET_LR * rnn_grads(model, None, x, loss_fn)
    gammas = [1e-2, 1e-3, 1e-4, 1e-5]
    errs = [rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=gm), x, loss_fn), g) for gm in gammas]
    # least-squares slope of log err against log gamma: the theorem's first-order rate
    lx = torch.tensor([math.log(gm) for gm in gammas], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=F64)
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).square().sum())
    assert 0.8 <= slope <= 1.2, (slope, errs)  # measured 0.999
    # the constant err / gamma is the instance's (|u1| / |target_lr g|, 0.349 here; it scales with target_lr),
    # not 1/2; at gamma = 1e-6 the
    # error is that constant times 1e-6 (the next term is O(gamma^2): 1e-6 relative to the first; rounding of the
    # cancellation-free increment ~1e-16 / |h|, far below)
    const = float(first_order_update(model, x, loss_fn, TARGET_LR).norm() / g.norm())
    err6 = rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=1e-6), x, loss_fn), g)
    assert err6 == pytest.approx(const * 1e-6, rel=1e-3), (err6, const)
    assert 0.05 < const < 2  # the size measured: 0.349 (err / gamma 0.3473 at 1e-2 .. 0.34923 at 1e-6)


def test_first_order_coefficient_matches_the_expansion():
    """``(u(gamma) - target_lr g) / gamma -> u1`` of the docstring's expansion, with an ``O(gamma)`` remainder."""
    model, x, loss_fn = make_problem(seed=1)
    g = TARGET_LR * rnn_grads(model, None, x, loss_fn)
    u1 = first_order_update(model, x, loss_fn, TARGET_LR)
    rems = []
    for gm in (1e-3, 1e-4):
        u = rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=gm), x, loss_fn)
        rems.append(rel_err((u - g) / gm, u1))
    # the remainder is O(gamma) (ratio ~10 between the two gammas); its size at 1e-4 is ~1e-4 times an O(1) constant
    # and the rounding of (u - g) / gamma is ~1e-16 / 1e-4 = 1e-12; measured 7.4e-4 and 7.4e-5
    assert rems[1] < 1e-3 and 5 < rems[0] / rems[1] < 20, rems


def test_identity_activation_is_exact_for_any_gamma():
    model, x, loss_fn = make_problem(nonlinearity="identity")
    g = TARGET_LR * rnn_grads(model, None, x, loss_fn)
    for gm in (1.0, 1e-1, 1e-4):
        err = rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=gm), x, loss_fn), g)
        # a'' = 0: only rounding (W^{-1} by LU vs W^T, T steps of ~1e-16): measured 4.6e-16
        assert err < 1e-12, (gm, err)


def test_relu_is_exact_once_gamma_is_small():
    model, x, loss_fn = make_problem(nonlinearity="relu")
    g = TARGET_LR * rnn_grads(model, None, x, loss_fn)
    # exact once gamma |eps_t| < h_t on every active unit (measured 4.5e-16); at gamma = 10 increments leave the
    # active region on some units and the rule departs from BPTT (measured 0.29): a control that the test can fail
    assert rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=1e-4), x, loss_fn), g) < 1e-12
    assert rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=10.0), x, loss_fn), g) > 1e-3


def test_loss_at_every_step_adds_its_direct_target():
    """readout="all": dhat_t enters eps_t at every step; still target_lr * BPTT in the limit."""
    model, x, loss_fn = make_problem(readout="all", seed=2)
    g = TARGET_LR * rnn_grads(model, None, x, loss_fn)
    err = rel_err(rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=1e-7), x, loss_fn), g)
    assert err < 1e-6, err  # O(gamma) with an O(1) constant: measured 4.4e-8


# ---------------------------------------------------------------------------------------------------------------------
# Negative control and an independent implementation of the rule


def test_non_orthogonal_weights_leave_bptt_direction():
    scales = torch.linspace(0.3, 2.0, H)  # W = Q diag(s), far from orthogonal
    ortho = seqtp.alignment(*make_problem(), GAITProp(target_lr=TARGET_LR, gamma=1e-6))
    skew = seqtp.alignment(*make_problem(scales=scales), GAITProp(target_lr=TARGET_LR, gamma=1e-6))
    assert ortho["cosine"] > 1 - 1e-10  # measured 1 - 6e-14
    assert skew["cosine"] < 0.9, skew["cosine"]  # measured 0.092: W^{-1} != W^T


def test_targets_match_a_literal_implementation():
    """The targets against the rule as written, ``eps_{t-1} = W^{-1}(atanh(clamp(h_t + gamma phi'^2 eps_t)) - z_t)
    / gamma + dhat_{t-1}``, by ``torch.linalg.solve`` (non-orthogonal W, a loss at every step)."""
    gamma = 1e-3
    model, x, loss_fn = make_problem(scales=torch.linspace(0.5, 1.5, H), readout="all", seed=3)
    states, deltas = GAITProp(target_lr=TARGET_LR, gamma=gamma).targets(model, x, loss_fn)
    r = model.rnn
    w = r.weight_hh_l0.detach()
    h = model.states(x).detach()  # [B, T, H]
    leaf = h.clone().requires_grad_()
    (dl_dh,) = torch.autograd.grad(loss_fn(leaf), leaf)
    dhat = -TARGET_LR * B * dl_dh  # [B, T, H]
    prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)  # [B, T, H]: h_{t-1}
    z = (x @ r.weight_ih_l0.T + r.bias_ih_l0 + r.bias_hh_l0 + prev @ w.T).detach()  # [B, T, H]
    eps = torch.empty_like(h)
    eps[:, -1] = dhat[:, -1]
    for t in range(T - 1, 0, -1):
        v = h[:, t] + gamma * (1 - h[:, t].square()).square() * eps[:, t]  # [B, H]
        resid = torch.atanh(v.clamp(-1 + 1e-3, 1 - 1e-3)) - z[:, t]  # [B, H]
        eps[:, t - 1] = torch.linalg.solve(w, resid.T).T / gamma + dhat[:, t - 1]
    torch.testing.assert_close(states, h, rtol=0, atol=0)
    # the literal difference a(v) - z_t loses ~1e-16 / gamma = 1e-13 relative; measured ~1e-13
    torch.testing.assert_close(deltas, gamma * eps, rtol=1e-9, atol=1e-12)


def test_inverse_increment_against_the_plain_difference():
    gen = torch.Generator().manual_seed(4)
    h = torch.tanh(2 * torch.randn(50, generator=gen, dtype=F64))
    h[:3] = torch.tensor([0.9995, -0.9999, 0.999], dtype=F64)  # clamped (eps = 1e-3) or on the margin
    d = 1e-2 * torch.randn(50, generator=gen, dtype=F64)
    d[3] = 0.5  # drives the target past the clamp
    lo, hi = -1 + 1e-3, 1 - 1e-3
    plain = torch.atanh((h + d).clamp(lo, hi)) - torch.atanh(h.clamp(lo, hi))
    torch.testing.assert_close(inverse_increment(h, d, "tanh"), plain, rtol=1e-12, atol=1e-13)
    hr = torch.relu(torch.randn(50, generator=gen, dtype=F64))
    torch.testing.assert_close(inverse_increment(hr, d, "relu"), torch.relu(hr + d) - hr, rtol=0, atol=1e-15)
    # tiny increments: relative precision kept (the plain difference would lose ~1e-16 / 1e-12)
    tiny = 1e-12 * torch.ones(50, dtype=F64)
    safe = h.abs() < hi
    ratio = inverse_increment(h, tiny, "tanh")[safe] / (tiny[safe] / (1 - h[safe].square()))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-9, atol=0)


def test_float32_stays_accurate_and_nothing_underflows():
    """In float32 the update matches float32 BPTT to O(gamma) plus rounding, down to a tiny gamma: the errors are
    rescaled at every step and the increments computed without cancellation."""
    model, x, loss_fn = make_problem(dtype=torch.float32)
    g = rnn_grads(model, None, x, loss_fn)
    err = rel_err(rnn_grads(model, GAITProp(), x, loss_fn), g)
    # linearization 0.50 * 1e-3 (target_lr = 1; float64 gives 4.98e-4) plus float32 rounding: measured 4.98e-4
    assert err < 1e-3, err
    # gamma = 1e-20: the literal targets gamma^{T-t} * eps would be 0 in float32 (below 1e-45) for T - t >= 3, and
    # a(h + d) - a(h) by subtraction would be 0; only float32 rounding remains (BPTT in float32 vs float64: 1.3e-7)
    err = rel_err(rnn_grads(model, GAITProp(gamma=1e-20), x, loss_fn), g)
    assert err < 1e-5, err  # measured 2.4e-7


# ---------------------------------------------------------------------------------------------------------------------
# The penalty and the Method contract


def test_penalty_gradient_matches_finite_differences():
    lam = 0.3
    model, x, loss_fn = make_problem(scales=torch.linspace(0.6, 1.4, H), seed=5)
    w = model.rnn.weight_hh_l0

    def penalty(m):
        eye = torch.eye(H, dtype=F64)
        return lam / 4 * (m @ m.T - eye).square().sum()

    model.zero_grad(set_to_none=True)
    _, stats = GAITProp(ortho_penalty=lam).backward(model, x, loss_fn)
    with_pen = w.grad.clone()
    model.zero_grad(set_to_none=True)
    GAITProp().backward(model, x, loss_fn)
    grad = with_pen - w.grad  # [H, H]: the penalty's part
    base = w.detach().clone()
    fd = torch.empty_like(base)
    step = 1e-5
    for i in range(H):
        for j in range(H):
            e = torch.zeros_like(base)
            e[i, j] = step
            fd[i, j] = (penalty(base + e) - penalty(base - e)) / (2 * step)
    # central differences: O(step^2) = 1e-10 truncation of a quartic, rounding ~1e-16 / 1e-5 = 1e-11
    torch.testing.assert_close(grad, fd, rtol=1e-8, atol=1e-9)
    assert float(stats["ortho_penalty"]) == pytest.approx(float(penalty(base)), rel=1e-12)
    assert float(stats["ortho_defect"]) == pytest.approx(math.sqrt(float(penalty(base)) * 4 / lam), rel=1e-12)


def test_backward_accumulates_and_readout_gets_its_gradient():
    model, x, loss_fn = make_problem()
    method = GAITProp(target_lr=TARGET_LR, gamma=1e-3, ortho_penalty=0.1)
    model.zero_grad(set_to_none=True)
    loss_fn(model.states(x)).backward()
    readout_bptt = [p.grad.clone() for p in model.readout.parameters()]
    model.zero_grad(set_to_none=True)
    loss, stats = method.backward(model, x, loss_fn)
    once = [p.grad.clone() for p in model.parameters()]
    method.backward(model, x, loss_fn)
    for p, g in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-15, atol=0)  # accumulated, not overwritten
    for p, g in zip(model.readout.parameters(), readout_bptt, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-14, atol=1e-16)  # the ordinary gradient
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(loss_fn(model.states(x))), rel=1e-15)
    assert set(stats) == {"shift_first", "shift_mid", "shift_last", "ortho_defect", "ortho_penalty"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in stats.values())


def test_targets_write_no_grad_and_agree_with_backward():
    gamma = 1e-3
    model, x, loss_fn = make_problem(scales=torch.linspace(0.8, 1.2, H))
    method = GAITProp(target_lr=TARGET_LR, gamma=gamma)
    model.zero_grad(set_to_none=True)
    states, deltas = method.targets(model, x, loss_fn)
    assert all(p.grad is None for p in model.parameters())
    assert states.shape == deltas.shape == (B, T, H)
    _, stats = method.backward(model, x, loss_fn)
    norms = deltas.norm(dim=-1).mean(dim=0)  # [T]
    for key, t in (("shift_first", 0), ("shift_mid", T // 2), ("shift_last", T - 1)):
        assert float(stats[key]) == pytest.approx(float(norms[t]), rel=1e-14)
    # the update is the local update of v = h + delta divided by gamma
    params = seqtp._cells.make_cell(model).elman_params()
    expected = _flat_rnn_order(local_update_grads(params, x, states, deltas / gamma))
    got = torch.cat([p.grad.flatten() for p in model.rnn.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


def test_clip_bounds_the_global_norm():
    model, x, loss_fn = make_problem()
    model.zero_grad(set_to_none=True)
    GAITProp(target_lr=TARGET_LR).backward(model, x, loss_fn)
    free = torch.cat([p.grad.flatten() for p in model.parameters()])
    clip = 0.1 * float(free.norm())
    model.zero_grad(set_to_none=True)
    _, stats = GAITProp(target_lr=TARGET_LR, clip=clip).backward(model, x, loss_fn)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(stats["grad_norm"]) == pytest.approx(float(free.norm()), rel=1e-13)
    torch.testing.assert_close(clipped, free * (clip / free.norm()), rtol=1e-6, atol=0)  # torch adds 1e-6 to the norm


def test_config_schema_and_defaults():
    """The options form a config schema (``seqtp.config.method_options``) and the training defaults build."""
    from seqtp.config import method_options

    opts = method_options(GAITProp)
    assert {k: tp for k, (tp, _) in opts.items()} == {"target_lr": float, "gamma": float, "ortho_penalty": float,
                                                      "eps": float, "clip": float | None}
    optimizer_keys = {"optimizer", "lr", "momentum", "nesterov"}
    assert set(GAITProp.config_defaults) <= set(opts) | optimizer_keys
    GAITProp(**{k: v for k, v in GAITProp.config_defaults.items() if k not in optimizer_keys})
    keys = {item.split("=")[0] for item in GAITProp.search_space}
    assert keys <= set(opts) | optimizer_keys


def test_alignment_with_bptt():
    model, x, loss_fn = make_problem()
    out = seqtp.alignment(model, x, loss_fn, GAITProp(target_lr=TARGET_LR, gamma=1e-6))
    assert out["cosine"] > 1 - 1e-10  # O(gamma^2) in the cosine
    assert out["norm_ratio"] == pytest.approx(TARGET_LR, rel=1e-5)  # target_lr * (1 + O(gamma))
    assert torch.all(out["step_cosine"] > 1 - 1e-10)  # each shift along -dL/dh_t


def test_plain_torch_rnn_and_user_head():
    torch.manual_seed(6)
    rnn, head = nn.RNN(D, H, batch_first=True).double(), nn.Linear(H, C).double()
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=F64))
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(q)
    x, y = torch.randn(B, T, D, dtype=F64), torch.randn(B, C, dtype=F64)

    def loss_fn(states):
        return (head(states[:, -1]) - y).square().sum(-1).mean()

    out = seqtp.alignment(rnn, x, loss_fn, GAITProp(gamma=1e-6))
    assert out["cosine"] > 1 - 1e-10 and out["norm_ratio"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_cells_are_refused(cell):
    model = seqtp.RNNModel(D, H, C, cell=cell).double()
    x = torch.randn(B, T, D, dtype=F64)
    with pytest.raises(TypeError, match="Elman"):
        GAITProp().backward(model, x, lambda s: s.square().mean())
    with pytest.raises(TypeError, match="Elman"):
        GAITProp().targets(model, x, lambda s: s.square().mean())


def test_singular_weight_is_refused():
    model, x, loss_fn = make_problem()
    with torch.no_grad():
        model.rnn.weight_hh_l0[0].zero_()
    with pytest.raises(FactorizationError, match="singular"):
        GAITProp().backward(model, x, loss_fn)


@pytest.mark.parametrize(("kwargs", "name"), [({"target_lr": 0.0}, "target_lr"), ({"gamma": -1e-3}, "gamma"),
                                              ({"ortho_penalty": -1.0}, "ortho_penalty"), ({"eps": 1.0}, "eps")])
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GAITProp(**kwargs)


# -- the parts: GAIT's rule and the exact inverse ------------------------------------------------------------------

@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_gait_is_target_prop_with_the_exact_inverse_and_gait_rule(nonlinearity):
    """GAITProp without penalty and clip is TargetProp composed of the registered parts, bit for bit."""
    model, x, loss_fn = make_problem(nonlinearity=nonlinearity, scales=[1.2, 0.9, 1.0, 1.1, 0.8, 1.0])
    gait = rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=1e-3), x, loss_fn)
    composed = seqtp.TargetProp(reg=1.0, target_lr=TARGET_LR, mode="gait", solver="exact", update="local")
    assert torch.equal(rnn_grads(model, composed, x, loss_fn), gait)
    other_gamma = seqtp.TargetProp(reg=1.0, target_lr=TARGET_LR, mode=seqtp.GaitRule(1e-6), solver="exact",
                                   update="local")
    assert torch.equal(rnn_grads(model, other_gamma, x, loss_fn),
                       rnn_grads(model, GAITProp(target_lr=TARGET_LR, gamma=1e-6), x, loss_fn))


def test_exact_inverse_is_the_zero_reg_limit_of_the_analytic_inverse():
    """``M = (W^T W + r I)^{-1} W^T = W^{-1} + O(r)`` and ``N = O(r)``: the regularized inverse converges to the
    exact one at first order in ``reg`` (log-log slope 1 over three decades)."""
    model, x, _ = make_problem(scales=[1.2, 0.9, 1.0, 1.1, 0.8, 1.0])
    cell = seqtp.make_cell(model)
    states = cell.unroll(x)
    noise = torch.randn(states[:, 4].shape, generator=torch.Generator().manual_seed(3), dtype=F64)  # [B, H]
    v = torch.tanh(torch.atanh(states[:, 4]) + 0.1 * noise)  # [B, H]: a target inside the atanh clamp
    exact = seqtp.ExactInverse().bind(cell, x, states)
    target = exact.invert(4, v)
    # the exact inverse maps f's output back to its input (where the atanh clamp does not bind)
    torch.testing.assert_close(cell.step(target, x[:, 4]), v, rtol=0, atol=1e-12)
    regs = [1e-3, 1e-4, 1e-5, 1e-6]
    errs = [float((seqtp.AnalyticInverse(reg=r).bind(cell, x, states).invert(4, v) - target).norm()) for r in regs]
    slopes = [math.log10(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(abs(s - 1) < 0.02 for s in slopes), (errs, slopes)


def test_gait_rule_options_and_cells():
    with pytest.raises(ValueError, match="gamma"):
        seqtp.GaitRule(0.0)
    assert seqtp.RULES["gait"].gamma == 1e-3 and seqtp.RULES["gait"].cells == ("elman",)
    assert seqtp.SOLVERS["exact"] is seqtp.ExactInverse and seqtp.ExactInverse().cells == ("elman",)
    with pytest.raises(ValueError, match="eps"):
        seqtp.ExactInverse(eps=1.0)


def test_gait_rule_through_a_regularized_inverse_runs_the_generic_recursion():
    """The analytic inverse runs GAIT's rule by the generic recursion (not its fused rules); as ``reg -> 0`` the
    update approaches the exact inverse's."""
    model, x, loss_fn = make_problem()
    exact = rnn_grads(model, seqtp.TargetProp(reg=1.0, target_lr=TARGET_LR, mode="gait", solver="exact"), x, loss_fn)
    errs = []
    for reg in (1e-2, 1e-3):
        approx = seqtp.TargetProp(reg=reg, target_lr=TARGET_LR, mode="gait", solver="analytic")
        errs.append(rel_err(rnn_grads(model, approx, x, loss_fn), exact))
    assert errs[1] < errs[0] / 5 and errs[1] < 1e-2, errs
