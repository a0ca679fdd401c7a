"""The contracts of the two registries, checked for every entry: each solver of ``seqtp.SOLVERS`` (on every cell it
takes) and each method of ``seqtp.METHODS`` (built from its config section's defaults, so a new registry entry is
tested here without an edit). Float64, small random instances.

Solver contract (``seqtp.inverses.base.InverseSolver``): shapes and dtype follow the states; rows are independent;
``linearized`` is the Jacobian of ``invert`` at ``s_t`` (forward-mode autodiff as the independent computation);
``difference(t, 0) = 0``; solvers with ``fixed_point`` reproduce ``psi_t(s_t) = s_{t-1}``; ``propagate`` keeps the
last direct shift; ``report`` gives floats; the declared abilities (``trainable``, ``stateful``) hold and the
undeclared ones refuse.

Method contract (``seqtp.methods.base.Method``): ``backward`` accumulates into ``.grad`` of every parameter (two calls
from the same state give twice one call), returns the forward loss and detached stats, and gives the readout its
ordinary gradient; ``targets`` (methods with ``has_targets``) writes no ``.grad`` and gives ``[B, T, S]`` shifts;
a stateful method resumed from ``state_dict`` continues bit for bit; ``seqtp.alignment`` leaves the method's state
as it was; the config section of every method builds the method, and each trains from ``seqtp train``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

import seqtp
from seqtp._cells import make_cell
from seqtp.config import SECTIONS, Config, ConfigError, build_method, load_config, method_kwargs, method_options
from seqtp.inverses import SOLVERS, InverseSolver

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
# Options that make each solver converge to rounding on these small instances (the solvers' own tests cover their
# defaults and rates); the learned inverse trains a little before it is checked.
TIGHT = {"gauss_newton": {"tol": 1e-13, "max_iter": 30}, "dense": {"tol": 1e-13, "max_iter": 30},
         "iterated": {"steps": 60}}


def solver_cells(name: str) -> tuple[str, ...]:
    """The cells solver ``name`` takes, as it declares them (``InverseSolver.cells``; the iterated inverse takes its
    default base's)."""
    return SOLVERS[name](reg=0.5).cells


def fit_loss(value) -> float:
    """A trainable solver's ``fit`` returns its loss as a Python float or a 0-d tensor (no host sync)."""
    assert isinstance(value, float) or (torch.is_tensor(value) and value.ndim == 0), value
    return float(value)


SOLVER_CASES = [(name, kind) for name in SOLVERS for kind in solver_cells(name)]


def problem(kind: str, *, batch=4, seq_len=5, seed=0):
    torch.manual_seed(seed)
    model = seqtp.RNNModel(3, 4, 2, cell=kind).to(F64)
    cell = make_cell(model)
    x = 0.5 * torch.randn(batch, seq_len, 3, dtype=F64)
    return model, cell, x, cell.unroll(x)


def bound_solver(name: str, kind: str) -> tuple[InverseSolver, object, torch.Tensor, torch.Tensor]:
    _, cell, x, states = problem(kind)
    solver = SOLVERS[name](reg=0.5, **TIGHT.get(name, {}))
    if solver.trainable:
        for _ in range(3):
            solver.fit(cell, x, states)
    return solver.bind(cell, x, states), cell, x, states


@pytest.mark.parametrize(("name", "kind"), SOLVER_CASES)
def test_solver_shapes_dtype_and_row_independence(name, kind):
    solver, cell, x, states = bound_solver(name, kind)
    gen = torch.Generator().manual_seed(1)
    v = states[:, 3] + 0.05 * torch.randn(states[:, 3].shape, generator=gen, dtype=F64)  # [B, S]
    out = solver.invert(3, v)
    assert out.shape == v.shape and out.dtype == F64
    # row 0 alone (a batch of one, re-bound) gives row 0 of the batch: the rows are separate problems
    alone = SOLVERS[name](reg=0.5, **TIGHT.get(name, {}))
    if alone.stateful:
        alone.load_state_dict(solver.state_dict())
    alone.bind(cell, x[:1], states[:1])
    torch.testing.assert_close(alone.invert(3, v[:1]), out[:1], rtol=1e-9, atol=1e-11)
    delta = v - states[:, 3]
    torch.testing.assert_close(alone.linearized(3, delta[:1]), solver.linearized(3, delta)[:1], rtol=1e-9, atol=1e-11)
    # float32 states give float32 targets (device and dtype come from the inputs)
    cell32 = make_cell(seqtp.RNNModel(3, 4, 2, cell=kind))
    x32 = x.float()  # [B, T, D]
    states32 = cell32.unroll(x32)  # [B, T, S]
    solver32 = SOLVERS[name](reg=0.5)
    if solver32.trainable:
        assert fit_loss(solver32.fit(cell32, x32, states32)) is not None
    solver32.bind(cell32, x32, states32)
    assert solver32.invert(3, states32[:, 3]).dtype == torch.float32
    assert solver32.propagate(0.01 * torch.ones_like(states32)).dtype == torch.float32


@pytest.mark.parametrize(("name", "kind"), SOLVER_CASES)
def test_solver_linearized_is_the_jacobian_of_invert(name, kind):
    """Against central differences of ``invert`` (step ``h = 1e-4``): truncation error ``O(h^2 |psi'''|) ~ 1e-8``, plus
    the iterative solvers' residual (converged to ~1e-13 by TIGHT, so ~1e-9 after the division by ``h``). Not
    forward-mode autodiff of ``invert``: an iterative solver started at ``s_{t-1}`` stops at once at ``v = s_t``, so
    the tangent of its iterates there is not its Jacobian."""
    solver, _, _, states = bound_solver(name, kind)
    gen = torch.Generator().manual_seed(2)
    h = 1e-4
    for t in (1, states.shape[1] - 1):
        delta = 0.1 * torch.randn(states[:, t].shape, generator=gen, dtype=F64)  # [B, S]
        expected = (solver.invert(t, states[:, t] + h * delta) - solver.invert(t, states[:, t] - h * delta)) / (2 * h)
        torch.testing.assert_close(solver.linearized(t, delta), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("name", "kind"), SOLVER_CASES)
def test_solver_fixed_point_difference_and_propagate(name, kind):
    solver, _, _, states = bound_solver(name, kind)
    for t in range(1, states.shape[1]):
        zero = solver.difference(t, torch.zeros_like(states[:, t]))
        torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-12)
        if solver.fixed_point:
            torch.testing.assert_close(solver.invert(t, states[:, t]), states[:, t - 1], rtol=0, atol=1e-10)
    direct = torch.zeros_like(states)
    direct[:, -1] = 0.01
    for mode in [m for m, rule in seqtp.RULES.items() if kind in rule.cells]:
        deltas = solver.propagate(direct, mode=mode)
        assert deltas.shape == states.shape and torch.isfinite(deltas).all()
        torch.testing.assert_close(deltas[:, -1], direct[:, -1], rtol=0, atol=0)
    assert all(isinstance(v, float) for v in solver.report().values())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_refuses_the_cells_it_does_not_declare(name):
    for kind in sorted({"elman", "gru", "lstm"} - set(solver_cells(name))):
        _, cell, x, states = problem(kind)
        with pytest.raises(TypeError, match="cell"):
            SOLVERS[name](reg=0.5).bind(cell, x, states)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_rule_refuses_the_cells_it_does_not_declare(kind):
    solver, *_ = bound_solver("dense", kind)
    direct = torch.zeros_like(solver.states)
    for name, rule in seqtp.RULES.items():
        if kind not in rule.cells:
            with pytest.raises(TypeError, match="cell"):
                solver.propagate(direct, mode=name)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_declared_abilities(name):
    solver, cell, x, states = bound_solver(name, solver_cells(name)[-1])
    if not solver.trainable:
        with pytest.raises(NotImplementedError):
            solver.fit(cell, x, states)
    else:
        assert fit_loss(solver.fit(cell, x, states)) is not None
    if not solver.stateful:
        assert solver.state_dict() == {}
        return
    # a copy restored from the state inverts identically, and continues training identically
    twin = SOLVERS[name](reg=0.5, **TIGHT.get(name, {}))
    twin.load_state_dict(copy.deepcopy(solver.state_dict()))
    twin.bind(cell, x, states)
    solver.bind(cell, x, states)
    v = states[:, 2] + 0.03
    assert torch.equal(twin.invert(2, v), solver.invert(2, v))
    if solver.trainable:
        assert fit_loss(solver.fit(cell, x, states)) == fit_loss(twin.fit(cell, x, states))


