"""Float64 tests of the math core against independent computations."""

from __future__ import annotations

import pytest
import torch

import seqtp
from seqtp._cells import ElmanParams, elman_forward, elman_params, inverse_activation
from seqtp.inverses import ElmanInverse, cap_shift

F64 = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODES = ["linearized", "difference", "exact"]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    return torch.device(request.param)


def make_problem(device, *, nonlinearity="tanh", batch=5, seq_len=7, input_size=3, hidden=6, seed=0, scale=0.5):
    """A float64 model, inputs and forward states (moderate pre-activations, so tanh stays far from +-1)."""
    torch.manual_seed(seed)
    model = seqtp.RNNModel(input_size, hidden, 2, nonlinearity=nonlinearity).to(device, F64)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.9)
    x = scale * torch.randn(batch, seq_len, input_size, dtype=F64, device=device)
    with torch.no_grad():
        states = model.states(x)
    return model, x, states


def test_psi_equals_lstsq_of_stacked_system(device):
    """psi_t(v) = argmin_u |a(v) - W u - c|^2 + r |u - h|^2, solved as least squares of [W; sqrt(r) I] u."""
    model, x, states = make_problem(device)
    params = elman_params(model)
    reg = 0.7
    inv = ElmanInverse(params, reg=reg)
    hidden = states.shape[-1]
    v = states[:, 3] + 0.1 * torch.randn_like(states[:, 3])  # [B, H]
    h_prev, drive = states[:, 2], inv.drive(x)[:, 3]  # [B, H] each
    eye = torch.eye(hidden, dtype=F64, device=device)
    lhs = torch.cat([params.weight_hh, reg**0.5 * eye]).expand(v.shape[0], 2 * hidden, hidden)  # [B, 2H, H]
    rhs = torch.cat([inverse_activation(v, "tanh") - drive, reg**0.5 * h_prev], dim=-1)  # [B, 2H]
    expected = torch.linalg.lstsq(lhs.cpu(), rhs.cpu().unsqueeze(-1)).solution.squeeze(-1)  # [B, H]
    torch.testing.assert_close(inv.invert(v, h_prev, drive).cpu(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["tanh", "identity"])
def test_psi_inverts_the_forward_step(device, nonlinearity):
    """psi_t(h_t) = h_{t-1} at every step (not for relu, whose a(v) = max(v, 0) loses negative pre-activations)."""
    model, x, states = make_problem(device, nonlinearity=nonlinearity)
    inv = ElmanInverse(elman_params(model), reg=0.3)
    recovered = inv.invert(states[:, 1:], states[:, :-1], inv.drive(x)[:, 1:])  # [B, T-1, H]
    torch.testing.assert_close(recovered, states[:, :-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_linearized_rule_is_jacobian_of_psi(device, nonlinearity):
    """The linearized target rule equals the Jacobian of psi_t at h_t (torch.func.jvp) applied to the shift,
    composed through time, with direct shifts added at every step."""
    model, x, states = make_problem(device, nonlinearity=nonlinearity)
    reg = 0.5
    inv = ElmanInverse(elman_params(model), reg=reg)
    drive = inv.drive(x)
    direct = 1e-2 * torch.randn_like(states)  # [B, T, H]
    targets = seqtp.propagate_targets(model, x, states, direct, reg=reg, mode="linearized")
    # independent recursion: delta_{t-1} = dhat_{t-1} + J_psi_t(h_t) delta_t
    delta = direct[:, -1]
    expected = [delta]
    for t in range(states.shape[1] - 1, 0, -1):
        def psi(v, t=t):
            return inv.invert(v, states[:, t - 1], drive[:, t])

        _, jd = torch.func.jvp(psi, (states[:, t],), (delta,))
        delta = direct[:, t - 1] + jd
        expected.insert(0, delta)
    torch.testing.assert_close(targets - states, torch.stack(expected, dim=1), rtol=1e-10, atol=1e-13)


def test_difference_agrees_with_linearized_to_first_order(device):
    """|v_diff - v_lin| = O(s^2) when the direct shifts scale like s: halving s divides the gap by about 4."""
    model, x, states = make_problem(device, seq_len=12)
    direct = torch.randn_like(states)
    gaps = []
    for s in (1e-4, 5e-5, 2.5e-5):
        lin = seqtp.propagate_targets(model, x, states, s * direct, reg=1.0, mode="linearized")
        dif = seqtp.propagate_targets(model, x, states, s * direct, reg=1.0, mode="difference")
        gaps.append((lin - dif).norm().item())
    rates = [gaps[i] / gaps[i + 1] for i in range(2)]
    assert all(3.6 < r < 4.4 for r in rates), (gaps, rates)
    assert gaps[0] < 1e-2 * (1e-4 * direct.norm().item())  # second order: far below the shifts themselves


def test_exact_equals_difference_when_psi_inverts(device):
    """exact: v_{t-1} = psi_t(v_t) + dhat; difference adds psi_t(v_t) - psi_t(h_t) to h_{t-1}: equal when
    psi_t(h_t) = h_{t-1} (tanh away from the clamp)."""
    model, x, states = make_problem(device)
    direct = 1e-2 * torch.randn_like(states)
    exact = seqtp.propagate_targets(model, x, states, direct, reg=2.0, mode="exact")
    diff = seqtp.propagate_targets(model, x, states, direct, reg=2.0, mode="difference")
    torch.testing.assert_close(exact, diff, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("shift_cap", [None, 0.05])
def test_exact_rule_is_difference_rule_plus_reconstruction_error(device, nonlinearity, shift_cap):
    """The fused kernel runs the exact rule as the difference rule on ``dhat_{t-1} + e_t``, ``e_t = psi_t(h_t) -
    h_{t-1}``. The identity holds for any states, not only forward ones: with random states ``e_t`` is far from zero
    (and tanh hits the clamp of atanh), and the two loops of the reference solver must still agree."""
    torch.manual_seed(1)
    model = seqtp.RNNModel(3, 6, 2, nonlinearity=nonlinearity).to(device, F64)
    x = torch.randn(4, 9, 3, dtype=F64, device=device)
    states = torch.rand(4, 9, 6, dtype=F64, device=device) * 1.6 - 0.8  # [B, T, H]: not a forward pass
    direct = 0.05 * torch.randn_like(states)
    from seqtp.inverses import InverseSolver, torch_shifts

    solver = seqtp.AnalyticInverse(reg=0.7, backend="torch").bind(seqtp.make_cell(model), x, states)
    exact = InverseSolver.propagate(solver, direct, mode="exact", shift_cap=shift_cap)  # the loop over psi_t
    shifted = solver.exact_as_difference(direct)
    recon = (shifted - direct)[:, :-1]  # e_t
    assert recon.abs().max() > 1e-2  # the identity is exercised, not a zero correction
    assert torch.equal(shifted[:, -1], direct[:, -1])
    diff = InverseSolver.propagate(solver, shifted, mode="difference", shift_cap=shift_cap)
    torch.testing.assert_close(diff, exact, rtol=1e-10, atol=1e-12)
    # the torch recursion on the corrected shifts (as the kernel runs the exact rule), and the solver's own exact
    # recursion u_t = a(h_t + delta_t) - z_t (the torch path and the CUDA graph)
    got = torch_shifts(states, shifted, solver.inverse.M, mode="difference", nonlinearity=nonlinearity, eps=1e-3,
                       shift_cap=shift_cap)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.propagate(direct, mode="exact", shift_cap=shift_cap), exact, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("shift_cap", [None, 0.05])
def test_difference_shifts_equal_the_generic_loop(device, nonlinearity, shift_cap):
    """The batched-``a(h)`` loop of the difference rule (the torch and CUDA-graph path) against the generic solver loop
    that calls ``psi_t`` step by step."""
    from seqtp.inverses import InverseSolver

    model, x, states = make_problem(device, nonlinearity=nonlinearity)
    direct = 0.05 * torch.randn_like(states)
    solver = seqtp.AnalyticInverse(reg=0.7, backend="torch").bind(seqtp.make_cell(model), x, states)
    want = InverseSolver.propagate(solver, direct, mode="difference", shift_cap=shift_cap)
    got = solver.propagate(direct, mode="difference", shift_cap=shift_cap)
    assert got.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_last_target_and_zero_shift(device, mode):
    model, x, states = make_problem(device)
    direct = torch.zeros_like(states)
    direct[:, -1] = 0.05 * torch.randn_like(states[:, -1])
    targets = seqtp.propagate_targets(model, x, states, direct, reg=1.0, mode=mode)
    torch.testing.assert_close(targets[:, -1], states[:, -1] + direct[:, -1], rtol=0, atol=0)
    assert targets.dtype == F64 and targets.device.type == device.type
    # with no loss anywhere the targets are the states themselves
    same = seqtp.propagate_targets(model, x, states, torch.zeros_like(states), reg=1.0, mode=mode)
    torch.testing.assert_close(same, states, rtol=0, atol=1e-12)


def test_propagate_targets_accepts_plain_rnn(device):
    model, x, states = make_problem(device)
    plain = torch.nn.RNN(3, 6, batch_first=True).to(device, F64)
    plain.load_state_dict(model.rnn.state_dict())
    direct = 1e-2 * torch.randn_like(states)
    a = seqtp.propagate_targets(plain, x, states, direct, reg=1.0)
    b = seqtp.propagate_targets(model, x, states, direct, reg=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shift_cap_bounds_every_step(device):
    model, x, states = make_problem(device, seq_len=20)
    direct = torch.zeros_like(states)
    direct[:, -1] = 10 * torch.randn_like(states[:, -1])
    deltas = seqtp.propagate_targets(model, x, states, direct, reg=1e-3, shift_cap=0.5) - states
    ratio = deltas.norm(dim=-1) / states.norm(dim=-1)  # [B, T]
    assert ratio.max() <= 0.5 + 1e-12
    uncapped = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(cap_shift(1e-3 * uncapped, torch.ones(4, 6, dtype=F64), 0.5), 1e-3 * uncapped)


def test_inverse_errors():
    model, _, _ = make_problem("cpu")
    with pytest.raises(ValueError, match="reg"):
        ElmanInverse(elman_params(model), reg=0.0)
    with pytest.raises(ValueError, match="mode"):
        seqtp.propagate_targets(model, torch.zeros(1, 2, 3, dtype=F64), torch.zeros(1, 2, 6, dtype=F64),
                                torch.zeros(1, 2, 6, dtype=F64), reg=1.0, mode="bogus")
    with torch.no_grad():
        model.rnn.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(seqtp.FactorizationError, match="Cholesky") as info:
        ElmanInverse(elman_params(model), reg=1.0)
    assert "finite weights: False" in str(info.value) and "grown" not in str(info.value)
    # finite but grown weights (float32, a nearly rank-one W of size 1e4): the message names the size and the cause
    gen = torch.Generator().manual_seed(0)
    big = 1e4 * torch.randn(8, 1, generator=gen) @ torch.randn(1, 8, generator=gen)  # [H, H]
    params = ElmanParams(torch.zeros(8, 2), big + 0.01 * torch.randn(8, 8, generator=gen), torch.zeros(8), "tanh")
    with pytest.raises(seqtp.FactorizationError, match=r"finite weights: True, \|W\|_max = .*the weights have grown"):
        ElmanInverse(params, reg=0.1)
    with pytest.raises(ValueError, match="batch_first"):
        elman_params(torch.nn.RNN(3, 4))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_local_update_equals_autograd_of_detached_loss(device, nonlinearity):
    model, x, states = make_problem(device, nonlinearity=nonlinearity)
    deltas = 1e-2 * torch.randn_like(states)
    params = elman_params(model)
    got = seqtp.local_update_grads(params, x, states, deltas)
    w_ih, w_hh, b = (p.clone().requires_grad_() for p in (params.weight_ih, params.weight_hh, params.bias))
    h_prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)  # [B, T, H], constant
    pre = x @ w_ih.T + h_prev @ w_hh.T + b  # [B, T, H]
    out = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda z: z}[nonlinearity](pre)
    loss = 0.5 * (out - (states + deltas)).square().sum(dim=(1, 2)).mean()
    expected = torch.autograd.grad(loss, (w_ih, w_hh, b))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("update", ["local", "through_time"])
def test_tp_method_grads(device, update):
    """TargetProp.backward: readout gets dL/dtheta; the RNN gets the gradient of the target loss, checked against
    an independent unrolled float64 computation; direct shifts are -gamma_h * B * dL/dh."""
    model, x, _ = make_problem(device, seq_len=5)
    y = torch.randn(x.shape[0], 2, dtype=F64, device=device)

    def loss_fn(states):
        return (model.read(states) - y).square().sum(-1).mean()

    reg, gamma = 0.8, 0.3
    method = seqtp.TargetProp(reg=reg, target_lr=gamma, update=update)
    model.zero_grad()
    method.backward(model, x, loss_fn)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # independent computation with the reference forward
    r = model.rnn
    params = [p.detach().clone().requires_grad_() for p in (r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0)]
    states = elman_forward(x, params[0], params[1], params[2] + params[3], "tanh")
    hs = states.detach().requires_grad_()
    readout_loss = loss_fn(hs)
    dl_dh, *g_read = torch.autograd.grad(readout_loss, [hs, *model.readout.parameters()])
    direct = -gamma * x.shape[0] * dl_dh
    targets = seqtp.propagate_targets(model, x, hs.detach(), direct, reg=reg)
    if update == "through_time":
        target_loss = 0.5 * (states - targets).square().sum(dim=(1, 2)).mean()
    else:
        h_prev = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1).detach()
        pre = x @ params[0].T + h_prev @ params[1].T + params[2] + params[3]
        target_loss = 0.5 * (torch.tanh(pre) - targets).square().sum(dim=(1, 2)).mean()
    g_rnn = torch.autograd.grad(target_loss, params)
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    for n, e in zip(names + ["readout.weight", "readout.bias"], [*g_rnn, *g_read], strict=True):
        torch.testing.assert_close(got[n], e, rtol=1e-9, atol=1e-13, msg=n)


def test_direct_shifts_do_not_depend_on_batch_size():
    """Duplicating the batch leaves the per-sample targets, hence the TP gradient, unchanged."""
    model, x, _ = make_problem("cpu", seq_len=4)
    y = torch.randn(x.shape[0], 2, dtype=F64)
    grads = []
    for reps in (1, 3):
        xr, yr = x.repeat(reps, 1, 1), y.repeat(reps, 1)
        model.zero_grad()
        seqtp.TargetProp(reg=1.0, target_lr=0.1).backward(
            model, xr, lambda s, yr=yr: (model.read(s) - yr).square().sum(-1).mean()
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("truncation", [None, 2])
def test_bptt_matches_reference_unroll(device, truncation):
    model, x, _ = make_problem(device, seq_len=6, nonlinearity="relu")
    y = torch.randn(x.shape[0], 2, dtype=F64, device=device)
    model.zero_grad()
    seqtp.BPTT(truncation=truncation).backward(model, x, lambda s: (model.read(s) - y).square().mean())
    r = model.rnn
    w_ih, w_hh = r.weight_ih_l0.detach().clone().requires_grad_(), r.weight_hh_l0.detach().clone().requires_grad_()
    b = (r.bias_ih_l0 + r.bias_hh_l0).detach()
    h, k = None, truncation or x.shape[1]
    for start in range(0, x.shape[1], k):  # independent truncated unroll
        hs = elman_forward(x[:, start : start + k], w_ih, w_hh, b, "relu", None if h is None else h.detach())
        h = hs[:, -1]
    loss = (model.readout(h) - y).square().mean()
    g_ih, g_hh = torch.autograd.grad(loss, (w_ih, w_hh))
    torch.testing.assert_close(r.weight_ih_l0.grad, g_ih, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(r.weight_hh_l0.grad, g_hh, rtol=1e-9, atol=1e-13)


def test_model_layout_and_identity_forward(device):
    model, x, states = make_problem(device, nonlinearity="identity")
    r = model.rnn
    ref = elman_forward(x, r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0 + r.bias_hh_l0, "identity")
    torch.testing.assert_close(states, ref.detach())
    plain = torch.nn.RNN(3, 6, batch_first=True).to(device, F64)
    plain.load_state_dict(model.rnn.state_dict())
    model.rnn.load_state_dict(plain.state_dict())
    assert set(plain.state_dict()) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}
    w = seqtp.RNNModel(3, 16, 2).rnn.weight_hh_l0.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)  # orthogonal init
