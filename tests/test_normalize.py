"""Bengio (2020)'s normalization through time (``TargetProp(normalize=True)``, :func:`seqtp.methods.influence_weights`)
and the DTP preset. Float64, small instances."""

from __future__ import annotations

import pytest
import torch

import seqtp
from seqtp._cells import make_cell
from seqtp.methods import influence_weights, local_update_loss

F64 = torch.float64


def scaled_orthogonal_problem(c: float, *, hidden=5, seq_len=6, batch=3, seed=0, nonlinearity="identity"):
    """A model with ``W = c Q`` (``Q`` orthogonal), a last-step regression loss, inputs and targets."""
    torch.manual_seed(seed)
    model = seqtp.RNNModel(2, hidden, 2, nonlinearity=nonlinearity).to(F64)
    gen = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=F64))
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(c * q)
    x = 0.5 * torch.randn(batch, seq_len, 2, generator=gen, dtype=F64)
    y = torch.randn(batch, 2, generator=gen, dtype=F64)
    return model, x, lambda h: (model.readout(h[:, -1]) - y).square().sum(-1).mean()


def rnn_grads(model, method, x, loss_fn) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    method.backward(model, x, loss_fn)
    return torch.cat([p.grad.flatten() for p in model.rnn.parameters()])


def bptt_grads(model, x, loss_fn) -> torch.Tensor:
    return rnn_grads(model, seqtp.BPTT(), x, loss_fn)


@pytest.mark.parametrize("c", [0.7, 1.0, 1.3])
def test_normalized_update_is_bptt_for_a_scaled_orthogonal_linear_cell(c):
    """``W = c Q``, identity activation, ``reg -> 0``: the target shifts are ``c^{-k}`` times the adjoint's direction
    and ``lambda_t delta_t`` is the adjoint itself, so the normalized local update is ``target_lr`` x BPTT's
    gradient. ``reg = 1e-9`` leaves a relative error ``~ reg / c^2 * T ~ 1e-8``; without the normalization the update
    is off by factors ``c^{2k}`` (checked for ``c != 1``: the negative control)."""
    model, x, loss_fn = scaled_orthogonal_problem(c)
    gamma = 0.1
    expected = gamma * bptt_grads(model, x, loss_fn)
    on = seqtp.TargetProp(reg=1e-9, target_lr=gamma, update="local", normalize=True, solver="analytic")
    got = rnn_grads(model, on, x, loss_fn)
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    off = seqtp.TargetProp(reg=1e-9, target_lr=gamma, update="local", solver="analytic")
    err_off = float((rnn_grads(model, off, x, loss_fn) - expected).norm() / expected.norm())
    assert err_off < 1e-6 if c == 1.0 else err_off > 1e-2


def test_influence_weights_formula_and_zero_shifts():
    gen = torch.Generator().manual_seed(0)
    direct = torch.randn(3, 4, 2, generator=gen, dtype=F64)
    deltas = torch.randn(3, 4, 2, generator=gen, dtype=F64)
    deltas[1, 0] = 0.0
    lam = influence_weights(direct, deltas)
    for b in range(3):
        for t in range(4):
            reach = sum(float(direct[b, s].square().sum()) for s in range(t, 4))
            size = float(deltas[b, t].square().sum())
            expected = reach / size if size > 0 else 0.0
            assert lam[b, t].item() == pytest.approx(expected, rel=1e-12)


def test_normalized_update_is_the_gradient_of_the_weighted_local_loss():
    """Independent computation: autograd of ``(1/B) sum_b sum_t lambda_{b,t}/2 |f(s_{t-1}, x_t) - v_t|^2``."""
    model, x, loss_fn = scaled_orthogonal_problem(0.9, nonlinearity="tanh")
    method = seqtp.TargetProp(reg=0.5, target_lr=0.2, update="local", normalize=True, mode="difference")
    states, deltas = method.targets(model, x, loss_fn)
    hidden = states.detach().requires_grad_()
    (dl_dh,) = torch.autograd.grad(loss_fn(hidden), hidden)
    direct = -0.2 * x.shape[0] * dl_dh
    lam = influence_weights(direct, deltas)  # [B, T]
    cell = make_cell(model, detach=False)
    prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    pred = cell.step(prev, x)  # [B, T, H]
    # weighted loss: the residual of step t is -delta_t, so its lambda-weighted gradient fits lambda_t * delta_t
    weighted = local_update_loss(cell, x, states, states + lam.unsqueeze(-1) * deltas)
    del pred
    model.zero_grad(set_to_none=True)
    weighted.backward()
    expected = torch.cat([p.grad.flatten() for p in model.rnn.parameters()])
    got = rnn_grads(model, method, x, loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    # and the weights matter here
    plain = rnn_grads(model, seqtp.TargetProp(reg=0.5, target_lr=0.2, update="local", mode="difference"), x, loss_fn)
    assert float((plain - got).norm() / got.norm()) > 1e-2


def test_dtp_is_the_preset_of_its_parts():
    model, x, loss_fn = scaled_orthogonal_problem(1.0, nonlinearity="tanh")
    preset = seqtp.DTP(target_lr=0.1, feedback_lr=0.05, noise=0.2, seed=3)
    parts = seqtp.TargetProp(reg=1.0, target_lr=0.1, mode="difference", update="local", solver="learned",
                             solver_options={"feedback_lr": 0.05, "noise": 0.2, "seed": 3})
    for _ in range(3):
        assert torch.equal(rnn_grads(model, preset, x, loss_fn), rnn_grads(model, parts, x, loss_fn))
    assert seqtp.METHODS["dtp"] is seqtp.DTP


def test_normalize_is_an_option_of_every_tp_method_that_fits_targets_locally():
    """TP, DTP and DRL take ``normalize``; on a scaled-orthogonal linear cell it changes their update."""
    model, x, loss_fn = scaled_orthogonal_problem(1.3)
    for make in (lambda n: seqtp.TargetProp(reg=0.1, target_lr=0.1, update="local", normalize=n),
                 lambda n: seqtp.DTP(target_lr=0.1, normalize=n), lambda n: seqtp.DRL(target_lr=0.1, normalize=n)):
        on, off = rnn_grads(model, make(True), x, loss_fn), rnn_grads(model, make(False), x, loss_fn)
        assert float((on - off).norm() / off.norm()) > 1e-3
    on = seqtp.tp_backward(model.rnn, x, lambda h: loss_fn(h), reg=0.1, target_lr=0.1, normalize=True)
    assert isinstance(on, float)
