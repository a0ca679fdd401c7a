"""Float64 tests of L-DRL (Ernoult et al., "Towards Scaling Difference Target Propagation by Learning Backprop
Targets", ICML 2022): DTP through time with the gated linear feedback ``G_t(s) = Q (D_t s) + c`` trained by the local
difference reconstruction loss, against BPTT, closed-form expectations and independent computations."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import seqtp
from seqtp._cells import activation_grad_from_output, make_cell
from seqtp.config import method_options
from seqtp.methods.ldrl import LDRL, GatedLinearFeedback, feedback_angle, ldrl_loss

F64 = torch.float64


def make_problem(*, batch=8, seq_len=8, hidden=8, input_size=3, nonlinearity="tanh", readout="last", cell="elman",
                 seed=0, dtype=F64):
    """``(model, x, loss_fn)``: an :class:`seqtp.RNNModel` (orthogonal ``W``), inputs ``N(0, 1)`` and an MSE loss
    (per sample: summed over the steps for ``readout="all"``; a batch mean)."""
    torch.manual_seed(seed)
    model = seqtp.RNNModel(input_size, hidden, 2, cell=cell, nonlinearity=nonlinearity, readout=readout).to(dtype)
    x = torch.randn(batch, seq_len, input_size, dtype=dtype)
    y = torch.randn(batch, 2, dtype=dtype) if readout == "last" else torch.randn(batch, seq_len, 2, dtype=dtype)

    def loss_fn(states):
        out = model.read(states)  # [B, 2] or [B, T, 2]
        return (out - y).square().reshape(batch, -1).sum(-1).mean()

    return model, x, loss_fn


def rnn_params(model):
    return dict(model.rnn.named_parameters())


def bptt(model, x, loss_fn):
    """Independent reference: ``(loss, {name: dL/dtheta}, adjoints lambda_t = dL/dh_t [B, T, H])`` by autograd through
    the cell's steps unrolled one tensor per step (so ``lambda_t`` includes every later step)."""
    cell = make_cell(model, detach=False)
    params = rnn_params(model)
    s, steps = cell.initial_state(x), []
    for t in range(x.shape[1]):
        s = cell.step(s, x[:, t])  # [B, H]
        steps.append(s)
    loss = loss_fn(torch.stack(steps, dim=1))
    grads = torch.autograd.grad(loss, [*params.values(), *steps])
    return loss.detach(), dict(zip(params, grads[: len(params)], strict=True)), torch.stack(grads[len(params):], 1)


def set_feedback(method, model, x, loss_fn, q):
    """Build the method's feedback (one ``targets`` call with ``feedback_steps=0``) and set ``Q`` directly."""
    method.targets(model, x, loss_fn)
    with torch.no_grad():
        method.feedback.Q.copy_(q)


# -- 1. with Q = W^T the method is BPTT scaled by target_lr ----------------------------------------------------------


@pytest.mark.parametrize(("nonlinearity", "readout", "init"),
                         [("tanh", "last", "set"), ("tanh", "all", "set"), ("tanh", "all", "symmetric"),
                          ("relu", "all", "set"), ("identity", "last", "set")])
