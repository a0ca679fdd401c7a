"""Experiment configuration: frozen dataclasses hold the schema and defaults; YAML and ``--set`` only supply values.

Every key is type-checked (``int`` fields take integers, ``float`` fields take numbers, ``X | None`` fields also
take ``null``); unknown keys and bad values raise :class:`ConfigError` with one line naming the key.

The method sections follow the registry: one section per entry of ``seqtp.METHODS``, built from the method's
constructor (its keyword-only options with simple annotations) and its ``config_defaults`` (:func:`method_options`),
with the solvers' ``config_options`` for methods that take solver options; the values are checked by the method's
own constructor (and the named solver's). A new method needs no edit here.

The defaults are working settings: a config needs only ``task.name``. TP's are the settings of the paper's code
(Roulet & Harchaoui, TMLR 2023: target_lr 1e-2, reg 10, linearized targets, update through time, no shift cap)
with SGD at lr 0.05 instead of the paper's 0.1 (which solved temporal order T = 60 and then collapsed on seed 0
within 2,000 iterations); BPTT's are SGD lr 1e-2 with Nesterov momentum 0.9 and gradient clipping at 1.0. Both
were chosen on temporal order T = 60 (``docs/results/temporal_order_defaults.md``), not tuned for the other tasks.
The library classes (``seqtp.TargetProp``, ``seqtp.BPTT``, ...) keep their own defaults; the other methods' training
defaults are their ``config_defaults`` (docs/methods.md).
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

from .inverses import RULES, SOLVERS
from .methods import METHODS, Method
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
class TrainConfig:
    steps: int = 1000
    batch_size: int = 20
    eval_every: int = 100
    alignment_every: int = 0  # at evaluations whose step is a multiple of this: the update vs BPTT (0 = off)


_SIMPLE = (bool, int, float, str)
_NONE = type(None)


def _schema_type(annotation):
    """The config type of a constructor annotation: ``bool``/``int``/``float``/``str``, ``X | None``, or the one
    simple member of a wider union (``str | InverseSolver`` -> ``str``); ``None`` where there is none (``dict``)."""
    if annotation in _SIMPLE:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        simple = [a for a in args if a in _SIMPLE]
        if len(simple) == 1:
            return simple[0] | None if _NONE in args else simple[0]
    return None


def _solver_option_types() -> dict[str, tuple[type, tuple[str, ...]]]:
    """``key -> (type, owners)`` for every ``config_options`` key of the solvers in ``SOLVERS``, typed by the owners'
    constructor annotations (which must agree)."""
    out: dict[str, tuple[type, tuple[str, ...]]] = {}
    for name, cls in SOLVERS.items():
        hints = typing.get_type_hints(cls.__init__)
        for key in cls.config_options:
            tp = _schema_type(hints[key])
            if tp is None or typing.get_args(tp):
                raise TypeError(f"{cls.__name__}.config_options: {key!r} must be annotated bool, int, float or str")
            prev = out.get(key)
            if prev is not None and prev[0] is not tp:
                raise TypeError(f"solver option {key!r}: {prev[0].__name__} in {'/'.join(prev[1])}, {tp.__name__} in "
                                f"{name}")
            out[key] = (tp, (*prev[1], name) if prev else (name,))
    return out


SOLVER_OPTIONS_TYPES = _solver_option_types()
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {k: owners for k, (_, owners) in SOLVER_OPTIONS_TYPES.items()}
"""Config key -> the solvers that take it (from each solver's ``config_options``)."""


def method_options(cls: type[Method]) -> dict[str, tuple[type, object]]:
    """The method's own config fields: ``name -> (type, default)`` for each keyword-only constructor option with a
    simple annotation (see :class:`seqtp.Method`), defaults from ``config_defaults`` before the constructor's."""
    hints = typing.get_type_hints(cls.__init__)
    optimizer_keys = {f.name for f in dataclasses.fields(OptimizerFields)}
    out = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        tp = _schema_type(hints.get(p.name)) if p.kind is inspect.Parameter.KEYWORD_ONLY else None
        if tp is None:
            continue
        if p.name in optimizer_keys:  # one config key would set two things (e.g. a feedback's own momentum)
            raise TypeError(f"{cls.__name__}: option {p.name!r} clashes with the optimizer's config field; rename it")
        default = cls.config_defaults.get(p.name, p.default)
        if default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__name__}: option {p.name!r} has no default (give one in config_defaults)")
        out[p.name] = (tp, default)
    unknown = set(cls.config_defaults) - set(out) - optimizer_keys
    if unknown:
        raise TypeError(f"{cls.__name__}.config_defaults: {', '.join(sorted(unknown))} is not a config option")
    return out


