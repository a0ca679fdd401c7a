"""Float64 tests of ``seqtp.alignment`` against closed cases and independent computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import seqtp
from seqtp._cells import elman_forward

F64 = torch.float64
GAMMA = 0.1
# every registered method, built with small-instance options; a new method fails test_every_method_is_covered
METHOD_FACTORIES = {
    "bptt": lambda: seqtp.BPTT(),
    "tp": lambda: seqtp.TargetProp(reg=1.0, target_lr=GAMMA),
    "dtp": lambda: seqtp.DTP(target_lr=GAMMA),
    "drl": lambda: seqtp.DRL(target_lr=GAMMA),
    "ddtp": lambda: seqtp.DDTP(target_lr=GAMMA),
    "gait": lambda: seqtp.GAITProp(target_lr=GAMMA, gamma=1e-6),
    "ldrl": lambda: seqtp.LDRL(target_lr=GAMMA, feedback_steps=2),
}
# solvers per cell kind, with options that make the iterative ones accurate on these small instances
SOLVER_OPTIONS = {
    "analytic": {},
    "gauss_newton": {"cg_tol": 1e-13},
    "iterated": {"steps": 3},
    "learned": {"noise": 0.1},
}
ELMAN_SOLVERS = ["analytic", "gauss_newton", "iterated", "learned"]
OTHER_SOLVERS = ["gauss_newton", "learned"]


class UserModel(nn.Module):
    """A plain torch RNN/GRU/LSTM and a head, nothing from seqtp."""

    def __init__(self, kind: str, input_size: int = 3, hidden: int = 5, out: int = 2):
        super().__init__()
        self.rnn = {"elman": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](input_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)


def make_problem(kind="elman", *, plain=False, nonlinearity="tanh", readout="last", batch=4, seq_len=6, seed=0):
    """``(module, head, x, y, loss_fn)``: ``module`` is what ``alignment`` gets (an RNNModel or a plain RNN)."""
    torch.manual_seed(seed)
    if plain:
        user = UserModel(kind).double()
        module, head = user.rnn, user.head
    else:
        module = seqtp.RNNModel(3, 5, 2, cell=kind, nonlinearity=nonlinearity, readout=readout).double()
        with torch.no_grad():
            module.rnn.weight_hh_l0.mul_(0.9)
        head = module.readout
    x = 0.7 * torch.randn(batch, seq_len, 3, dtype=F64)
    shape = (batch, 2) if readout == "last" else (batch, seq_len, 2)
    y = torch.randn(*shape, dtype=F64)

    return module, head, x, y, mse_loss(head, y, readout)


def mse_loss(head, y, readout="last"):
    """``states [B, T, H] -> mean_b |head(h) - y_b|^2`` (summed over steps for ``readout="all"``)."""

    def loss_fn(states):
        out = head(states[:, -1] if readout == "last" else states)
        return (out - y).square().sum(-1).mean()

    return loss_fn


def tp(solver="analytic", **kwargs):
    opts = dict(reg=1.0, target_lr=GAMMA, solver=solver, solver_options=SOLVER_OPTIONS[solver])
    return seqtp.TargetProp(**(opts | kwargs))


def rnn_params(module):
    rnn = getattr(module, "rnn", module)
    ids = {id(p) for p in rnn.parameters()}
    return [(n, p) for n, p in module.named_parameters() if id(p) in ids]


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_every_method_is_covered():
    assert set(METHOD_FACTORIES) == set(seqtp.METHODS)
    for name, make in METHOD_FACTORIES.items():
        method = make()
        assert isinstance(method, seqtp.METHODS[name])
        # the declared ability matches the implementation
        assert method.has_targets == (type(method).targets is not seqtp.Method.targets)


def test_base_method_has_no_targets():
    model, _, x, _, loss_fn = make_problem()
    assert seqtp.Method.has_targets is False
    with pytest.raises(NotImplementedError, match="BPTT has no state targets"):
        seqtp.BPTT().targets(model, x, loss_fn)


@pytest.mark.parametrize(("kind", "nonlinearity", "readout", "plain"),
                         [("elman", "tanh", "last", False), ("elman", "relu", "all", False),
                          ("elman", "identity", "last", False), ("gru", "tanh", "all", False),
                          ("lstm", "tanh", "last", False), ("elman", "tanh", "last", True),
                          ("gru", "tanh", "last", True), ("lstm", "tanh", "last", True)])
def test_bptt_is_aligned_with_itself(kind, nonlinearity, readout, plain):
    model, _, x, _, loss_fn = make_problem(kind, plain=plain, nonlinearity=nonlinearity, readout=readout)
    out = seqtp.alignment(model, x, loss_fn, seqtp.BPTT())
    assert out["cosine"] == pytest.approx(1, abs=1e-12)
    assert out["norm_ratio"] == pytest.approx(1, abs=1e-12)
    names = [n for n, _ in rnn_params(model)]
    assert {k for k in out if k.startswith("cosine/")} == {f"cosine/{n}" for n in names}
    for n in names:
        assert out[f"cosine/{n}"] == pytest.approx(1, abs=1e-12), n
    assert not any(k.startswith("step_") for k in out)


def test_clipped_bptt_keeps_the_direction():
    model, _, x, _, loss_fn = make_problem()
    full = seqtp.alignment(model, x, loss_fn, seqtp.BPTT())
    clip = 0.5 * full["grad_norm"]  # the readout's gradient adds to the clipped norm: the ratio is below 0.5
    out = seqtp.alignment(model, x, loss_fn, seqtp.BPTT(clip=clip))
    assert out["cosine"] == pytest.approx(1, abs=1e-12)
    assert 0 < out["norm_ratio"] < 0.5


@pytest.mark.parametrize(("kind", "solver", "mode"),
                         [("elman", "analytic", "linearized"), ("elman", "analytic", "difference"),
                          ("elman", "analytic", "exact"), ("elman", "iterated", "difference"),
                          pytest.param("elman", "gauss_newton", "linearized", marks=pytest.mark.slow),
                          ("gru", "gauss_newton", "linearized")])
def test_through_time_update_tends_to_the_scaled_gradient(kind, solver, mode):
    """With ``update="through_time"`` the shifts of steps without a loss are ``O(1/reg)``, so the update is
    ``target_lr * dL/dtheta + O(1/reg)``: ``norm_ratio / target_lr - 1 = O(1/reg)`` and ``1 - cosine = O(1/reg^2)``
    (the first-order term orthogonal to the gradient enters the cosine squared). Checked as rates over a decade."""
    model, _, x, _, loss_fn = make_problem(kind)
    regs = [1e2, 1e3, 1e4]
    outs = [seqtp.alignment(model, x, loss_fn, tp(solver, reg=r, mode=mode, update="through_time")) for r in regs]
    gaps = [1 - o["cosine"] for o in outs]
    scale_gaps = [abs(o["norm_ratio"] / GAMMA - 1) for o in outs]
    assert all(g > 0 for g in gaps), gaps
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert 50 < a / b < 200, gaps  # 100 per decade: O(1/reg^2)
    for a, b in zip(scale_gaps, scale_gaps[1:], strict=False):
        assert 7 < a / b < 14, scale_gaps  # 10 per decade: O(1/reg)


def test_local_update_does_not_tend_to_the_gradient():
    """The local update drops the dependence of ``h_{t-1}`` on the parameters: even at large ``reg`` it keeps only
    the last step's part of the gradient, and its cosine stays below the through-time update's."""
    model, _, x, _, loss_fn = make_problem()
    local = seqtp.alignment(model, x, loss_fn, tp(reg=1e4, update="local"))
    through = seqtp.alignment(model, x, loss_fn, tp(reg=1e4, update="through_time"))
    assert local["cosine"] < through["cosine"] - 1e-3


def hand_one_step(model, x, y):
    """T = 1, Elman tanh, MSE readout, by hand: ``h = tanh(U x + b)``, per-sample ``dl_b/dh = 2 A^T r_b`` with the
    residual ``r_b = A h_b + c - y_b``; BPTT ``dL/dU = (1/B) sum_b ((1 - h_b^2) * dl_b/dh) x_b^T``."""
    r, a, c = model.rnn, model.readout.weight.detach(), model.readout.bias.detach()
    h = torch.tanh(x[:, 0] @ r.weight_ih_l0.detach().T + r.bias_ih_l0.detach() + r.bias_hh_l0.detach())  # [B, H]
    dl_dh = 2 * (h @ a.T + c - y) @ a  # [B, H]: per sample
    g_z = (1 - h * h) * dl_dh / x.shape[0]  # [B, H]
    return {"rnn.weight_ih_l0": g_z.T @ x[:, 0], "rnn.weight_hh_l0": torch.zeros_like(r.weight_hh_l0),
            "rnn.bias_ih_l0": g_z.sum(0), "rnn.bias_hh_l0": g_z.sum(0)}, dl_dh, h, a, c


@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
@pytest.mark.parametrize("solver", ELMAN_SOLVERS)
def test_one_step_sequence_by_hand(solver, mode, update):
    """For ``T = 1`` there is no step back: ``delta_1 = -gamma_h dl_b/dh_1``, and the TP update is exactly
    ``gamma_h`` times the gradient; ``h_0 = 0`` makes both ``weight_hh`` parts zero (cosine nan)."""
    model, _, x, y, loss_fn = make_problem(seq_len=1)
    out = seqtp.alignment(model, x, loss_fn, tp(solver, mode=mode, update=update))
    grads, dl_dh, h, a, c = hand_one_step(model, x, y)
    g = torch.cat([t.flatten() for t in grads.values()])
    assert out["loss"] == pytest.approx(float((h @ a.T + c - y).square().sum(-1).mean()), rel=1e-12)
    assert out["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert out["cosine"] == pytest.approx(1, abs=1e-12)
    assert out["norm_ratio"] == pytest.approx(GAMMA, rel=1e-10)
    for name in ("rnn.weight_ih_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        assert out[f"cosine/{name}"] == pytest.approx(1, abs=1e-12)
    assert math.isnan(out["cosine/rnn.weight_hh_l0"])
    torch.testing.assert_close(out["step_cosine"], torch.ones(1, dtype=F64), rtol=0, atol=1e-12)
    shift = GAMMA * dl_dh.norm(dim=-1).mean()
    torch.testing.assert_close(out["step_shift_norm"], shift.reshape(1), rtol=1e-12, atol=0)
    adjoint = dl_dh.norm(dim=-1).mean() / x.shape[0]
    torch.testing.assert_close(out["step_adjoint_norm"], adjoint.reshape(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize(("kind", "solver"), [(k, s) for k in ("gru", "lstm") for s in OTHER_SOLVERS])
def test_one_step_sequence_other_cells(kind, solver, update):
    """``T = 1`` for GRU/LSTM (LSTM: the cell state's shift is zero): the update is ``gamma_h`` times the gradient."""
    model, _, x, _, loss_fn = make_problem(kind, seq_len=1)
    out = seqtp.alignment(model, x, loss_fn, tp(solver, update=update))
    assert out["cosine"] == pytest.approx(1, abs=1e-12)
    assert out["norm_ratio"] == pytest.approx(GAMMA, rel=1e-10)
    torch.testing.assert_close(out["step_cosine"], torch.ones(1, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("plain", [False, True], ids=["RNNModel", "plain"])
@pytest.mark.parametrize(("update", "mode"), [("local", "linearized"), ("through_time", "difference")])
def test_cosines_against_a_direct_computation(update, mode, plain):
    """The update from a separate ``TargetProp.backward`` on a copy of the model; the gradient by an independent
    unroll (``elman_forward``) and autograd; their cosines and norm ratio computed here."""
    model, head, x, y, loss_fn = make_problem(plain=plain, seq_len=6)
    out = seqtp.alignment(model, x, loss_fn, tp(reg=0.5, mode=mode, update=update))

    twin, twin_head = copy.deepcopy((model, head))
    twin_rnn = getattr(twin, "rnn", twin)
    twin_loss = mse_loss(twin_head, y)
    tp(reg=0.5, mode=mode, update=update).backward(twin, x, twin_loss)
    updates = {n: p.grad for n, p in rnn_params(twin)}

    r = twin_rnn
    params = [p.detach().clone().requires_grad_() for p in (r.weight_ih_l0, r.weight_hh_l0, r.bias_ih_l0, r.bias_hh_l0)]
    states = elman_forward(x, params[0], params[1], params[2] + params[3], "tanh")  # [B, T, H]
    grads = dict(zip(updates, torch.autograd.grad(twin_loss(states), params), strict=True))

    for name in updates:
        expected = cosine(updates[name].flatten(), grads[name].flatten())
        assert out[f"cosine/{name}"] == pytest.approx(expected, abs=1e-10), name
    u = torch.cat([t.flatten() for t in updates.values()])
    g = torch.cat([t.flatten() for t in grads.values()])
    assert out["cosine"] == pytest.approx(cosine(u, g), abs=1e-10)
    assert out["norm_ratio"] == pytest.approx(float(u.norm() / g.norm()), rel=1e-10)
    assert out["cosine"] < 0.999  # a case where the test could fail: not the trivial alignment


def injected_adjoint(kind, model, x, loss_fn):
    """``dL/dh_t`` by zero perturbations ``e_t`` added to each step's ``h`` in a loop of torch's own cells
    (``nn.RNNCell``/``GRUCell``/``LSTMCell`` with the model's weights): ``dL/de_t`` is the total derivative."""
    rnn = model.rnn
    cls = {"elman": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[kind]
    step = cls(rnn.input_size, rnn.hidden_size).double()
    step.load_state_dict({k.removesuffix("_l0"): v for k, v in rnn.state_dict().items()})
    batch, seq_len, _ = x.shape
    eps = [torch.zeros(batch, rnn.hidden_size, dtype=F64, requires_grad=True) for _ in range(seq_len)]
    h = torch.zeros(batch, rnn.hidden_size, dtype=F64)
    c, hs = torch.zeros_like(h), []
    for t in range(seq_len):
        if kind == "lstm":
            h, c = step(x[:, t], (h, c))
        else:
            h = step(x[:, t], h)
        h = h + eps[t]
        hs.append(h)
    return torch.stack(torch.autograd.grad(loss_fn(torch.stack(hs, dim=1)), eps), dim=1)  # [B, T, H]


@pytest.mark.parametrize(("kind", "readout"), [("elman", "last"), ("elman", "all"), ("gru", "all"),
                                            pytest.param("lstm", "all", marks=pytest.mark.slow)])
def test_step_profiles_against_independent_computations(kind, readout):
    model, _, x, _, loss_fn = make_problem(kind, readout=readout, seq_len=7)
    mode = "difference" if kind == "elman" else "linearized"  # (Gauss-Newton's linearized rule: one CG solve)
    method = tp("analytic" if kind == "elman" else "gauss_newton", mode=mode, shift_cap=1.0)
    out = seqtp.alignment(model, x, loss_fn, method)
    lam = injected_adjoint(kind, model, x, loss_fn)  # [B, T, H]
    torch.testing.assert_close(out["step_adjoint_norm"], lam.norm(dim=-1).mean(0), rtol=1e-10, atol=1e-15)

    with torch.no_grad():
        states = model.states(x)  # [B, T, H]
    leaf = states.clone().requires_grad_()
    direct = -GAMMA * x.shape[0] * torch.autograd.grad(loss_fn(leaf), leaf)[0]  # [B, T, H]
    solver = seqtp.SOLVERS[method.solver_name](reg=1.0, **SOLVER_OPTIONS[method.solver_name])
    targets = seqtp.propagate_targets(model, x, states, direct, reg=1.0, mode=mode, shift_cap=1.0,
                                      solver=solver)
    d = (targets[..., : states.shape[-1]] - states)  # [B, T, H]: the h part
    cos = (d * -lam).sum(dim=(0, 2)) / (d.square().sum(dim=(0, 2)).sqrt() * lam.square().sum(dim=(0, 2)).sqrt())
    torch.testing.assert_close(out["step_cosine"], cos, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out["step_shift_norm"], d.norm(dim=-1).mean(0), rtol=1e-8, atol=1e-15)
    assert out["step_cosine"].shape == (x.shape[1],)

    model.zero_grad()
    _, stats = method.backward(model, x, loss_fn)  # the step profile agrees with the method's own statistics
    if kind != "lstm":  # (LSTM: the statistics measure the full state [h, c], the profile its h part)
        steps = [0, x.shape[1] // 2, x.shape[1] - 1]
        got = out["step_shift_norm"][steps]
        want = torch.stack([stats["shift_first"], stats["shift_mid"], stats["shift_last"]])
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-15)


def test_step_cosine_at_the_last_step_is_one():
    """At ``T`` the shift is the direct one, ``-gamma_h B dL/dh_T``, and ``lambda_T`` has no later step."""
    model, _, x, _, loss_fn = make_problem(seq_len=5)
    out = seqtp.alignment(model, x, loss_fn, tp())
    assert float(out["step_cosine"][-1]) == pytest.approx(1, abs=1e-12)
    assert float(out["step_cosine"][0]) < 0.999


def snapshot(module, head, method):
    params = {n: p.detach().clone() for n, p in [*module.named_parameters(), *head.named_parameters()]}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone())
             for n, p in [*module.named_parameters(), *head.named_parameters()]}
    return params, grads, copy.deepcopy(method.state_dict()), torch.get_rng_state()


def assert_same_state(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same_state(u, v)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-step"])
@pytest.mark.parametrize("plain", [False, True], ids=["RNNModel", "plain"])
@pytest.mark.parametrize("which", [*METHOD_FACTORIES, *[f"tp-{s}" for s in ELMAN_SOLVERS]])
def test_state_is_restored(which, plain, warm):
    """Parameters, every ``.grad`` (the same tensors, or None), the method's state (a learned inverse's feedback
    weights, optimizer and noise generator), the RNG; and the next ``backward`` is as without the call."""
    if plain and which == "ddtp":
        pytest.skip("DDTP's feedback starts from the readout of a seqtp.RNNModel")
    model, head, x, _, loss_fn = make_problem(plain=plain)
    method = METHOD_FACTORIES[which]() if which in METHOD_FACTORIES else tp(which.removeprefix("tp-"))
    if warm:  # a trained state: one backward (a learned inverse fits once), then a stale .grad on some parameters
        method.backward(model, x, loss_fn)
        head.bias.grad = None
    twin = copy.deepcopy(method)
    before = snapshot(model, head, method)
    out = seqtp.alignment(model, x, loss_fn, method)
    after = snapshot(model, head, method)
    for name, p in before[0].items():
        assert torch.equal(p, after[0][name]), name
    for name, (ref, val) in before[1].items():
        now_ref, now_val = after[1][name]
        assert now_ref is ref, name
        assert (val is None and now_val is None) or torch.equal(val, now_val), name
    assert_same_state(before[2], after[2])
    assert torch.equal(before[3], after[3])
    assert (getattr(method, "_solver", None) is None) == (getattr(twin, "_solver", None) is None)

    params = [*model.parameters(), *head.parameters()]
    grads = []
    for m in (method, twin):  # the next step: the same .grad with the instrument's call as without it
        for p in params:
            p.grad = None
        m.backward(model, x, loss_fn)
        grads.append([p.grad.clone() for p in params if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(out["cosine"])


def test_random_loss_sees_the_same_draws():
    """A ``loss_fn`` with dropout: every computation of the instrument sees the same mask (BPTT aligns with
    itself), and the caller's random stream is left where it was."""
    model, head, x, y, _ = make_problem()

    def loss_fn(states):
        return (head(nn.functional.dropout(states[:, -1], 0.5, training=True)) - y).square().sum(-1).mean()

    state = torch.get_rng_state()
    out = seqtp.alignment(model, x, loss_fn, seqtp.BPTT())
    assert torch.equal(torch.get_rng_state(), state)
    assert out["cosine"] == pytest.approx(1, abs=1e-12)
    assert out["norm_ratio"] == pytest.approx(1, abs=1e-12)