def test_transposed_feedback_gives_scaled_bptt(nonlinearity, readout, init):
    """With ``Q = W^T``, ``G_t(v_t) - G_t(h_t) = W^T (D_t delta_t)`` is BPTT's adjoint step, so ``delta_t = -gamma B
    lambda_t`` and the local update ``dL_loc/dz_t = -D_t delta_t / B = gamma D_t lambda_t`` is ``gamma`` times the
    BPTT gradient. Both are sums of a few O(1) products in float64, so they agree to ~1e-15 relative: tolerance
    1e-12 of the largest entry."""
    gamma = 0.3
    model, x, loss_fn = make_problem(nonlinearity=nonlinearity, readout=readout, hidden=6)
    if init == "symmetric":
        method = LDRL(target_lr=gamma, feedback_steps=0, init="symmetric")
    else:
        method = LDRL(target_lr=gamma, feedback_steps=0)
        set_feedback(method, model, x, loss_fn, model.rnn.weight_hh_l0.detach().T)
    ref_loss, grads, adjoint = bptt(model, x, loss_fn)
    states, deltas = method.targets(model, x, loss_fn)
    expected = -gamma * x.shape[0] * adjoint  # [B, T, H]
    torch.testing.assert_close(deltas, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    model.zero_grad()
    loss, stats = method.backward(model, x, loss_fn)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    for name, p in rnn_params(model).items():
        torch.testing.assert_close(p.grad, gamma * grads[name], rtol=0, atol=1e-12 * float(grads[name].abs().max()))
    assert float(stats["feedback_angle"]) < 1e-5 and float(stats["feedback_distance"]) < 1e-14
    assert math.isnan(float(stats["feedback_loss"]))  # no feedback steps


def test_untransposed_feedback_is_not_bptt():
    """Negative control: ``Q = W`` (orthogonal, not symmetric) leaves a gap of order one."""
    model, x, loss_fn = make_problem(hidden=6)
    method = LDRL(target_lr=0.3, feedback_steps=0)
    set_feedback(method, model, x, loss_fn, model.rnn.weight_hh_l0.detach())
    _, grads, _ = bptt(model, x, loss_fn)
    model.zero_grad()
    method.backward(model, x, loss_fn)
    w = "weight_hh_l0"
    gap = (model.rnn.weight_hh_l0.grad - 0.3 * grads[w]).norm() / (0.3 * grads[w]).norm()
    assert gap > 0.1


def test_one_step_sequence():
    """``T = 1``: no step back, no feedback loss (``nan``); the update is ``gamma`` times the gradient for any ``Q``."""
    model, x, loss_fn = make_problem(seq_len=1, hidden=5)
    _, grads, _ = bptt(model, x, loss_fn)
    model.zero_grad()
    _, stats = LDRL(target_lr=0.5).backward(model, x, loss_fn)
    assert math.isnan(float(stats["feedback_loss"]))
    for name, p in rnn_params(model).items():
        torch.testing.assert_close(p.grad, 0.5 * grads[name], rtol=1e-12, atol=1e-15)


# -- 2. the loss, its expectation and its gradient -----------------------------------------------------------------


def one_step_instance(hidden=6, seed=0):
    """One step ``t`` of an Elman tanh RNN: ``(cell, x_t, h_{t-1}, h_t, gate, W)`` with ``h_{t-1} != 0``."""
    torch.manual_seed(seed)
    rnn = torch.nn.RNN(3, hidden, batch_first=True).double()
    cell = make_cell(rnn)
    x = torch.randn(1, 2, 3, dtype=F64)
    with torch.no_grad():
        s = cell.unroll(x)  # [1, 2, H]
    gate = activation_grad_from_output(s[0, 1], "tanh")  # [H]
    return cell, x[0, 1], s[0, 0], s[0, 1], gate, cell.params["weight_hh_l0"]


def test_loss_expectation():
    """``E[L_t] = sigma^2 (|J_G - J_f^T|_F^2 - |J_f|_F^2) + O(sigma^4)`` (``J_G = Q D``, ``J_f = D W``).

    (a) Plain Monte Carlo at ``sigma = 0.1``, N = 20,000 probe pairs: the mean agrees with the closed form within 4
    standard errors (SE from the sample standard deviation; it is ~0.7% of the value here). The ``O(sigma^4)``
    remainder is ~2e-4 relative (measured in (b)), below 0.05 SE, so 4 SE bounds the sampling error alone
    (two-sided normal tail 6e-5; the probes are seeded). Negative controls: the formula with ``J_f`` untransposed,
    and without ``-|J_f|^2``, are many SE away.

    (b) The remainder: ``L_t / sigma^2`` minus its quadratic part ``-2 z^T J_G J_f z + |J_G e|^2`` (probes ``xi =
    sigma z``, ``eta = sigma e``), whose expectation is exactly the closed form over ``sigma^2``, estimates
    ``(E[L_t] - closed) / sigma^2`` with a small variance (a control variate); antithetic probes ``+-z`` cancel its
    odd orders pair by pair. On common probes it is ``c sigma^2 (1 + O(sigma^2))``: halving ``sigma`` divides it by
    4 (``E[L_t] - closed = O(sigma^4)``, the odd orders vanish for symmetric noise), checked within 5% over
    ``sigma = 0.2, 0.1, 0.05`` (the ``O(sigma^2)`` correction measured 2% at 0.2), and it is nonzero by > 5 SE.
    """
    cell, xt, prev, cur, gate, w = one_step_instance()
    torch.manual_seed(1)
    q = torch.randn(6, 6, dtype=F64) / math.sqrt(6)  # a feedback far from W^T
    jg, jf = q * gate, gate[:, None] * w  # [H, H]: Q D, D W
    closed_unit = (jg - jf.T).square().sum() - jf.square().sum()  # closed form / sigma^2
    n = 20_000
    gen = torch.Generator().manual_seed(2)
    z, e = torch.randn(n, 6, generator=gen, dtype=F64), torch.randn(n, 6, generator=gen, dtype=F64)  # [N, H]

    sigma = 0.1
    losses = ldrl_loss(cell, xt, prev, cur, gate, q, sigma * z, sigma * e)  # [N]
    mean, se = losses.mean(), losses.std() / math.sqrt(n)
    closed = sigma**2 * closed_unit
    assert abs(float(mean - closed)) < 4 * float(se), (float(mean), float(closed), float(se))
    untransposed = sigma**2 * ((jg - jf).square().sum() - jf.square().sum())
    no_norm_term = sigma**2 * (jg - jf.T).square().sum()
    for wrong in (untransposed, no_norm_term):
        assert abs(float(mean - wrong)) > 10 * float(se)

    quad = -2 * ((z @ jf.T @ jg.T) * z).sum(-1) + (e @ jg.T).square().sum(-1)  # [N]: exact mean closed_unit
    remainders, ses = [], []
    for s in (0.2, 0.1, 0.05):
        plus = ldrl_loss(cell, xt, prev, cur, gate, q, s * z, s * e)
        minus = ldrl_loss(cell, xt, prev, cur, gate, q, -s * z, s * e)
        r = 0.5 * (plus + minus) / s**2 - quad  # [N]
        remainders.append(float(r.mean()))
        ses.append(float(r.std()) / math.sqrt(n))
    assert all(abs(r) > 5 * se for r, se in zip(remainders, ses, strict=True)), (remainders, ses)
    for big, small in zip(remainders, remainders[1:], strict=False):
        assert big / small == pytest.approx(4, rel=0.05), remainders
    assert abs(remainders[1]) < 1e-3 * float(closed_unit.abs())  # the remainder is negligible against (a)'s SE


def test_training_step_is_sgd_on_the_documented_loss():
    """One feedback step equals plain SGD on the batch mean of :func:`ldrl_loss` over ``t = 2 .. T`` divided by
    ``sigma^2``, by autograd, with the probes redrawn from the saved generator state (``xi`` then ``eta``,
    ``[P, B, T-1, H]``; ``P = 1`` here); the reported ``feedback_loss`` is that loss before the step."""
    model, x, loss_fn = make_problem(batch=4, seq_len=5, hidden=5)
    method = LDRL(feedback_steps=0, feedback_probes=16, feedback_lr=0.1, noise=0.2, seed=3)
    method.targets(model, x, loss_fn)  # builds Q (orthogonal init) without a step
    method.feedback_steps = 1
    q0, gen_state = method.feedback.Q.detach().clone(), method.generator.get_state()
    _, stats = method.backward(model, x, loss_fn)

    cell = make_cell(model)
    with torch.no_grad():
        states = model.states(x)  # [B, T, H]
    gate = activation_grad_from_output(states, "tanh")
    gen = torch.Generator().set_state(gen_state)
    shape = (1, 4, 4, 5)
    xi = 0.2 * torch.randn(shape, generator=gen, dtype=F64)
    eta = 0.2 * torch.randn(shape, generator=gen, dtype=F64)
    q = q0.clone().requires_grad_()
    loss = ldrl_loss(cell, x[:, 1:], states[:, :-1], states[:, 1:], gate[:, 1:], q, xi, eta).mean() / 0.2**2
    (grad,) = torch.autograd.grad(loss, q)
    torch.testing.assert_close(method.feedback.Q.detach(), q0 - 0.1 * grad, rtol=1e-12, atol=1e-14)
    assert float(stats["feedback_loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert torch.equal(method.feedback.c.detach(), torch.zeros(5, dtype=F64))  # c cancels: never trained


def test_expected_gradient_contracts_towards_the_transpose():
    """The expected gradient of the normalized loss is ``2 (Q - W^T) M``, ``M = mean_{b,t} D_t^2`` (+ O(sigma^2)):
    one SGD step with N = 200,000 probe rows estimates it. Each entry's sampling error is ~sqrt(8 m / N) (m ~ 0.7:
    ~5e-3), ~0.5% of the gradient's norm in Frobenius norm; ``sigma = 0.02`` makes the bias ~4e-4 relative. Tolerance
    3% (~6 SE); negative control: ``2 (Q - W) M`` (untransposed) is off by > 30%."""
    model, x, loss_fn = make_problem(batch=4, seq_len=5, hidden=5)
    lr = 0.1
    method = LDRL(feedback_steps=0, feedback_probes=200_000, feedback_lr=lr, noise=0.02, seed=4)
    method.targets(model, x, loss_fn)
    method.feedback_steps = 1
    q0 = method.feedback.Q.detach().clone()
    method.targets(model, x, loss_fn)
    estimate = (q0 - method.feedback.Q.detach()) / lr  # [H, H]
    with torch.no_grad():
        states = model.states(x)
    m = activation_grad_from_output(states[:, 1:], "tanh").square().mean(dim=(0, 1))  # [H]
    w = model.rnn.weight_hh_l0.detach()
    expected = 2 * (q0 - w.T) * m  # [H, H]: columns scaled by M
    assert float((estimate - expected).norm() / expected.norm()) < 0.03
    assert float((estimate - 2 * (q0 - w) * m).norm() / expected.norm()) > 0.3


# -- 3. training aligns the feedback and the update with BPTT --------------------------------------------------------


def test_training_aligns_with_bptt():
    """Fixed forward weights, one batch (B = T = H = 8), default options: 30 ``backward`` calls take the angle
    between ``Q`` and ``W^T`` from ~70 degrees to below 1 (measured 0.45; the noise floor of SGD with these
    defaults is ~0.4-0.5 degrees) and the update's cosine with the BPTT gradient to >= 0.99 (measured 0.9999).
    ``feedback_loss`` then approaches its minimum ``-mean_{b,t} |D_t W|_F^2`` (within 5%: the ``O(sigma^2)``
    remainder and the residual ``|(Q - W^T) D_t|^2`` are ~1%). Negative control: the untrained (orthogonal) feedback
    is not aligned (cosine < 0.9)."""
    model, x, loss_fn = make_problem()
    method = LDRL()
    untrained = seqtp.alignment(model, x, loss_fn, LDRL(feedback_steps=0))
    angles = []
    for _ in range(30):
        model.zero_grad()
        _, stats = method.backward(model, x, loss_fn)
        angles.append(float(stats["feedback_angle"]))
    frozen = copy.deepcopy(method)
    frozen.feedback_steps = 0  # the alignment of the feedback as the 30 calls left it
    out = seqtp.alignment(model, x, loss_fn, frozen)
    assert angles[0] > 10 and angles[-1] < 1.0, angles
    assert out["cosine"] >= 0.99 and untrained["cosine"] < 0.9, (out["cosine"], untrained["cosine"])
    step_cos = out["step_cosine"]
    assert float(step_cos[~step_cos.isnan()].min()) > 0.99
    with torch.no_grad():
        states = model.states(x)
    gate = activation_grad_from_output(states[:, 1:], "tanh")  # [B, T-1, H]
    w = model.rnn.weight_hh_l0.detach()
    minimum = -(gate[..., :, None] * w).square().sum(dim=(-2, -1)).mean()  # -mean |D_t W|_F^2
    assert float(stats["feedback_loss"]) == pytest.approx(float(minimum), rel=0.05)


# -- 4. the Method contract ------------------------------------------------------------------------------------------


def test_backward_accumulates_and_the_readout_gets_its_gradient():
    model, x, loss_fn = make_problem(hidden=5)
    method = LDRL(seed=1)
    fresh = copy.deepcopy(method)
    model.zero_grad()
    fresh.backward(model, x, loss_fn)
    update = {n: p.grad.clone() for n, p in model.named_parameters()}
    preset = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = preset[n].clone()
    loss, stats = method.backward(model, x, loss_fn)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, preset[n] + update[n], rtol=1e-15, atol=1e-15)
    model.zero_grad()
    ref = loss_fn(model.states(x))
    ref.backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-13)
    for n, p in model.readout.named_parameters():
        torch.testing.assert_close(update[f"readout.{n}"], p.grad, rtol=1e-13, atol=1e-15)
    assert set(stats) == {"feedback_loss", "feedback_angle", "feedback_distance", "shift_first", "shift_mid",
                          "shift_last"}
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad for v in stats.values())