# -- methods -------------------------------------------------------------------------------------------------------

def default_method(name: str):
    """Method ``name`` with its config defaults, gradient clipping off (it rescales every gradient, the readout's
    included, and acts on the accumulated ``.grad``, as ``torch.nn.utils.clip_grad_norm_`` does)."""
    section = getattr(Config(), name)
    if "clip" in dataclasses.asdict(section):
        section = dataclasses.replace(section, clip=None)
    return seqtp.METHODS[name](**method_kwargs(name, section))


METHOD_CASES = {name: (lambda name=name: default_method(name)) for name in seqtp.METHODS}
METHOD_CASES["bptt-clip"] = lambda: build_method(Config(method="bptt"))
METHOD_CASES["tp-learned"] = lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1, mode="difference", solver="learned")
METHOD_CASES["tp-local"] = lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1, update="local")


def method_problem(seed=0):
    torch.manual_seed(seed)
    model = seqtp.RNNModel(3, 5, 2).to(F64)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 6, 3, generator=gen, dtype=F64)
    y = torch.randn(4, 2, generator=gen, dtype=F64)
    return model, x, lambda h, model=model: (model.readout(h[:, -1]) - y).square().sum(-1).mean()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_accumulates_and_gives_the_readout_its_gradient(case):
    model, x, loss_fn = method_problem()
    method = METHOD_CASES[case]()
    state = copy.deepcopy(method.state_dict())
    loss, stats = method.backward(model, x, loss_fn)
    once = grads(model)
    assert all(torch.isfinite(g).all() for g in once.values()), case
    assert not loss.requires_grad and all(not torch.as_tensor(v).requires_grad for v in stats.values())
    torch.testing.assert_close(loss, loss_fn(model.states(x)), rtol=1e-12, atol=0)
    # readout: the ordinary gradient of the loss, whatever the method does with the RNN (BPTT's clipping scales
    # every gradient, the readout's included)
    ref, _, _ = method_problem()
    ref.load_state_dict(model.state_dict())
    loss_fn(ref.states(x), model=ref).backward()
    if case == "bptt-clip":
        return  # the clip rescales the readout's gradient too, and acts on the accumulated .grad
    for n in ("readout.weight", "readout.bias"):
        torch.testing.assert_close(once[n], dict(ref.named_parameters())[n].grad, rtol=1e-12, atol=1e-14)
    # accumulation: the same call from the same state adds the same gradient again
    twin = METHOD_CASES[case]()
    twin.load_state_dict(copy.deepcopy(state))
    if state or not method.state_dict():  # (a state created at the first call: the twin starts fresh, as method did)
        twin.backward(model, x, loss_fn)
        for n, g in grads(model).items():
            torch.testing.assert_close(g, 2 * once[n], rtol=1e-10, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_on_cuda(case):
    """On CUDA (float64): every gradient stays on the device, the stats are scalars, the state resumes bit for bit
    there, and a method without state (its randomness, if any, comes from a generator on the states' device) gives
    the CPU's gradients to 1e-10; a method with state is checked against itself (CUDA and CPU noise streams differ)."""
    cuda = torch.device("cuda")
    model, x, loss_fn = method_problem()
    gpu_model = copy.deepcopy(model).to(cuda)
    gen = torch.Generator().manual_seed(1)
    torch.randn(4, 6, 3, generator=gen, dtype=F64)  # the draws of method_problem: x, then y
    y = torch.randn(4, 2, generator=gen, dtype=F64).to(cuda)

    def gpu_loss(h, model=gpu_model):
        return (model.readout(h[:, -1]) - y).square().sum(-1).mean()

    method = METHOD_CASES[case]()
    _, stats = method.backward(gpu_model, x.to(cuda), gpu_loss)
    gpu = {n: p.grad for n, p in gpu_model.named_parameters()}
    assert all(g.is_cuda and torch.isfinite(g).all() for g in gpu.values()), case
    assert all(torch.as_tensor(v).ndim == 0 for v in stats.values()), case
    state = copy.deepcopy(method.state_dict())
    if not state:
        cpu_method = METHOD_CASES[case]()
        cpu_method.backward(model, x, loss_fn)
        for n, g in grads(model).items():
            torch.testing.assert_close(gpu[n].cpu(), g, rtol=1e-10, atol=1e-12)
        return
    gpu_model.zero_grad(set_to_none=True)
    method.backward(gpu_model, x.to(cuda), gpu_loss)
    expected = {n: p.grad.clone() for n, p in gpu_model.named_parameters()}
    resumed = METHOD_CASES[case]()
    resumed.load_state_dict(state)
    gpu_model.zero_grad(set_to_none=True)
    resumed.backward(gpu_model, x.to(cuda), gpu_loss)
    for n, p in gpu_model.named_parameters():
        assert torch.equal(p.grad, expected[n]), (case, n)


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_targets_write_no_grad(case):
    model, x, loss_fn = method_problem()
    method = METHOD_CASES[case]()
    if not method.has_targets:
        with pytest.raises(NotImplementedError):
            method.targets(model, x, loss_fn)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    states, deltas = method.targets(model, x, loss_fn)
    assert all(p.grad is None for p in model.parameters())
    assert states.shape == deltas.shape and states.shape[:2] == x.shape[:2]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_resumes_bit_for_bit_and_alignment_keeps_its_state(case):
    """Two backward calls equal one call, a save through ``state_dict`` into a fresh method, and one call."""
    model, x, loss_fn = method_problem()
    straight = METHOD_CASES[case]()
    straight.backward(model, x, loss_fn)
    state = copy.deepcopy(straight.state_dict())
    seqtp.alignment(model, x, loss_fn, straight)  # must leave the method's state as it was
    model.zero_grad(set_to_none=True)
    straight.backward(model, x, loss_fn)
    expected = grads(model)
    resumed = METHOD_CASES[case]()
    resumed.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    resumed.backward(model, x, loss_fn)
    for n, g in grads(model).items():
        assert torch.equal(g, expected[n]), (case, n)


@pytest.mark.parametrize("name", list(seqtp.METHODS))
def test_every_method_has_a_config_section_that_builds_it(name):
    section = SECTIONS[name]()
    assert getattr(Config(), name) == section
    method = seqtp.METHODS[name](**method_kwargs(name, section))
    assert type(method) is seqtp.METHODS[name]
    cfg = load_config(None, ["task.name=adding", f"method={name}", f"{name}.lr=0.5"])
    assert getattr(cfg, name).lr == 0.5
    # a bad value is refused with one line naming the key
    with pytest.raises(ConfigError, match=rf"^{name}\.lr must be > 0"):
        load_config(None, ["task.name=adding", f"{name}.lr=-1"])


def test_an_option_that_clashes_with_the_optimizer_fields_is_refused():
    class Clash(seqtp.Method):
        def __init__(self, *, momentum: float = 0.0):
            self.momentum = momentum

        def backward(self, model, x, loss_fn):
            raise NotImplementedError

    with pytest.raises(TypeError, match="clashes with the optimizer"):
        method_options(Clash)

    class Stray(Clash):
        config_defaults = {"mommentum": 0.5}

        def __init__(self, *, beta: float = 0.0):
            self.beta = beta

    with pytest.raises(TypeError, match="mommentum is not a config option"):
        method_options(Stray)


CONFIG_FILES = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", list(seqtp.METHODS))
@pytest.mark.parametrize("config", CONFIG_FILES)
def test_every_method_trains_from_the_cli_on_every_config(name, config, tmp_path, capsys, request):
    """Every shipped YAML file (``configs/`` and ``configs/paper/``), shrunk: the synthetic tasks to ``T = 10``, MNIST
    (784 steps kept) on the offline copy (skipped where it is absent)."""
    import yaml

    from seqtp.cli import main

    path = ROOT / "configs" / config
    task = yaml.safe_load(path.read_text())["task"]["name"]
    shrink = ["train.steps=3", "train.eval_every=3", "task.val_size=8", "model.hidden_size=6", "train.batch_size=4"]
    if task in ("pixel_mnist", "permuted_mnist"):
        shrink.append(f"task.data_dir={request.getfixturevalue('mnist_dir')}")
    else:
        shrink.append("task.seq_len=10")
    code = main(["train", str(path), "--method", name, "--out", str(tmp_path / "r"), "--no-progress", "--set", *shrink])
    assert code == 0, capsys.readouterr().err


def test_a_run_from_before_a_method_was_added_still_resumes(tmp_path):
    """A run folder's config.yaml without the sections of methods registered since (and without an option added
    since) resumes: the schema fills them with their defaults."""
    import yaml

    from seqtp.train import train

    cfg = load_config(ROOT / "configs" / "adding.yaml", ["train.steps=2", "train.eval_every=1", "task.val_size=8",
                                                          "model.hidden_size=4", "task.seq_len=10"])
    run = tmp_path / "run"
    train(cfg, run, device="cpu", progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    for name in seqtp.METHODS:
        if name not in ("tp", "bptt"):
            del stored[name]
    del stored["tp"]["noise"]
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    more = load_config(ROOT / "configs" / "adding.yaml", ["train.steps=3", "train.eval_every=1", "task.val_size=8",
                                                           "model.hidden_size=4", "task.seq_len=10"])
    assert train(more, run, device="cpu", resume=True, progress=False).status == "completed"
