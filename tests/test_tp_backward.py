"""``seqtp.tp_backward`` on models defined here, outside the toolkit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seqtp

F64 = torch.float64


class MyClassifier(nn.Module):
    """A user's own model: a torch RNN and a head, nothing from seqtp."""

    def __init__(self, kind: str, input_size: int = 2, hidden: int = 16, classes: int = 2):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](input_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def loss(self, states: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(states[:, -1]), y)


def memory_task(batch: int = 64, seq_len: int = 8, seed: int = 0):
    """Classify the sign of the first input's first channel after ``seq_len`` steps of noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, 2, generator=g)
    return x, (x[:, 0, 0] > 0).long()


@pytest.mark.parametrize(
    ("kind", "seq_len", "make_opt"),
    [
        ("rnn", 4, lambda p: torch.optim.SGD(p, lr=0.3)),
        ("gru", 8, lambda p: torch.optim.Adam(p, lr=0.01)),
        ("lstm", 8, lambda p: torch.optim.Adam(p, lr=0.01)),
    ],
    ids=["rnn-sgd", "gru-adam", "lstm-adam"],
)
def test_tp_backward_trains_a_user_model(kind, seq_len, make_opt):
    """TP alone (no loss.backward on the RNN) learns to remember the first input: the loss falls by > 20%."""
    torch.manual_seed(0)
    model = MyClassifier(kind)
    x, y = memory_task(seq_len=seq_len)
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(100):
        opt.zero_grad()
        losses.append(seqtp.tp_backward(model.rnn, x, lambda s: model.loss(s, y), reg=1.0, target_lr=0.3))
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.8 * losses[0], losses[::10]


def test_tp_backward_equals_target_prop_on_the_toolkit_model():
    torch.manual_seed(1)
    user = MyClassifier("rnn", hidden=6).double()
    model = seqtp.RNNModel(2, 6, 2).double()
    model.rnn.load_state_dict(user.rnn.state_dict())
    model.readout.load_state_dict(user.head.state_dict())
    x, y = memory_task(batch=5, seq_len=7)
    x = x.double()
    loss = seqtp.tp_backward(user.rnn, x, lambda s: user.loss(s, y), reg=0.5, target_lr=0.2, mode="difference")
    seqtp.TargetProp(reg=0.5, target_lr=0.2, mode="difference").backward(
        model, x, lambda s: nn.functional.cross_entropy(model.read(s), y))
    assert isinstance(loss, float)
    for a, b in zip(user.rnn.parameters(), model.rnn.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(user.head.weight.grad, model.readout.weight.grad)


@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_tp_backward_update_rules_agree_at_the_first_step(kind, update):
    """For T = 1 the local and through-time losses coincide: both updates give the same gradient."""
    torch.manual_seed(2)
    model = MyClassifier(kind, hidden=5).double()
    x, y = memory_task(batch=4, seq_len=1)
    x = x.double()
    seqtp.tp_backward(model.rnn, x, lambda s: model.loss(s, y), reg=1.0, target_lr=0.1, update=update)
    got = [p.grad.clone() for p in model.rnn.parameters()]
    model.zero_grad()
    seqtp.tp_backward(model.rnn, x, lambda s: model.loss(s, y), reg=1.0, target_lr=0.1, update="local")
    for g, p in zip(got, model.rnn.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("rnn", "kwargs", "error", "match"),
    [
        (nn.GRU(2, 4, num_layers=2, batch_first=True), {}, ValueError, "single-layer"),
        (nn.LSTM(2, 4, bidirectional=True, batch_first=True), {}, ValueError, "unidirectional"),
        (nn.RNN(2, 4), {}, ValueError, "batch_first"),
        (nn.Linear(2, 4), {}, TypeError, "RNN, GRU or LSTM"),
        (nn.GRU(2, 4, batch_first=True), {"solver": "analytic"}, TypeError, "Elman"),
        (nn.GRU(2, 4, batch_first=True), {"solver": "learned"}, ValueError, "instance"),
        (nn.GRU(2, 4, batch_first=True), {"solver": "bogus"}, ValueError, "unknown solver"),
        (nn.RNN(2, 4, batch_first=True), {"mode": "bogus"}, ValueError, "mode"),
    ],
)
def test_tp_backward_errors(rnn, kwargs, error, match):
    x = torch.randn(2, 3, 2)
    with pytest.raises(error, match=match):
        seqtp.tp_backward(rnn, x, lambda s: s.sum(), reg=1.0, target_lr=0.1, **kwargs)


def reference_backward(self, model, x, loss_fn):
    """``TargetProp.backward`` before its split into ``targets()``-sharing steps and the update, kept verbatim as the
    reference of the bit-identity test below."""
    from seqtp._cells import make_cell
    from seqtp.inverses import AnalyticInverse, complete_states
    from seqtp.methods import accumulate as _accumulate
    from seqtp.methods import hidden_states, local_update_grads, local_update_loss

    through_time = self.update == "through_time"
    with torch.set_grad_enabled(through_time):
        hidden = hidden_states(model, x)  # [B, T, H]
    leaf = hidden.detach().requires_grad_()
    loss = loss_fn(leaf)
    loss.backward()  # readout .grad, and dL/dh_t in leaf.grad
    if leaf.grad is None:
        raise ValueError("loss_fn(states) does not depend on the states: nothing to propagate")
    cell = make_cell(model)
    direct_h = leaf.grad.mul_(-self.target_lr * x.shape[0])  # [B, T, H]: dhat_t = -gamma_h * dl_i/dh_t, in place
    leaf.grad = None
    states, direct = complete_states(cell, x, leaf.detach(), direct_h)  # [B, T, S] each
    del direct_h
    solver = self.solver_for(cell)
    stats = {}
    if solver.trainable:  # (was: hasattr(solver, "fit"), before the abilities were declared on the base)
        if self._pending_state is not None:
            solver.bind(cell, x, states)  # creates the feedback weights, then restores them
            solver.load_state_dict(self._pending_state["solver"])
            self._pending_state = None
        stats["feedback_loss"] = torch.as_tensor(solver.fit(cell, x, states))
    solver.bind(cell, x, states)
    seq_len = states.shape[1]
    steps = [0, seq_len // 2, seq_len - 1]  # the steps whose mean shift norm is reported
    fused = None
    if self.update == "local" and isinstance(solver, AnalyticInverse) and solver.fuse_local_update:
        fused = solver.propagate_local_update(direct, mode=self.mode, shift_cap=self.shift_cap)
    if fused is not None:  # the kernel accumulated the local update; delta itself never exists
        g_ih, g_hh, g_b, row_norms = fused  # [H, D], [H, H], [H], [B, T]
        del direct
        norms = row_norms[:, steps].mean(dim=0)  # [3]
    else:
        deltas = solver.propagate(direct, mode=self.mode, shift_cap=self.shift_cap)  # [B, T, S]
        del direct  # memory: the peak is states + deltas + one [B, T, S] temporary
        norms = deltas[:, steps].norm(dim=-1).mean(dim=0)  # [3]: three steps, not all T
    stats.update({"shift_first": norms[0], "shift_mid": norms[1], "shift_last": norms[2]})
    stats.update({f"solver_{k}": torch.as_tensor(v) for k, v in solver.report().items()})
    if through_time:
        graph_cell = make_cell(model, detach=False)
        full = graph_cell.full_states(x, hidden)  # [B, T, S] with the graph
        (0.5 * (full - (states + deltas)).square().sum(dim=(1, 2)).mean()).backward()
    elif cell.kind == "elman":  # closed form, no autograd
        rnn = getattr(model, "rnn", model)
        if fused is None:
            g_ih, g_hh, g_b = local_update_grads(cell.elman_params(), x, states, deltas)
        pairs = ((rnn.weight_ih_l0, g_ih), (rnn.weight_hh_l0, g_hh))
        if rnn.bias:
            pairs += ((rnn.bias_ih_l0, g_b), (rnn.bias_hh_l0, g_b))
        for p, g in pairs:
            _accumulate(p, g)
    else:
        local_update_loss(make_cell(model, detach=False), x, states, states + deltas).backward()
    return loss.detach(), stats


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("update", ["local", "through_time"])
@pytest.mark.parametrize(
    ("kind", "solver", "mode", "cap"),
    [("rnn", "analytic", "linearized", None), ("rnn", "analytic", "difference", 1.0),
     ("rnn", "analytic", "exact", None), ("rnn", "iterated", "difference", None),
     ("rnn", "learned", "difference", 1.0), ("gru", "gauss_newton", "linearized", None),
     ("gru", "learned", "linearized", None), ("lstm", "gauss_newton", "linearized", 1.0)],
)
def test_backward_is_bit_identical_to_the_reference(kind, solver, mode, cap, update, dtype):
    """The refactored ``TargetProp.backward`` (shared with ``targets()``) writes the very bits the reference above
    writes: two calls (a learned inverse fits at each, its state carried over), the second accumulating."""
    torch.manual_seed(3)
    user = MyClassifier(kind, hidden=6).to(dtype)
    twin = MyClassifier(kind, hidden=6).to(dtype)
    twin.load_state_dict(user.state_dict())
    x, y = memory_task(batch=5, seq_len=7)
    x = x.to(dtype)
    methods = [seqtp.TargetProp(reg=0.7, target_lr=0.2, mode=mode, update=update, shift_cap=cap, solver=solver)
               for _ in range(2)]
    results = []
    for model, method, run in ((user, methods[0], type(methods[0]).backward), (twin, methods[1], reference_backward)):
        stats = [run(method, model.rnn, x, lambda s, m=model: m.loss(s, y))[1] for _ in range(2)]
        results.append(([p.grad for p in model.parameters()], stats))
    (grads, stats), (ref_grads, ref_stats) = results
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)
    for s, r in zip(stats, ref_stats, strict=True):
        assert s.keys() == r.keys()
        for k in s:
            assert torch.equal(s[k], r[k]), k


def test_targets_are_those_backward_fits():
    """``targets()`` writes no ``.grad``; for T = 1 its shift is the direct one, ``-gamma_h * dl_i/dh``."""
    torch.manual_seed(4)
    model = MyClassifier("rnn", hidden=6).double()
    x, y = memory_task(batch=5, seq_len=1)
    x = x.double()
    states, deltas = seqtp.TargetProp(reg=1.0, target_lr=0.2).targets(model.rnn, x, lambda s: model.loss(s, y))
    assert all(p.grad is None for p in model.parameters())
    leaf = states.clone().requires_grad_()
    (dl,) = torch.autograd.grad(model.loss(leaf, y), leaf)
    torch.testing.assert_close(deltas, -0.2 * x.shape[0] * dl, rtol=1e-14, atol=0)
