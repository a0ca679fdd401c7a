"""The paper configs (``configs/paper/``) against the update rule of Roulet & Harchaoui's public code (TMLR 2023).

A small paper-style implementation written here (``paper_tp_step``: per-step regularized inverse by a Cholesky solve,
direct target ``h_T - lr_target * dL/dh_T`` from the batch-mean loss ``L``, linearized targets, the batch SUM of the
target residuals back-propagated through the unrolled graph, readout by its gradient of ``L``, plain SGD over all
parameters) runs a few float64 optimizer steps beside seqtp built from each paper config; both must end with the same
parameters. The derivation of the mapping is in ``docs/paper_protocol.md``. A smoke test trains every paper config
for a couple of iterations at tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqtp import BPTT, RNNModel, TargetProp
from seqtp.cli import main
from seqtp.config import load_config
from seqtp.train import build_method, build_optimizer

try:  # the task registry: ``seqtp.tasks`` (or the top-level ``tasks`` package)
    from seqtp.tasks import TASKS
except ImportError:
    from tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
MNIST_TASKS = ("pixel_mnist", "permuted_mnist")

# The hyperparameters of exp/paper_conv_plots.py in the authors' repository (github.com/vroulet/tpri), per experiment:
# TP (oracle='target_optim': SGD, no momentum) and the gradient run (oracle='grad': SGD, Nesterov iff momentum > 0).
PAPER_CODE = {
    "temporal_order_60": dict(lr=1e-1, lr_target=1e-2, reg=10.0, grad_lr=1e-5, grad_momentum=0.9, batch=20,
                              iters=40000),
    "temporal_order_120": dict(lr=1e-2, lr_target=1e-2, reg=1.0, grad_lr=1e-5, grad_momentum=0.9, batch=20,
                               iters=48000),
    "adding_30": dict(lr=1e-1, lr_target=1e-1, reg=1.0, grad_lr=1e-3, grad_momentum=0.9, batch=20, iters=24000),
    "pixel_mnist": dict(lr=1e-1, lr_target=1e-4, reg=1.0, grad_lr=1e-5, grad_momentum=0.0, batch=16, iters=40000),
    "permuted_mnist": dict(lr=1e-1, lr_target=1e-4, reg=1.0, grad_lr=1e-4, grad_momentum=0.0, batch=16, iters=40000),
}
EPS = 1e-3  # the paper code's tol_inv: clamp of atanh and of 1 - h^2
BATCH, SEQ, HIDDEN, INPUT = 5, 7, 6, 3  # small float64 problem for the update comparisons
N_STEPS = 3
RNN_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def test_every_paper_experiment_has_a_config() -> None:
    assert sorted(p.stem for p in PAPER_CONFIGS) == sorted(PAPER_CODE)


# --------------------------------------------------------------------------------------------------------------------
# a paper-style implementation


def problem(kind: str, seed: int) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Initial float64 parameters (names of ``RNNModel``'s state dict) and ``N_STEPS`` batches for a task kind."""
    g = torch.Generator().manual_seed(seed)
    classes = 4 if kind == "classification" else 1

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    w_hh = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64))[0]  # orthogonal [H, H]
    params = {
        "rnn.weight_ih_l0": rand(HIDDEN, INPUT, scale=0.3),
        "rnn.weight_hh_l0": 0.9 * w_hh,
        "rnn.bias_ih_l0": rand(HIDDEN, scale=0.1),
        "rnn.bias_hh_l0": rand(HIDDEN, scale=0.1),
        "readout.weight": rand(classes, HIDDEN, scale=0.5),
        "readout.bias": rand(classes, scale=0.1),
    }
    batches = []
    for _ in range(N_STEPS):
        x = 0.5 * torch.randn(BATCH, SEQ, INPUT, generator=g, dtype=torch.float64)  # [B, T, D]: tanh unsaturated
        if kind == "classification":
            y = torch.randint(classes, (BATCH,), generator=g)  # [B]
        else:
            y = torch.rand(BATCH, 1, generator=g, dtype=torch.float64)  # [B, 1]
        batches.append((x, y))
    return params, batches


