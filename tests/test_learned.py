"""Tests of the learned feedback inverse (DTP, Lee et al. 2015; TPTT, Manchev & Spratling 2020)."""

from __future__ import annotations

import io

import pytest
import torch

import seqtp
from seqtp._cells import make_cell
from seqtp.inverses import FeedbackCell, InverseSolver, LearnedInverse

F64 = torch.float64
MODULES = {"elman": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def problem(kind, *, batch=8, seq_len=10, input_size=3, hidden=6, seed=0, dtype=F64, detach=True):
    torch.manual_seed(seed)
    module = MODULES[kind](input_size, hidden, batch_first=True).to(dtype)
    cell = make_cell(module, detach=detach)
    x = torch.randn(batch, seq_len, input_size, dtype=dtype)
    with torch.no_grad():
        states = cell.unroll(x)
    return module, cell, x, states


def recon_gap(solver, x, states):
    """``mean_{b, t>=1} |invert(t, s_t) - s_{t-1}|`` on the bound batch."""
    gaps = [(solver.invert(t, states[:, t]) - states[:, t - 1]).norm(dim=-1).mean() for t in range(1, x.shape[1])]
    return float(torch.stack(gaps).mean())


@pytest.mark.parametrize("kind", ["elman", "gru"])
def test_training_reduces_the_reconstruction_loss(kind):
    """~200 SGD steps on a fixed batch: the noise-free loss falls by more than half, the noisy fit losses too, and
    ``g(s_t, x_t)`` moves closer to ``s_{t-1}``."""
    _, cell, x, states = problem(kind)
    solver = LearnedInverse(feedback_lr=0.01, noise=0.1, seed=0, reduction="sum")
    before = solver.reconstruction_loss(cell, x, states)
    gap_before = recon_gap(solver.bind(cell, x, states), x, states)
    losses = [solver.fit(cell, x, states) for _ in range(200)]
    after = solver.reconstruction_loss(cell, x, states)
    assert all(isinstance(v, float) for v in losses)
    assert after < 0.5 * before
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    gap_after = recon_gap(solver.bind(cell, x, states), x, states)
    assert gap_after < 0.5 * gap_before
    report = solver.report()
    assert report["fit_loss"] == losses[-1]
    assert 0 < report["reconstruction_error"] < 1


def test_loss_is_the_documented_formula():
    """``mean_b sum_{t>=1} |g(f(s_{t-1} + sigma e, x_t), x_t) - (s_{t-1} + sigma e)|^2`` with the solver's noise."""
    _, cell, x, states = problem("gru")
    solver = LearnedInverse(noise=0.3, seed=4, reduction="sum")
    solver.bind(cell, x, states)  # creates the feedback cell and the generator
    gen = torch.Generator().manual_seed(4)
    noisy = states[:, :-1] + 0.3 * torch.randn(states[:, :-1].shape, generator=gen, dtype=F64)  # [B, T-1, S]
    with torch.no_grad():
        rec = solver.feedback(cell.step(noisy, x[:, 1:]), x[:, 1:])  # [B, T-1, S]
    expected = float((rec - noisy).pow(2).sum(dim=(1, 2)).mean())
    assert solver.fit(cell, x, states) == pytest.approx(expected, rel=1e-12)


def test_mean_reduction_divides_by_the_steps():
    """``reduction="mean"``: the same loss divided by ``T - 1`` (the lr then does not depend on the length)."""
    _, cell, x, states = problem("elman")
    total = LearnedInverse(seed=1, reduction="sum").fit(cell, x, states)
    mean = LearnedInverse(seed=1).fit(cell, x, states)  # the default
    assert mean == pytest.approx(total / (x.shape[1] - 1), rel=1e-12)
    with pytest.raises(ValueError):
        LearnedInverse(reduction="max")


def test_fit_trains_only_the_feedback_cell():
    """Under ``no_grad`` too; the cell's (graph-attached) parameters get no gradient, the states none either."""
    module, cell, x, states = problem("elman", detach=False)
    solver = LearnedInverse(seed=0)
    with torch.no_grad():
        solver.fit(cell, x, states)
    v0 = solver.feedback.V.detach().clone()
    solver.fit(cell, x, states.requires_grad_())
    assert not torch.equal(v0, solver.feedback.V)
    assert all(p.grad is None for p in module.parameters()) and states.grad is None


def test_determinism_by_seed():
    _, cell, x, states = problem("gru")
    runs = []
    for seed in (7, 7, 8):
        solver = LearnedInverse(seed=seed)
        losses = [solver.fit(cell, x, states) for _ in range(5)]
        runs.append((losses, solver.feedback.V.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0] and not torch.equal(runs[0][1], runs[2][1])


def test_init_is_deterministic_and_orthogonal():
    a = FeedbackCell(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    b = FeedbackCell(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    torch.testing.assert_close(a.V.T @ a.V, torch.eye(5, dtype=F64))
    torch.testing.assert_close(b.V, a.V.float())
    assert torch.equal(a.c, torch.zeros(5, dtype=F64)) and a.U.abs().max() <= 5**-0.5


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_round_trip(momentum):
    """Saving after some fits and loading into a fresh solver gives identical subsequent fits (weights, momentum
    buffers and the noise generator are restored); the saved dict is a copy, unaffected by later fits."""
    _, cell, x, states = problem("elman")
    solver = LearnedInverse(seed=2, momentum=momentum)
    assert solver.state_dict() == {}
    for _ in range(5):
        solver.fit(cell, x, states)
    saved = solver.state_dict()
    v_saved = saved["feedback"]["V"].clone()
    continued = [solver.fit(cell, x, states) for _ in range(3)]
    assert torch.equal(saved["feedback"]["V"], v_saved)
    restored = LearnedInverse(seed=99, momentum=momentum)
    restored.load_state_dict(saved)
    assert [restored.fit(cell, x, states) for _ in range(3)] == continued
    for name, p in solver.feedback.named_parameters():
        assert torch.equal(p, getattr(restored.feedback, name))
    torch.save(saved, io.BytesIO())  # serializable


def test_lstm_shapes():
    """LSTM: ``S = 2H`` (``s = [h, c]``); the feedback cell is ``[2H, 2H]``, ``[2H, D]``, ``[2H]``."""
    _, cell, x, states = problem("lstm", hidden=4)
    assert cell.state_size == 8 and states.shape == (8, 10, 8)
    solver = LearnedInverse(seed=0)
    loss = solver.fit(cell, x, states)
    assert loss > 0
    fb = solver.feedback
    assert fb.V.shape == (8, 8) and fb.U.shape == (8, 3) and fb.c.shape == (8,)
    solver.bind(cell, x, states)
    assert solver.invert(3, states[:, 3]).shape == (8, 8)
    for mode in ("linearized", "difference", "exact"):
        deltas = solver.propagate(0.01 * torch.randn_like(states), mode=mode)
        assert deltas.shape == states.shape and torch.isfinite(deltas).all()
    ident = LearnedInverse(nonlinearity="identity")
    ident.fit(cell, x, states)
    assert ident.bind(cell, x, states).invert(3, states[:, 3]).shape == (8, 8)


@pytest.mark.parametrize("nonlinearity", ["tanh", "identity"])
def test_linearized_and_difference_rules(nonlinearity):
    """The explicit ``(1 - g^2) * (V delta)`` equals forward-mode autodiff of ``invert``; ``difference`` is
    ``g(s_t + delta) - g(s_t)`` and vanishes at 0."""
    _, cell, x, states = problem("gru")
    solver = LearnedInverse(seed=0, nonlinearity=nonlinearity)
    solver.fit(cell, x, states)
    solver.bind(cell, x, states)
    for t in (1, 6):
        delta = 0.1 * torch.randn_like(states[:, t])  # [B, S]
        _, expected = torch.func.jvp(lambda v, t=t: solver.invert(t, v), (states[:, t],), (delta,))
        torch.testing.assert_close(solver.linearized(t, delta), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(solver.difference(t, delta),
                                   solver.invert(t, states[:, t] + delta) - solver.invert(t, states[:, t]))
        assert torch.equal(solver.difference(t, torch.zeros_like(delta)), torch.zeros_like(delta))


def test_fit_invalidates_the_bound_caches():
    """A ``fit`` after ``bind`` changes ``g``; the rules then use the new weights."""
    _, cell, x, states = problem("elman")
    solver = LearnedInverse(seed=0, feedback_lr=0.1)
    solver.bind(cell, x, states)
    delta = 0.1 * torch.randn_like(states[:, 2])
    solver.linearized(2, delta)
    solver.fit(cell, x, states)
    expected = (1 - solver.invert(2, states[:, 2]) ** 2) * (delta @ solver.feedback.V.detach().T)
    torch.testing.assert_close(solver.linearized(2, delta), expected)


def test_size_mismatch_and_invalid_options():
    _, cell, x, states = problem("gru")
    solver = LearnedInverse()
    solver.fit(cell, x, states)
    _, other, x2, states2 = problem("gru", hidden=5)
    with pytest.raises(ValueError, match="feedback cell"):
        solver.bind(other, x2, states2)
    with pytest.raises(ValueError, match="shape mismatch"):
        solver.fit(cell, x[:, :-1], states)
    for bad in ({"feedback_lr": 0.0}, {"noise": -1.0}, {"momentum": 1.0}, {"nonlinearity": "relu"}, {"reg": 0.0}):
        with pytest.raises(ValueError):
            LearnedInverse(**bad)


def test_registered_as_a_solver():
    assert seqtp.SOLVERS["learned"] is LearnedInverse and issubclass(LearnedInverse, InverseSolver)


def test_load_state_dict_keeps_the_built_device_and_dtype():
    """A checkpoint read with map_location="cpu" (as the training loop does) must not move a built solver: it keeps
    its dtype (and, on CUDA, its device and CUDA noise generator)."""
    _, cell, x, states = problem("elman")
    saved = LearnedInverse(seed=3)
    saved.fit(cell, x, states)
    state = saved.state_dict()
    state["feedback"] = {k: v.float() for k, v in state["feedback"].items()}  # stored in another dtype
    solver = LearnedInverse(seed=3).bind(cell, x, states)
    solver.load_state_dict(state)
    assert solver.feedback.V.dtype == states.dtype
    torch.testing.assert_close(solver.feedback.V, saved.feedback.V, rtol=1e-6, atol=1e-7)
