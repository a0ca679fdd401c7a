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