def task_loss(kind: str):
    """The batch-mean loss of the task kind (torch.nn.CrossEntropyLoss / MSELoss in the paper code)."""
    return F.cross_entropy if kind == "classification" else F.mse_loss


def paper_states(p: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """``[h_0 = 0, h_1, .., h_T]`` (each ``[B, H]``, with the graph) of
    ``h_t = tanh(U x_t + b_ih + W h_{t-1} + b_hh)``."""
    h = x.new_zeros(x.shape[0], p["rnn.weight_hh_l0"].shape[0])  # [B, H]
    out = [h]
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ p["rnn.weight_ih_l0"].T + p["rnn.bias_ih_l0"]
                       + h @ p["rnn.weight_hh_l0"].T + p["rnn.bias_hh_l0"])  # [B, H]
        out.append(h)
    return out


def paper_tp_grads(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_fn, *, lr_target: float,
                   reg: float) -> dict[str, torch.Tensor]:
    """The paper code's TP directions for one batch, written from its equations and conventions.

    Readout: ``dL/dtheta_out`` of the batch-mean loss ``L`` at ``h_T``. Targets: ``v_T = h_T - lr_target dL/dh_T``,
    then ``v_{t-1} = h_{t-1} + (W^T W + reg I)^{-1} W^T ((v_t - h_t) / (1 - h_t^2))`` (a Cholesky solve per step).
    RNN: the gradient of the batch SUM ``sum_b sum_t 1/2 |h_t(theta) - v_t|^2`` through the unrolled graph.
    """
    hs = paper_states(p, x)
    last = hs[-1].detach().requires_grad_()  # [B, H]
    loss = loss_fn(last @ p["readout.weight"].T + p["readout.bias"], y)
    g_out_w, g_out_b, g_last = torch.autograd.grad(loss, [p["readout.weight"], p["readout.bias"], last])
    w = p["rnn.weight_hh_l0"].detach()  # [H, H]
    chol = torch.linalg.cholesky(w.T @ w + reg * torch.eye(w.shape[0], dtype=w.dtype))  # [H, H], lower
    target = last.detach() - lr_target * g_last  # [B, H]: v_T
    residuals = 0.0
    for t in range(len(hs) - 1, 0, -1):
        residuals = residuals + 0.5 * (hs[t] - target).square().sum()  # batch sum
        h_t = hs[t].detach()
        direction = (target - h_t) / (1 - h_t.clamp(-1 + EPS, 1 - EPS).square())  # [B, H]
        target = hs[t - 1].detach() + torch.cholesky_solve((direction @ w).T, chol).T  # [B, H]: rows W^T d, solved
    names = [f"rnn.{n}" for n in RNN_NAMES]
    grads = dict(zip(names, torch.autograd.grad(residuals, [p[n] for n in names]), strict=True))
    return {**grads, "readout.weight": g_out_w, "readout.bias": g_out_b}


def paper_tp_run(params, batches, loss_fn, *, lr: float, lr_target: float, reg: float) -> dict[str, torch.Tensor]:
    """``N_STEPS`` of the paper's TP: plain SGD (``torch.optim.SGD(lr)``, no momentum) over all parameters."""
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    for x, y in batches:
        grads = paper_tp_grads(p, x, y, loss_fn, lr_target=lr_target, reg=reg)
        with torch.no_grad():
            for k in p:
                p[k] -= lr * grads[k]
    return {k: v.detach() for k, v in p.items()}