def test_clip_keeps_the_direction():
    """``clip``: the global norm of every parameter's ``.grad`` (readout included) is clipped as in BPTT, the
    direction kept; ``grad_norm`` reports the norm before clipping."""
    model, x, loss_fn = make_problem(hidden=5)
    model.zero_grad()
    LDRL(seed=2).backward(model, x, loss_fn)
    full = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    _, stats = LDRL(seed=2, clip=0.5 * float(full.norm())).backward(model, x, loss_fn)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(stats["grad_norm"]) == pytest.approx(float(full.norm()), rel=1e-12)
    torch.testing.assert_close(clipped, 0.5 * full, rtol=1e-6, atol=1e-12)  # clip_grad_norm_ adds 1e-6 to the norm


def test_targets_write_no_grad():
    model, x, loss_fn = make_problem(hidden=5)
    states, deltas = LDRL().targets(model, x, loss_fn)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(states, model.states(x).detach())
    assert deltas.shape == states.shape and not deltas.requires_grad and bool(deltas.abs().sum() > 0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_round_trip_is_exact(momentum):
    """Two calls equal one call, save (through ``torch.save``), load into a differently seeded instance, one call:
    the same gradients, stats and feedback bit for bit (``Q``, ``c``, SGD buffers and the noise generator are
    restored); the saved dict is a copy."""
    model, x, loss_fn = make_problem(hidden=5)
    opts = dict(feedback_momentum=momentum, feedback_steps=5, seed=7)

    def call(method):
        model.zero_grad()
        _, stats = method.backward(model, x, loss_fn)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, stats

    straight = LDRL(**opts)
    assert straight.state_dict() == {}
    call(straight)
    grads_a, stats_a = call(straight)

    first = LDRL(**opts)
    call(first)
    saved = first.state_dict()
    q_saved = saved["Q"].clone()
    call(first)  # advances first; the saved copy must not move
    assert torch.equal(saved["Q"], q_saved)
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    resumed = LDRL(**(opts | {"seed": 99, "init": "zeros"}))
    resumed.load_state_dict(torch.load(buf))
    grads_b, stats_b = call(resumed)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    for k in stats_a:
        assert torch.equal(stats_a[k], stats_b[k]), k
    assert torch.equal(straight.feedback.Q, resumed.feedback.Q)
    resumed.load_state_dict({})  # a no-op
    # negative control: without the generator state the next call differs
    other = LDRL(**opts)
    other.load_state_dict(saved | {"generator": torch.Generator().manual_seed(123).get_state()})
    assert not torch.equal(call(other)[0]["rnn.weight_hh_l0"], grads_a["rnn.weight_hh_l0"])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_other_cells_are_refused(cell):
    model, x, loss_fn = make_problem(cell=cell, hidden=4)
    with pytest.raises(TypeError, match="Elman cells only"):
        LDRL().backward(model, x, loss_fn)
    with pytest.raises(TypeError, match="Elman cells only"):
        LDRL().targets(model, x, loss_fn)


def test_size_mismatch_float32_and_invalid_options():
    model, x, loss_fn = make_problem(hidden=5)
    method = LDRL()
    method.backward(model, x, loss_fn)
    other, x2, loss2 = make_problem(hidden=4)
    with pytest.raises(ValueError, match="hidden_size"):
        method.backward(other, x2, loss2)
    model32, x32, loss32 = make_problem(hidden=5, dtype=torch.float32)
    m32 = LDRL()
    _, stats = m32.backward(model32, x32, loss32)
    assert m32.feedback.Q.dtype == torch.float32 and all(torch.isfinite(v) for v in stats.values())
    assert model32.rnn.weight_hh_l0.grad.dtype == torch.float32
    for bad in ({"target_lr": 0.0}, {"feedback_lr": -1.0}, {"noise": 0.0}, {"feedback_steps": -1},
                {"feedback_probes": 0}, {"feedback_momentum": 1.0}, {"init": "identity"}, {"clip": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LDRL(**bad)


def test_config_schema():
    """Every option has a simple type (the config schema derives from the signature); the search space and the
    defaults name real fields."""
    options = method_options(LDRL)
    assert set(options) == {"target_lr", "feedback_lr", "noise", "feedback_steps", "feedback_probes",
                            "feedback_momentum", "init", "seed", "normalize", "clip"}
    fields = set(options) | {"optimizer", "lr", "momentum", "nesterov"}
    assert {spec.split("=")[0] for spec in LDRL.search_space} <= fields
    assert set(LDRL.config_defaults) <= fields and LDRL.has_targets


def test_feedback_module_and_angle():
    """``G(h + d) - G(h) = Q (gate * d)`` (``c`` cancels); the orthogonal init is deterministic and orthogonal;
    ``feedback_angle`` on a closed case: ``Q = cos(a) W^T + sin(a) A``, ``A`` Frobenius-orthogonal to ``W^T`` with
    ``|A| = |W|``, has angle ``a``."""
    gen = torch.Generator().manual_seed(0)
    fb = GatedLinearFeedback(4, generator=gen, dtype=F64)
    fb2 = GatedLinearFeedback(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(fb.Q, fb2.Q)
    torch.testing.assert_close(fb.Q.T @ fb.Q, torch.eye(4, dtype=F64))
    with torch.no_grad():
        fb.c.normal_()
    h, d, gate = (torch.randn(3, 4, dtype=F64) for _ in range(3))
    torch.testing.assert_close(fb.difference(d, gate), fb(h + d, gate) - fb(h, gate), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="weight_hh"):
        GatedLinearFeedback(4, init="symmetric")
    w = torch.randn(4, 4, dtype=F64)
    a = torch.randn(4, 4, dtype=F64)
    a = a - (a * w.T).sum() / w.square().sum() * w.T  # Frobenius-orthogonal to W^T
    a = a * w.norm() / a.norm()
    for deg in (0.0, 30.0, 90.0, 150.0):
        rad = math.radians(deg)
        angle, dist = feedback_angle(math.cos(rad) * w.T + math.sin(rad) * a, w)
        assert float(angle) == pytest.approx(deg, abs=1e-6)
        assert float(dist) == pytest.approx(math.sqrt(2 - 2 * math.cos(rad)), rel=1e-12, abs=1e-12)


def test_the_feedback_is_a_solver_on_which_every_rule_agrees():
    """``LDRLFeedback`` as an inverse ``psi_t(v) = h_{t-1} + Q (D_t (v - h_t))`` is affine in ``v`` with
    ``psi_t(h_t) = h_{t-1}``, so the linearized, difference and exact rules give the same targets (to rounding), and
    ``TargetProp(solver="ldrl", mode="difference", update="local")`` is LDRL without the clip, bit for bit."""
    model, x, loss_fn = make_problem(batch=3, seq_len=6, hidden=5)
    shifts = {}
    for mode in ("linearized", "difference", "exact"):
        tp = seqtp.TargetProp(reg=1.0, target_lr=0.5, mode=mode, update="local",
                              solver=seqtp.inverses.LDRLFeedback(feedback_steps=2, feedback_probes=64, seed=4))
        shifts[mode] = tp.targets(model, x, loss_fn)[1]
    torch.testing.assert_close(shifts["linearized"], shifts["difference"], rtol=0, atol=1e-15)
    torch.testing.assert_close(shifts["exact"], shifts["difference"], rtol=1e-12, atol=1e-14)
    opts = {"feedback_steps": 2, "feedback_probes": 64, "seed": 4}
    grads = []
    for method in (LDRL(target_lr=0.5, **opts),
                   seqtp.TargetProp(reg=1.0, target_lr=0.5, mode="difference", update="local",
                                    solver=seqtp.inverses.LDRLFeedback(**opts))):
        model.zero_grad(set_to_none=True)
        method.backward(model, x, loss_fn)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
