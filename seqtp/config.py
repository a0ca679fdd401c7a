"""Experiment configuration: frozen dataclasses hold the schema and defaults; YAML and ``--set`` only supply values.

Every key is type-checked (``int`` fields take integers, ``float`` fields take numbers, ``X | None`` fields also
take ``null``); unknown keys and bad values raise :class:`ConfigError` with one line naming the key.

The defaults are working settings: a config needs only ``task.name``. TP's are the settings of the paper's code
(Roulet & Harchaoui, TMLR 2023: target_lr 1e-2, reg 10, linearized targets, update through time, no shift cap)
with SGD at lr 0.05 instead of the paper's 0.1 (which solved temporal order T = 60 and then collapsed on seed 0
within 2,000 iterations); BPTT's are SGD lr 1e-2 with Nesterov momentum 0.9 and gradient clipping at 1.0. Both
were chosen on temporal order T = 60 (``docs/results/temporal_order_defaults.md``), not tuned for the other tasks.
The library classes (``seqtp.TargetProp``, ``seqtp.BPTT``) keep their own defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ._targets import SOLVERS
from .tasks import TASKS


class ConfigError(ValueError):
    """A bad configuration file, key or value (the message is one line naming it)."""


@dataclass(frozen=True)
class TaskConfig:
    """The task (see ``seqtp.tasks.TASKS``). ``name`` is required; ``None`` options are left to the task's own
    default; an option set on a task that does not take it is an error."""

    name: str | None = None  # required: one of seqtp.tasks.TASKS
    seq_len: int = 100  # copying: the delay T (sequence length T + 20); MNIST tasks: 784
    val_size: int = 1000  # size of the fixed validation set
    variant: str | None = None  # adding: "le2015" | "paper"
    bits: int | None = None  # temporal_order: 1 | 3
    data_dir: str | None = None  # pixel/permuted MNIST: folder of IDX files (else $SEQTP_DATA_DIR, the hub, ../shared)
    permutation_seed: int | None = None  # permuted_mnist


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "elman"  # elman | gru | lstm
    hidden_size: int = 100
    nonlinearity: str = "tanh"  # tanh | relu | identity (elman only)
    init: str = "orthogonal"  # orthogonal | default


@dataclass(frozen=True)
class OptimizerFields:
    """Optimizer of one method (for every parameter, readout included)."""

    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only


@dataclass(frozen=True)
class TPConfig(OptimizerFields):
    """TP by regularized inversion (``seqtp.TargetProp``); the defaults are the paper code's settings, with SGD at
    ``lr = 0.05`` (the paper's 0.1 is unstable on temporal order T = 60)."""

    lr: float = 0.05
    reg: float = 10.0
    target_lr: float = 1e-2
    mode: str = "linearized"  # linearized | difference | exact
    update: str = "through_time"  # local | through_time
    eps: float = 1e-3
    shift_cap: float | None = None  # |delta_t| <= shift_cap * |h_t| at every step
    solver: str = "auto"  # auto (elman: analytic; GRU/LSTM: dense for small states, else gauss_newton) | a SOLVERS name
    space: str | None = None  # gauss_newton: output | preactivation (elman only)
    tol: float | None = None  # gauss_newton / iterated: stopping tolerance
    max_iter: int | None = None  # gauss_newton: Gauss-Newton iterations
    steps: int | None = None  # iterated: refinement steps K
    feedback_lr: float | None = None  # learned: SGD step of the feedback cell
    noise: float | None = None  # learned: reconstruction noise sigma


@dataclass(frozen=True)
class BPTTConfig(OptimizerFields):
    """Backprop through time (``seqtp.BPTT``): SGD with Nesterov momentum and gradient clipping by default."""

    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    clip: float | None = 1.0  # global gradient-norm clipping (null: none)
    truncation: int | None = None  # truncated BPTT every k steps


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 20
    eval_every: int = 100
    alignment_every: int = 0  # at evaluations whose step is a multiple of this: the update vs BPTT (0 = off)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    method: str = "tp"  # tp | bptt
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tp: TPConfig = field(default_factory=TPConfig)
    bptt: BPTTConfig = field(default_factory=BPTTConfig)


METHOD_NAMES = ("tp", "bptt")
# tp.<key> options that are handed to the solver: each belongs to the solvers of ``SOLVERS`` whose constructor
# takes it (read from their signatures, so a new solver needs no edit here).
_SOLVER_KEYS = ("space", "tol", "max_iter", "steps", "feedback_lr", "noise")
SOLVER_OPTIONS = {
    key: tuple(name for name, cls in SOLVERS.items() if key in inspect.signature(cls).parameters)
    for key in _SOLVER_KEYS
}


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, or ``X | None``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected float (a finite number), got {value!r}")
    return float(value) if tp is float else value


def _build(cls, data, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}' in {source} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.", source)
        else:
            values[key] = _coerce(value, tp, full)
    return cls(**values)


def _set_path(data: dict, dotted: str, value, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{dotted}' goes through a non-mapping key '{p}'")
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict:
    """``["a.b=v", ...]`` -> nested dict; values are parsed as YAML scalars (``0.1``, ``true``, ``null``, ``tp``)."""
    data: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value, "--set")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **extra) -> Config:
    """Build a validated :class:`Config` from a YAML file, ``--set`` pairs and keyword overrides.

    Args:
        path: YAML file (``None``: defaults only).
        overrides: ``["train.steps=100", ...]`` applied after the file.
        extra: top-level values applied last (e.g. ``method="bptt"``), ``None`` values ignored.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type or invalid value.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} / --set" if path is not None else "--set"
    data = _merge(data, {k: v for k, v in extra.items() if v is not None})
    cfg = _build(Config, data, "", source)
    validate(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "config") -> Config:
    cfg = _build(Config, data, "", source)
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key} {msg}, got {value!r}")


def _one_of(value, choices, key: str) -> None:
    _check(value in choices, key, f"must be one of {', '.join(map(str, choices))}", value)


def validate(cfg: Config) -> None:
    """Value checks beyond types (ranges and choices); raises :class:`ConfigError` naming the key."""
    if cfg.task.name is None:
        raise ConfigError(f"task.name is required (one of {', '.join(TASKS)})")
    _one_of(cfg.task.name, tuple(TASKS), "task.name")
    _one_of(cfg.method, METHOD_NAMES, "method")
    _check(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    dev = cfg.device
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "device",
           "must be auto, cpu, cuda or cuda:N", dev)
    _check(cfg.task.seq_len >= 1, "task.seq_len", "must be >= 1", cfg.task.seq_len)
    _check(cfg.task.val_size >= 1, "task.val_size", "must be >= 1", cfg.task.val_size)
    _check(cfg.model.hidden_size >= 1, "model.hidden_size", "must be >= 1", cfg.model.hidden_size)
    _one_of(cfg.model.cell, ("elman", "gru", "lstm"), "model.cell")
    _one_of(cfg.model.nonlinearity, ("tanh", "relu", "identity"), "model.nonlinearity")
    if cfg.model.cell != "elman" and cfg.model.nonlinearity != "tanh":
        raise ConfigError(f"model.nonlinearity={cfg.model.nonlinearity} applies to elman cells only, got "
                          f"model.cell={cfg.model.cell}")
    _one_of(cfg.model.init, ("orthogonal", "default"), "model.init")
    for name in ("steps", "batch_size", "eval_every"):
        value = getattr(cfg.train, name)
        _check(value >= 1, f"train.{name}", "must be >= 1", value)
    _check(cfg.train.alignment_every >= 0, "train.alignment_every", "must be >= 0 (0 = off)",
           cfg.train.alignment_every)
    for section in METHOD_NAMES:
        m = getattr(cfg, section)
        _one_of(m.optimizer, ("sgd", "adam"), f"{section}.optimizer")
        _check(m.lr > 0, f"{section}.lr", "must be > 0", m.lr)
        _check(0 <= m.momentum < 1, f"{section}.momentum", "must be in [0, 1)", m.momentum)
    tp = cfg.tp
    _check(tp.reg > 0, "tp.reg", "must be > 0", tp.reg)
    _check(tp.target_lr > 0, "tp.target_lr", "must be > 0", tp.target_lr)
    _one_of(tp.mode, ("linearized", "difference", "exact"), "tp.mode")
    _one_of(tp.update, ("local", "through_time"), "tp.update")
    _check(0 < tp.eps < 1, "tp.eps", "must be in (0, 1)", tp.eps)
    _check(tp.shift_cap is None or tp.shift_cap > 0, "tp.shift_cap", "must be > 0 or null", tp.shift_cap)
    _one_of(tp.solver, ("auto", *SOLVERS), "tp.solver")
    if tp.solver == "analytic" and cfg.model.cell != "elman":
        raise ConfigError(f"tp.solver=analytic needs model.cell=elman, got model.cell={cfg.model.cell}")
    if tp.space is not None:
        _one_of(tp.space, ("output", "preactivation"), "tp.space")
    for key, owners in SOLVER_OPTIONS.items():
        value = getattr(tp, key)
        if value is not None and tp.solver not in owners:
            raise ConfigError(f"tp.{key} does not apply to tp.solver={tp.solver} (it is an option of "
                              f"{' / '.join(owners)})")
        if value is not None and key != "space":
            _check(value > 0, f"tp.{key}", "must be > 0 or null", value)
    b = cfg.bptt
    _check(b.clip is None or b.clip > 0, "bptt.clip", "must be > 0 or null", b.clip)
    _check(b.truncation is None or b.truncation >= 1, "bptt.truncation", "must be >= 1 or null", b.truncation)