def paper_grad_run(params, batches, loss_fn, *, lr: float, momentum: float) -> dict[str, torch.Tensor]:
    """``N_STEPS`` of the paper's gradient run: BPTT, ``torch.optim.SGD`` with Nesterov iff ``momentum != 0``."""
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(p.values(), lr=lr, momentum=momentum, nesterov=momentum != 0)
    for x, y in batches:
        opt.zero_grad()
        loss_fn(paper_states(p, x)[-1] @ p["readout.weight"].T + p["readout.bias"], y).backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


# --------------------------------------------------------------------------------------------------------------------
# seqtp on the same problem


def seqtp_model(params: dict[str, torch.Tensor]) -> RNNModel:
    classes = params["readout.bias"].shape[0]
    model = RNNModel(INPUT, HIDDEN, classes, nonlinearity="tanh", readout="last").double()
    model.load_state_dict(params)
    return model


def seqtp_run(model: RNNModel, method, optimizer, batches, loss_fn) -> dict[str, torch.Tensor]:
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        method.backward(model, x, lambda s, y=y: loss_fn(model.read(s), y))
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_update_error(start, ref, got) -> dict[str, float]:
    """Per parameter: ``|(got - start) - (ref - start)| / |ref - start|`` (the updates, not the parameters, so that a
    small learning rate cannot hide a wrong update)."""
    out = {}
    for k in ref:
        step = ref[k] - start[k]
        assert step.norm() > 0, k
        out[k] = ((got[k] - start[k]) - step).norm().item() / step.norm().item()
    return out


def config_task_kind(path: Path) -> str:
    return TASKS[load_config(path).task.name].kind


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_config_tp_reproduces_paper_update(path: Path) -> None:
    """seqtp built from the config (method and optimizer) makes the paper code's TP steps, to rounding."""
    paper = PAPER_CODE[path.stem]
    cfg = load_config(path, method="tp")
    kind = config_task_kind(path)
    params, batches = problem(kind, seed=len(path.stem))
    loss_fn = task_loss(kind)
    ref = paper_tp_run(params, batches, loss_fn, lr=paper["lr"], lr_target=paper["lr_target"], reg=paper["reg"])
    model = seqtp_model(params)
    got = seqtp_run(model, build_method(cfg), build_optimizer(cfg, model), batches, loss_fn)
    errors = relative_update_error(params, ref, got)
    assert max(errors.values()) < 1e-10, errors
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_config_bptt_reproduces_paper_update(path: Path) -> None:
    """The config's BPTT section makes the paper code's gradient steps (optimizer, momentum, Nesterov, no clip)."""
    paper = PAPER_CODE[path.stem]
    cfg = load_config(path, method="bptt")
    kind = config_task_kind(path)
    params, batches = problem(kind, seed=len(path.stem))
    loss_fn = task_loss(kind)
    ref = paper_grad_run(params, batches, loss_fn, lr=paper["grad_lr"], momentum=paper["grad_momentum"])
    model = seqtp_model(params)
    got = seqtp_run(model, build_method(cfg), build_optimizer(cfg, model), batches, loss_fn)
    errors = relative_update_error(params, ref, got)
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_config_protocol(path: Path) -> None:
    """Batch size and budget of the paper's experiment, and the settings the exact mapping needs."""
    paper = PAPER_CODE[path.stem]
    cfg = load_config(path)
    assert cfg.train.batch_size == paper["batch"] and cfg.train.steps == paper["iters"]
    assert cfg.train.eval_every == 200  # exp_neck.nb_iter_per_log
    assert cfg.model.cell == "elman" and cfg.model.hidden_size == 100 and cfg.model.nonlinearity == "tanh"
    tp = cfg.tp
    assert (tp.mode, tp.update, tp.shift_cap, tp.eps) == ("linearized", "through_time", None, EPS)
    assert (tp.optimizer, tp.momentum) == ("sgd", 0.0)
    assert cfg.bptt.clip is None and cfg.bptt.truncation is None