def _section(name: str, cls: type[Method]) -> type:
    """The frozen dataclass of config section ``name``: :class:`OptimizerFields` (defaults from ``config_defaults``),
    the method's options, and for ``takes_solver_options`` methods every solver option (``None``: the solver's
    default)."""
    optimizer_types = typing.get_type_hints(OptimizerFields)
    fields = [(k, optimizer_types[k], field(default=cls.config_defaults[k])) for k in optimizer_types
              if k in cls.config_defaults]
    fields += [(k, tp, field(default=d)) for k, (tp, d) in method_options(cls).items()]
    if cls.takes_solver_options:
        fields += [(k, tp | None, field(default=None)) for k, (tp, _) in SOLVER_OPTIONS_TYPES.items()]
    doc = (f"Config section ``{name}:`` of :class:`{cls.__module__}.{cls.__qualname__}` (built from its constructor "
           f"and ``config_defaults``).")
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields, bases=(OptimizerFields,), frozen=True,
                                      namespace={"__doc__": doc, "__module__": __name__})


SECTIONS: dict[str, type] = {name: _section(name, cls) for name, cls in METHODS.items()}
"""Method name -> its config section's dataclass, one per entry of ``seqtp.METHODS``."""
TPConfig, BPTTConfig = SECTIONS["tp"], SECTIONS["bptt"]
METHOD_NAMES = tuple(METHODS)

Config = dataclasses.make_dataclass(
    "Config",
    [("seed", int, field(default=0)),
     ("device", str, field(default="auto")),  # auto | cpu | cuda | cuda:N
     ("method", str, field(default="tp")),  # a key of seqtp.METHODS
     ("task", TaskConfig, field(default_factory=TaskConfig)),
     ("model", ModelConfig, field(default_factory=ModelConfig)),
     ("train", TrainConfig, field(default_factory=TrainConfig)),
     *((name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items())],
    frozen=True,
    namespace={"__doc__": "The whole experiment: task, model, training, and one section per method of "
                          "``seqtp.METHODS``.", "__module__": __name__},
)


def method_kwargs(name: str, section) -> dict:
    """The constructor keywords of method ``name`` from its config section (solver options, where the method takes
    them, as ``solver_options`` with the keys that are set)."""
    cls = METHODS[name]
    kwargs = {k: getattr(section, k) for k in method_options(cls)}
    if cls.takes_solver_options:
        kwargs["solver_options"] = {k: getattr(section, k) for k in SOLVER_OPTIONS if getattr(section, k) is not None}
    return kwargs


def build_method(cfg) -> Method:
    """The method of ``cfg.method`` built from its section."""
    return METHODS[cfg.method](**method_kwargs(cfg.method, getattr(cfg, cfg.method)))


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
    for name in METHOD_NAMES:
        m = getattr(cfg, name)
        _one_of(m.optimizer, ("sgd", "adam"), f"{name}.optimizer")
        _check(m.lr > 0, f"{name}.lr", "must be > 0", m.lr)
        _check(0 <= m.momentum < 1, f"{name}.momentum", "must be in [0, 1)", m.momentum)
        _validate_method(cfg, name, m)


def _validate_method(cfg: Config, name: str, section) -> None:
    """A method's options are checked by its own constructor (and a named solver's by the solver's), so the schema
    holds no copy of their rules; each message is prefixed by the section (``tp.reg must be > 0, got -1.0``)."""
    cls = METHODS[name]
    kwargs = method_kwargs(name, section)

    def fail(e: Exception, owner: str):
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        known = msg.split(" ", 1)[0] in dataclasses.asdict(section)
        raise ConfigError(f"{name}.{msg}" if known else f"{name}: {owner}: {msg}") from None

    try:
        cls(**kwargs)
    except (ValueError, TypeError) as e:
        fail(e, cls.__name__)
    if not cls.takes_solver_options:
        return
    solver, options = section.solver, kwargs["solver_options"]
    rule = RULES[section.mode]
    if cfg.model.cell not in rule.cells:
        raise ConfigError(f"{name}.mode={section.mode} needs model.cell={' or '.join(rule.cells)}, got "
                          f"model.cell={cfg.model.cell}")
    for key, value in options.items():
        owners = SOLVER_OPTIONS[key]
        if solver not in owners:
            raise ConfigError(f"{name}.{key} does not apply to {name}.solver={solver} (it is an option of "
                              f"{' / '.join(owners)})")
        if not isinstance(value, str):
            _check(value > 0, f"{name}.{key}", "must be > 0 or null", value)
    if solver in SOLVERS:
        try:
            built = SOLVERS[solver](reg=section.reg, **options)
        except (ValueError, TypeError) as e:
            fail(e, SOLVERS[solver].__name__)
        if cfg.model.cell not in built.cells:
            raise ConfigError(f"{name}.solver={solver} needs model.cell={' or '.join(built.cells)}, got "
                              f"model.cell={cfg.model.cell}")
