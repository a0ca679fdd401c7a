"""Cells (Elman, GRU, LSTM) as pure step functions, checked against torch's own modules in float64."""

from __future__ import annotations

import pytest
import torch

import seqtp
from seqtp._cells import make_cell
from seqtp.methods import local_update_loss

F64 = torch.float64
MODULES = {"elman": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
TORCH_CELLS = {"elman": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}


def module_and_data(kind: str, *, batch=3, seq_len=6, input_size=2, hidden=4, seed=0):
    torch.manual_seed(seed)
    module = MODULES[kind](input_size, hidden, batch_first=True).double()
    x = torch.randn(batch, seq_len, input_size, dtype=F64)
    return module, x


def torch_cell_unroll(kind: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full state sequence by torch's single-step cells (an independent implementation of each step)."""
    step = TORCH_CELLS[kind](module.input_size, module.hidden_size).double()
    step.load_state_dict({k.removesuffix("_l0"): v for k, v in module.state_dict().items()})
    h = torch.zeros(x.shape[0], module.hidden_size, dtype=F64)
    c = torch.zeros_like(h)
    out = []
    for t in range(x.shape[1]):
        if kind == "lstm":
            h, c = step(x[:, t], (h, c))
            out.append(torch.cat([h, c], dim=-1))
        else:
            h = step(x[:, t], h)
            out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_step_matches_torch_cells(kind):
    module, x = module_and_data(kind)
    cell = make_cell(module)
    expected = torch_cell_unroll(kind, module, x)  # [B, T, S]
    torch.testing.assert_close(cell.unroll(x), expected, rtol=1e-12, atol=1e-14)
    hidden, _ = module(x)
    torch.testing.assert_close(cell.full_states(x, hidden.detach()), expected, rtol=1e-12, atol=1e-14)
    assert cell.state_size == (8 if kind == "lstm" else 4) and cell.kind == kind


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_local_update_of_any_cell_equals_per_step_torch_cells(kind):
    """The batched local loss (all steps at once) has the gradient of the per-step loss built with torch's cells."""
    module, x = module_and_data(kind)
    cell = make_cell(module)
    states = cell.unroll(x)  # [B, T, S]
    targets = states + 1e-2 * torch.randn_like(states)
    got = torch.autograd.grad(local_update_loss(make_cell(module, detach=False), x, states, targets),
                              list(module.parameters()))
    step = TORCH_CELLS[kind](module.input_size, module.hidden_size).double()
    step.load_state_dict({k.removesuffix("_l0"): v for k, v in module.state_dict().items()})
    hid = module.hidden_size
    loss = 0.0
    for t in range(x.shape[1]):
        prev = states[:, t - 1] if t else torch.zeros_like(states[:, 0])
        if kind == "lstm":
            h, c = step(x[:, t], (prev[:, :hid], prev[:, hid:]))
            pred = torch.cat([h, c], dim=-1)
        else:
            pred = step(x[:, t], prev)
        loss = loss + 0.5 * (pred - targets[:, t]).square().sum(-1).mean()
    expected = torch.autograd.grad(loss, list(step.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (torch.nn.GRU(2, 4, num_layers=2, batch_first=True), "single-layer"),
        (torch.nn.LSTM(2, 4, bidirectional=True, batch_first=True), "unidirectional"),
        (torch.nn.RNN(2, 4), "batch_first"),
        (torch.nn.LSTM(2, 4, proj_size=2, batch_first=True), "proj_size"),
    ],
)
def test_unsupported_modules_are_named(module, match):
    with pytest.raises(ValueError, match=match):
        make_cell(module)
    with pytest.raises(TypeError, match="RNN, GRU or LSTM"):
        make_cell(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_model_with_gru_and_lstm(kind):
    model = seqtp.RNNModel(2, 4, 3, cell=kind).double()
    plain = MODULES[kind](2, 4, batch_first=True).double()
    plain.load_state_dict(model.rnn.state_dict())
    model.rnn.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 2, dtype=F64)
    out, states = model(x)
    torch.testing.assert_close(states, plain(x)[0])
    assert out.shape == (3, 3)
    # truncated forward: same values, gradients cut every 3 steps
    torch.testing.assert_close(model.states(x, truncation=3), states)
    blocks = model.rnn.weight_hh_l0.detach().split(4)
    for w in blocks:  # orthogonal init per gate block
        torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=F64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Elman cells only"):
        seqtp.RNNModel(2, 4, 3, cell=kind, nonlinearity="relu")