def test_batch_scaled_mapping_needs_separate_readout_lr() -> None:
    """The other exact mapping, ``target_lr = lr_target / B`` with the RNN's learning rate ``x B`` and the readout's
    kept, also reproduces the paper's steps (it needs two parameter groups); with one learning rate it does not: the
    RNN's update is then ``B`` times too small, so the comparison above can fail."""
    paper = PAPER_CODE["temporal_order_60"]
    params, batches = problem("classification", seed=1)
    loss_fn = task_loss("classification")
    ref = paper_tp_run(params, batches, loss_fn, lr=paper["lr"], lr_target=paper["lr_target"], reg=paper["reg"])

    def method() -> TargetProp:
        return TargetProp(reg=paper["reg"], target_lr=paper["lr_target"] / BATCH, mode="linearized",
                          update="through_time", shift_cap=None, eps=EPS)

    model = seqtp_model(params)
    groups = [{"params": model.rnn.parameters(), "lr": paper["lr"] * BATCH},
              {"params": model.readout.parameters(), "lr": paper["lr"]}]
    got = seqtp_run(model, method(), torch.optim.SGD(groups), batches, loss_fn)
    assert max(relative_update_error(params, ref, got).values()) < 1e-10

    model = seqtp_model(params)
    got = seqtp_run(model, method(), torch.optim.SGD(model.parameters(), lr=paper["lr"]), batches, loss_fn)
    errors = relative_update_error(params, ref, got)
    assert min(errors[f"rnn.{n}"] for n in RNN_NAMES) > 0.5, errors  # about 1 - 1/B = 0.8 after N_STEPS steps
    assert errors["readout.weight"] < 0.5  # the readout only sees the RNN's change through h_T


@pytest.mark.parametrize("reg", [1e8, 1.0])
def test_through_time_update_is_scaled_bptt_plus_earlier_targets(reg: float) -> None:
    """The through-time update's last-step term is ``target_lr`` times the BPTT gradient of ``L`` (its residual is
    ``target_lr * dl_i/dh_T``); the earlier targets add ``M``-weighted terms, ``M = (W^T W + r I)^{-1} W^T -> 0`` as
    ``r -> infinity``. So with a large ``reg`` the RNN's TP gradient tends to ``target_lr`` times BPTT's, and at
    ``reg = 1`` it does not."""
    params, batches = problem("classification", seed=2)
    x, y = batches[0]
    loss_fn = task_loss("classification")
    gamma = 0.1
    grads = []
    for method in (TargetProp(reg=reg, target_lr=gamma, mode="linearized", update="through_time", eps=EPS), BPTT()):
        model = seqtp_model(params)
        method.backward(model, x, lambda s, model=model: loss_fn(model.read(s), y))
        grads.append(torch.cat([p.grad.flatten() for p in model.rnn.parameters()]))
    tp, bptt = grads
    error = ((tp - gamma * bptt).norm() / (gamma * bptt).norm()).item()
    assert error < 1e-6 if reg > 1e6 else error > 1e-2, error


# --------------------------------------------------------------------------------------------------------------------
# smoke: every paper config trains


def tiny(task: str, mnist_dir: Path | None) -> list[str]:
    """``--set`` pairs for a couple of iterations at tiny sizes (MNIST keeps its 784 steps)."""
    pairs = ["model.hidden_size=8", "train.batch_size=4", "task.val_size=16", "train.steps=2", "train.eval_every=1"]
    if task in MNIST_TASKS:
        return [*pairs, f"task.data_dir={mnist_dir}"]
    return [*pairs, "task.seq_len=10"]


@pytest.mark.parametrize("method", ["tp", "bptt"])
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_paper_config_trains(path: Path, method: str, tmp_path: Path, capsys, request) -> None:
    task = load_config(path).task.name
    mnist_dir = request.getfixturevalue("mnist_dir") if task in MNIST_TASKS else None
    out = tmp_path / "run"
    code = main(["train", str(path), "--out", str(out), "--set", *tiny(task, mnist_dir), "--method", method,
                 "--device", "cpu", "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
