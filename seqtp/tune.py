"""Fair hyperparameter tuning on Optuna: ``seqtp tune``, one study per (config, method), equal budgets.

    seqtp tune configs/temporal_order.yaml --method tp --trials 30 --seeds 0,1,2
    seqtp tune configs/temporal_order.yaml --method bptt --trials 30 --seeds 0,1,2      # the same budget
    seqtp tune CONFIG --method tp --grid tp.reg=0.3,1,10 tp.lr=0.03,0.1              # exactly this grid
    seqtp tune CONFIG --method tp --trials 30 --space tp.lr=1e-3:1 tp.momentum=0:0.95 tp.reg=off

What one study is:

- **Search space.** The method's hyperparameters, read against the config schema (the method's section,
  :data:`seqtp.config.SECTIONS`): every value a trial takes is set through the ``--set`` machinery of
  :mod:`seqtp.config`, so a key the schema does not know, a wrong type or a bad value is rejected by the schema's own
  checks (one line, exit 2). Defaults (:data:`DEFAULT_SPACE`, each method's ``search_space``, all
  log-uniform): tp ``lr`` [1e-3, 1], ``target_lr`` [1e-3, 1], ``reg`` [1e-1, 1e2]; bptt ``lr`` [1e-4, 1], ``clip``
  [1e-2, 1e2]; the others in ``seqtp tune --help``. ``--space`` changes
  or adds a key of the method's section: ``KEY=LOW:HIGH`` (log-uniform when ``LOW > 0``, else uniform; force with a
  third field ``:log`` or ``:linear``; integer keys draw integers), ``KEY=V1,V2,...`` (choices, e.g.
  ``tp.mode=linearized,difference``, ``tp.nesterov=true,false``), ``KEY=off`` (keep the config's value). Every
  other key keeps the config's value (after ``--set``).
- **Sampler.** TPE, seeded: trial ``n`` is drawn by ``TPESampler(seed=sampler_seed + n)`` from the trials before
  it, so a study run by one worker is reproducible, also when it is continued in several invocations (``5`` trials
  at once or ``3`` then ``5`` give the same trials). With ``--grid KEY=V1,V2 ...`` the sampler is Optuna's
  ``GridSampler`` over exactly those keys (the product of the values, in an order shuffled by the sampler seed;
  other keys keep the config's value): the study runs each grid point once (``--trials`` may ask for fewer, not
  more); ``--grid`` excludes ``--space``.
- **Objective** (minimized): the mean over ``--seeds`` (default: the config's ``seed``) of each seed's **final**
  validation loss (the last evaluation, ``train.steps``; not the best one, which would select an early-stopping
  point the trained config does not reproduce). Loss, not accuracy: it is defined for every task. Every trial uses
  the same seeds, hence the same initial weights and data streams.
- **Pruning.** Every evaluation of every seed reports its validation loss to Optuna as an intermediate value, at
  step ``k * (train.steps + 1) + step`` for the ``k``-th seed, so each (seed, iteration) is compared with the same
  (seed, iteration) of the other trials. The default pruner is ``MedianPruner(n_startup_trials=3,
  n_warmup_steps=train.steps // 4)``: after 3 finished trials, a trial whose best loss so far is above the median of
  the finished trials' losses at the same point stops (state ``PRUNED``, status ``pruned``). ``--pruner none``
  turns it off.
- **Divergence** (``train`` returns ``status="diverged"``: non-finite loss, gradient or validation loss) is a
  result, not a crash: the trial is recorded as ``PRUNED`` with the user attribute ``status="diverged"`` and the
  message, so TPE ranks it below every completed trial (Optuna's TPE ignores ``FAIL`` trials) and the other seeds
  of that trial are skipped. ``FAIL`` is kept for trials that produced no result (Ctrl-C, a crashed worker).
- **Budget and continuation.** ``--trials N`` means up to ``N`` trials **in total** in the study: completed,
  pruned (diverged included) and running ones count, failed ones do not (they are re-run), so a second
  ``seqtp tune`` with the same ``--trials`` does nothing, ``--trials 40`` after 30 adds 10, and two workers started
  with ``--trials N`` together run ``N`` (a race between two workers starting a trial at the same instant can add
  one more per extra worker). The study name is ``<config file stem>-<method>``; a study that exists in the
  storage is continued, and its stored setup (resolved config, seeds, space or grid) must match (``device``
  excepted): a different setup is a one-line error, so a study never mixes budgets. The budget is printed at the
  start: trials x seeds x iterations; run the other method with the same ``--trials``, ``--seeds`` and config for a
  fair comparison.
- **Storage.** Default ``sqlite:///DIR/study.db`` (nothing to start). Several workers share a study through one
  ``--storage`` URL: two local processes on one SQLite file (``seqtp tune CONFIG --method tp --trials 40
  --out runs/t`` in two shells; SQLite serializes the writes, fine for a few local workers), or a PostgreSQL URL
  for a cluster (``--storage postgresql://user:password@host/db``, needs ``psycopg2``; each node writes its trial
  folders under its own ``--out``). Heartbeats (60 s) mark the running trials of a killed worker as failed after
  180 s, so the budget re-runs them.

Outputs in ``--out`` (default ``runs/<config stem>-tune-<method>``): ``study.db``; ``trials/<number>/seed_<k>/``
(normal run folders of :func:`seqtp.train.train`); ``trials.csv`` (one row per trial: number, state, status,
objective, parameters, each seed's final loss, duration; also printed); ``tune.png`` (objective per trial and
best so far, and the objective against each parameter); ``best.yaml`` (the full config of the best trial, method
set, that ``seqtp train best.yaml`` accepts).

The command line is :func:`add_arguments` + :func:`run_from_args`; the library function is :func:`tune`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import socket
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from .config import METHOD_NAMES, Config, ConfigError, config_from_dict, parse_overrides, to_dict
from .methods import METHODS
from .train import RunError, train

if TYPE_CHECKING:  # optuna is imported where it is used, so that ``seqtp train`` does not pay for it
    import optuna

DEFAULT_SPACE: dict[str, tuple[str, ...]] = {
    name: tuple(f"{name}.{spec}" for spec in cls.search_space) for name, cls in METHODS.items()
}
"""The default search space of each method, in ``--space`` syntax (``LOW:HIGH`` with ``LOW > 0``: log-uniform)."""

HEARTBEAT_S, GRACE_S = 60, 180
STARTUP_TRIALS = 3  # MedianPruner: finished trials before pruning starts


@dataclass(frozen=True)
class Param:
    """One searched key: a range (``low``, ``high``, ``log``; ``integer`` for int keys) or ``choices``."""

    key: str  # "tp.lr"
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return ",".join(map(_scalar, self.choices))
        return f"{_scalar(self.low)}:{_scalar(self.high)}:{'log' if self.log else 'linear'}"


@dataclass
class TuneResult:
    """What :func:`tune` returns."""

    study_name: str
    storage: str
    rows: list[dict]  # one per trial, as in trials.csv
    best_value: float | None  # None: no completed trial
    best_params: dict
    best_config: Path | None  # best.yaml, None without a completed trial


def _scalar(v) -> str:
    """A value as ``--set`` reads it back (JSON: ``"linearized"``, ``1e-05``, ``true``, ``null``)."""
    return json.dumps(v)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_values(cfg: Config, values: dict, source: str = "--set") -> Config:
    """``cfg`` with ``{"tp.lr": 0.1, ...}`` applied through ``--set`` parsing and the schema's checks.

    Raises:
        ConfigError: unknown key, wrong type or bad value (one line naming the key).
    """
    pairs = [f"{k}={_scalar(v)}" for k, v in values.items()]
    return config_from_dict(_merge(to_dict(cfg), parse_overrides(pairs)), source)


def _field_type(cfg: Config, key: str):
    """The schema type of a ``section.name`` key (``X | None`` unwrapped)."""
    section, name = key.split(".", 1)
    tp = typing.get_type_hints(type(getattr(cfg, section)))[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _check_key(cfg: Config, method: str, key: str, probe, flag: str) -> None:
    """The schema accepts ``key=probe`` (its own message otherwise), and ``key`` is in the method's section."""
    try:
        with_values(cfg, {key: probe}, flag)
    except ConfigError as e:
        raise ConfigError(f"{flag} {key}: {e}") from None
    if not key.startswith(f"{method}.") or key.count(".") != 1:
        raise ConfigError(f"{flag} {key}: tuning {method} searches {method}.* keys only")


def _number(text: str, key: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} {key}: bad range bound {text!r} (expected LOW:HIGH[:log|:linear])") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {key}: range bounds must be finite, got {text!r}")
    return value


def _typed(cfg: Config, key: str, raw, flag: str):
    """``raw`` (a YAML scalar) as the schema stores it for ``key`` (e.g. ``"1e-3"`` -> ``0.001``)."""
    try:
        built = with_values(cfg, {key: raw}, flag)
    except ConfigError as e:
        raise ConfigError(f"{flag} {key}: {e}") from None
    section, name = key.split(".", 1)
    return getattr(getattr(built, section), name)


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    key, sep, body = spec.partition("=")
    key, body = key.strip(), body.strip()
    if not sep or not key or not body:
        raise ConfigError(f"{flag} expects KEY=..., got {spec!r}")
    return key, body


def parse_space(cfg: Config, method: str, specs: Sequence[str] = ()) -> dict[str, Param]:
    """The search space: :data:`DEFAULT_SPACE` of ``method`` updated by ``--space`` specs, checked by the schema.

    Args:
        cfg: the base config (its values are the probes of the schema checks).
        method: a key of ``seqtp.METHODS``.
        specs: ``KEY=LOW:HIGH[:log|:linear]``, ``KEY=V1,V2,...`` or ``KEY=off``.

    Returns:
        ``key -> Param`` in a fixed order (defaults first).

    Raises:
        ConfigError: a key outside the schema or the method's section, a bad or empty range, a log range with
            ``LOW <= 0``, a bound or choice the schema rejects.
    """
    space: dict[str, Param] = {}
    for flag, items in (("default space", DEFAULT_SPACE[method]), ("--space", specs)):
        for spec in items:
            key, body = _split_spec(spec, flag)
            _check_key(cfg, method, key, _typed_probe(cfg, key), flag)
            if body == "off":
                space.pop(key, None)
                continue
            if ":" in body:
                parts = body.split(":")
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
                    raise ConfigError(f"{flag} {key}: bad range {body!r} (expected LOW:HIGH[:log|:linear])")
                tp = _field_type(cfg, key)
                if tp not in (int, float):
                    raise ConfigError(f"{flag} {key}: a range needs a numeric key ({tp.__name__} here); "
                                      f"give choices V1,V2,...")
                low, high = _number(parts[0], key, flag), _number(parts[1], key, flag)
                log = parts[2] == "log" if len(parts) == 3 else low > 0
                if not low < high:
                    raise ConfigError(f"{flag} {key}: empty range {body!r} (need LOW < HIGH)")
                if log and low <= 0:
                    raise ConfigError(f"{flag} {key}: a log range needs LOW > 0, got {body!r}")
                if tp is int and not (low.is_integer() and high.is_integer()):
                    raise ConfigError(f"{flag} {key}: an integer key needs integer bounds, got {body!r}")
                for bound in (low, high):
                    _typed(cfg, key, int(bound) if tp is int else bound, flag)
                space[key] = Param(key, low, high, log=log, integer=tp is int)
            else:
                choices = _choices(cfg, key, body, flag)
                space[key] = Param(key, choices=choices)
    return space


def _typed_probe(cfg: Config, key: str):
    """The config's current value of ``key`` when it exists (a probe the schema accepts), else ``None``."""
    node = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return None if dataclasses.is_dataclass(node) else node


def _choices(cfg: Config, key: str, body: str, flag: str) -> tuple:
    raws = [r.strip() for r in body.split(",")]
    if any(not r for r in raws):
        raise ConfigError(f"{flag} {key}: empty value in {body!r}")
    values = tuple(_typed(cfg, key, yaml.safe_load(r), flag) for r in raws)
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {key}: repeated value in {body!r}")
    return values


def parse_grid(cfg: Config, method: str, specs: Sequence[str]) -> dict[str, tuple]:
    """``["tp.reg=0.3,1,10", ...]`` -> ``{"tp.reg": (0.3, 1.0, 10.0)}``, each value checked by the schema.

    Raises:
        ConfigError: a key outside the schema or the method's section, a repeated key or value, an empty value, a
            value the schema rejects.
    """
    grid: dict[str, tuple] = {}
    for spec in specs:
        key, body = _split_spec(spec, "--grid")
        _check_key(cfg, method, key, _typed_probe(cfg, key), "--grid")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        grid[key] = _choices(cfg, key, body, "--grid")
    return grid


def _setup_diff(old, new, prefix: str = "") -> str | None:
    """The first key where two stored setups differ (``None``: equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _setup_diff(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')} was {old!r}, now {new!r}"


def _open_storage(url: str) -> optuna.storages.RDBStorage:
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as e:
            # two workers creating one SQLite file race on its tables (a locked file, or both inserting the schema
            # version): the later one retries and finds the tables made
            if attempt == 4 or not url.startswith("sqlite"):
                raise ConfigError(f"--storage {url}: cannot open ({str(e).splitlines()[0]})") from None
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:  # a bad URL, a missing driver
            raise ConfigError(f"--storage {url}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]})") \
                from None
    raise AssertionError("unreachable")


def _grid_points(grid: dict[str, tuple]) -> list[dict]:
    import itertools

    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def tune(
    cfg: Config,
    out: str | Path,
    *,
    method: str,
    trials: int | None,
    seeds: Sequence[int] | None = None,
    space: Sequence[str] = (),
    grid: Sequence[str] = (),
    storage: str | None = None,
    study_name: str | None = None,
    sampler_seed: int = 0,
    pruner: str | optuna.pruners.BasePruner = "median",
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Run (or continue) the Optuna study of ``method`` on ``cfg`` and write best.yaml, trials.csv, tune.png.

    Objective of a trial with hyperparameters ``theta``: ``J(theta) = mean_{s in seeds} L_val(theta, s)``, the final
    validation loss of :func:`seqtp.train.train` with ``seed = s`` (minimized). See the module docstring for the
    space, sampler, pruning, divergence and budget rules.

    Args:
        cfg: the base config (``--set`` applied); ``method`` is set on it.
        out: the tuning folder.
        method: a key of ``seqtp.METHODS``.
        trials: the study's total number of trials (completed + pruned + running); ``None`` with ``grid``: the
            grid's size.
        seeds: the training seeds of every trial (default ``[cfg.seed]``).
        space: ``--space`` specs (see :func:`parse_space`); excludes ``grid``.
        grid: ``--grid`` specs ``KEY=V1,V2,...``: a GridSampler over their product.
        storage: an Optuna RDB URL (default ``sqlite:///OUT/study.db``).
        study_name: default ``<task>-<method>`` (the CLI passes ``<config stem>-<method>``).
        sampler_seed: trial ``n`` is sampled with seed ``sampler_seed + n``.
        pruner: ``"median"``, ``"none"`` or an Optuna pruner.
        device: the training device (concrete).
        log: where progress lines go.

    Returns:
        A :class:`TuneResult`.

    Raises:
        ConfigError: a bad method, key, range, grid, seed list, budget or storage, or a study whose stored setup
            differs from this one.
        RunError: ``OUT/trials`` holds runs that the (new) study does not know.
        KeyboardInterrupt: the trial in progress is recorded as failed (re-run by the next call).
    """
    import optuna

    if method not in METHOD_NAMES:
        raise ConfigError(f"--method: unknown {method!r}; choose from {', '.join(METHOD_NAMES)}")
    out = Path(out)
    base = dataclasses.replace(cfg, method=method)
    seeds = list(seeds) if seeds is not None else [base.seed]
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds: distinct integers >= 0, got {seeds!r}")
    if grid and space:
        raise ConfigError("--grid and --space exclude each other (a grid is its own search space)")
    grid_values = parse_grid(base, method, grid) if grid else {}
    params = {} if grid else parse_space(base, method, space)
    points = _grid_points(grid_values) if grid else []
    if grid:
        if trials is None:
            trials = len(points)
        elif trials > len(points):
            raise ConfigError(f"--trials {trials} exceeds the grid's {len(points)} points")
    if trials is None or trials < 1:
        raise ConfigError(f"--trials: expected a number >= 1, got {trials!r}")
    if not grid and not params:
        raise ConfigError("--space: nothing to search (every key is off)")
    for s in seeds:
        with_values(base, {"seed": s}, "--seeds")

    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or f"{base.task.name}-{method}"
    store = _open_storage(url)
    study = optuna.create_study(storage=store, study_name=name, direction="minimize", load_if_exists=True)
    setup = {"config": {k: v for k, v in to_dict(base).items() if k != "device"}, "seeds": seeds,
             "space": {k: p.describe() for k, p in params.items()},
             "grid": {k: list(v) for k, v in grid_values.items()}}
    stored = study.user_attrs.get("setup")
    if stored is None:
        existing = [p.name for p in (out / "trials").iterdir()] if (out / "trials").is_dir() else []
        if not study.trials and existing:
            raise RunError(f"{out / 'trials'} holds runs of another study; choose another --out")
        study.set_user_attr("setup", setup)
    else:
        diff = _setup_diff(stored, json.loads(json.dumps(setup)))
        if diff:
            raise ConfigError(f"study {name!r} in {url} has another setup ({diff}): continue it with the same "
                              f"config, --seeds and space, or choose another --out/--storage")

    if pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=base.train.steps // 4)
    elif pruner == "none":
        pruner = optuna.pruners.NopPruner()
    elif isinstance(pruner, str):
        raise ConfigError(f"--pruner: unknown {pruner!r}; choose from median, none")
    study.pruner = pruner

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING,
               optuna.trial.TrialState.WAITING)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    steps = base.train.steps
    log(f"study {name!r} in {url} ({len(study.trials)} trials there)")
    log(f"budget ({method}): {trials} trials x {len(seeds)} seeds ({','.join(map(str, seeds))}) x {steps} "
        f"iterations (batch {base.train.batch_size}) = {trials * len(seeds) * steps} training iterations at most; "
        f"sampler {'grid' if grid else 'tpe'} (seed {sampler_seed}), pruner "
        f"{pruner if isinstance(pruner, str) else type(pruner).__name__}; give every method the same budget")
    searched = ", ".join(f"{k}={','.join(map(_scalar, v))}" for k, v in grid_values.items()) if grid else \
        ", ".join(f"{k}={p.describe()}" for k, p in params.items())
    log(f"search space: {searched}")

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        if grid:
            values = {k: trial.suggest_categorical(k, list(v)) for k, v in grid_values.items()}
        else:
            values = {k: p.suggest(trial) for k, p in params.items()}
        finals = {}
        for k, seed in enumerate(seeds):
            run_cfg = with_values(base, {**values, "seed": seed}, f"trial {trial.number}")
            offset = k * (steps + 1)

            def on_eval(row: dict, offset=offset, seed=seed) -> None:
                trial.report(row["val_loss"], offset + row["step"])
                if trial.should_prune():
                    trial.set_user_attr("status", "pruned")
                    trial.set_user_attr("message", f"pruned at seed {seed}, step {row['step']}")
                    raise optuna.TrialPruned(f"pruned at seed {seed}, step {row['step']}")

            result = train(run_cfg, out / "trials" / str(trial.number) / f"seed_{seed}", device=device,
                           progress=False, on_eval=on_eval)
            if result.status != "completed":
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("message", f"seed {seed}: {result.message}")
                raise optuna.TrialPruned(result.message)
            finals[seed] = result.metrics["val_loss"]
            trial.set_user_attr(f"val_loss_seed_{seed}", finals[seed])
        trial.set_user_attr("status", "completed")
        return sum(finals.values()) / len(finals)

    def report(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        row = _row(frozen, seeds)
        value = "" if row["objective"] is None else f" objective {row['objective']:.4g}"
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in frozen.params.items())
        extra = f" ({row['message']})" if row["message"] else ""
        log(f"trial {frozen.number}: {row['status']}{value} {shown}{extra}")

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        all_trials = study.get_trials(deepcopy=False)
        if grid:
            done = {_key(t.params) for t in all_trials if t.state in counted and len(t.params) == len(grid_values)}
            missing = [p for p in points if _key(p) not in done]
            if len(points) - len(missing) >= trials:
                break
            attempted = {_key(t.params) for t in all_trials if t.state == optuna.trial.TrialState.FAIL}
            if all(_key(p) in attempted for p in missing):  # GridSampler counts failed points as visited
                study.enqueue_trial(missing[0])
            # one seed for every trial and worker: GridSampler shuffles the grid with it, and maps trial numbers
            # to points through that order
            study.sampler = optuna.samplers.GridSampler({k: list(v) for k, v in grid_values.items()},
                                                        seed=sampler_seed)
        else:
            if sum(t.state in counted for t in all_trials) >= trials:
                break
            study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(all_trials))
        study.optimize(objective, n_trials=1, catch=(), callbacks=[report], gc_after_trial=False)

    return _write_outputs(study, base, out, url, seeds, params, log)


def _key(params: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in params.items()))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _row(t: optuna.trial.FrozenTrial, seeds: Sequence[int]) -> dict:
    status = t.user_attrs.get("status") or {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed",
                                            "RUNNING": "running"}.get(t.state.name, t.state.name.lower())
    if t.state.name == "FAIL":
        status = "failed"
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {
        "number": t.number,
        "state": t.state.name,
        "status": status,
        "objective": t.value if t.state.name == "COMPLETE" else None,
        **{f"param {k}": v for k, v in t.params.items()},
        **{f"val_loss seed {s}": t.user_attrs.get(f"val_loss_seed_{s}") for s in seeds},
        "duration_s": round(duration, 2) if duration is not None else None,
        "message": t.user_attrs.get("message", ""),
    }


def format_trials(rows: list[dict]) -> str:
    """A plain-text table of the trials rows (as in trials.csv), without the message column."""
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "message"]
    if not rows:
        return "(no trials)"
    cells = [[_fmt(r.get(c)) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _write_outputs(study: optuna.Study, base: Config, out: Path, url: str, seeds: list[int],
                   params: dict[str, Param], log: Callable[[str], None]) -> TuneResult:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [_row(t, seeds) for t in trials]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    log(format_trials(rows))
    completed = [t for t in trials if t.state.name == "COMPLETE"]
    best_path, best_value, best_params = None, None, {}
    if completed:
        best = min(completed, key=lambda t: (t.value, t.number))
        best_value, best_params = best.value, dict(best.params)
        cfg = with_values(base, best_params, f"best trial {best.number}")
        header = (f"# seqtp tune: best of {len(trials)} trials of study {study.study_name!r} ({url}): trial "
                  f"{best.number}, objective {best.value:.6g} = mean final val_loss over seeds "
                  f"{','.join(map(str, seeds))}\n")
        best_path = out / "best.yaml"
        best_path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log(f"best: trial {best.number}, objective {best.value:.4g}, "
            + " ".join(f"{k}={_fmt(v)}" for k, v in best_params.items()) + f" -> {best_path}")
    else:
        log("no trial completed: no best.yaml")
    _plot(trials, out / "tune.png", params, title=f"{study.study_name}: objective = mean final val_loss over seeds "
          f"{','.join(map(str, seeds))}")
    log(f"trials: {out / 'trials.csv'}, plot: {out / 'tune.png'}")
    return TuneResult(study.study_name, url, rows, best_value, best_params, best_path)


def _plot(trials: list, path: Path, params: dict[str, Param], *, title: str) -> None:
    """Objective per trial with the best so far, then the objective against each searched parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for t in trials for k in t.params))
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.6), squeeze=False)
    ax = axes[0][0]
    done = [(t.number, t.value) for t in trials if t.state.name == "COMPLETE"]
    stopped = [(t.number, t.user_attrs.get("status", "pruned"), list(t.intermediate_values.values()))
               for t in trials if t.state.name == "PRUNED"]
    if done:
        ax.plot(*zip(*done, strict=True), "o", label="completed")
        best, curve = math.inf, []
        for n, v in done:
            best = min(best, v)
            curve.append((n, best))
        ax.step(*zip(*curve, strict=True), where="post", color="black", label="best so far")
    for status, marker in (("pruned", "x"), ("diverged", "v")):
        pts = [(n, vals[-1]) for n, s, vals in stopped if s == status and vals]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker, label=f"{status} (last reported loss)")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (val loss)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    values = [v for _, v in done] + [vals[-1] for _, _, vals in stopped if vals]
    wide = bool(values) and min(values) > 0 and max(values) / min(values) > 10
    if wide:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, name in enumerate(names):
        ax = axes[0][i + 1]
        pts = [(t.params[name], t.value) for t in trials if t.state.name == "COMPLETE" and name in t.params]
        if pts:
            xs, ys = zip(*pts, strict=True)
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
                ax.plot(xs, ys, "o")
                p = params.get(name)
                if p is not None and p.log:
                    ax.set_xscale("log")
            else:
                labels = sorted({str(x) for x in xs})
                ax.plot([labels.index(str(x)) for x in xs], ys, "o")
                ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        if wide:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``seqtp tune`` options to ``parser`` (to be run by :func:`run_from_args`)."""
    parser.add_argument("config", help="YAML experiment file (see configs/)")
    parser.add_argument("--method", choices=METHOD_NAMES, help="the method to tune (default: the config's)")
    parser.add_argument("--trials", type=int, help="trials in the study in total (default with --grid: the grid)")
    parser.add_argument("--out", help="tuning folder (default: runs/<config>-tune-<method>)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db); shared by workers")
    parser.add_argument("--space", nargs="+", action="extend", default=[], metavar="KEY=RANGE",
                        help="KEY=LOW:HIGH[:log|:linear], KEY=V1,V2,... or KEY=off (default space: "
                             + "; ".join(" ".join(v) for v in DEFAULT_SPACE.values()) + ")")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="run exactly the product of these values (GridSampler)")
    parser.add_argument("--seeds", help="comma-separated training seeds of every trial (default: the config's seed)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set train.steps=500")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler (default: 0)")
    parser.add_argument("--pruner", choices=("median", "none"), default="median", help="default: median")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="accepted for symmetry; trials show none")


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def run_from_args(args: argparse.Namespace, device: torch.device) -> int:
    """Run :func:`tune` from :func:`add_arguments`'s options.

    Args:
        args: the parsed options. device: the resolved device (the CLI resolves ``auto``).

    Returns:
        The exit status: 0; 2 on a bad option, key, range, grid or storage (one line on stderr); 3 when no trial
        completed; 130 on Ctrl-C.
    """
    import optuna

    from .config import load_config

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by seqtp, in one line
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = load_config(args.config, args.overrides)
        method = args.method or cfg.method
        out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-tune-{method}"
        result = tune(cfg, out, method=method, trials=args.trials, seeds=_parse_seeds(args.seeds),
                      space=args.space, grid=args.grid, storage=args.storage,
                      study_name=f"{Path(args.config).stem}-{method}", sampler_seed=args.sampler_seed,
                      pruner=args.pruner, device=device, log=lambda line: print(line, flush=True))
    except (ConfigError, RunError) as e:
        print(f"seqtp tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqtp tune: interrupted; the trial in progress is recorded as failed and re-run by the next "
              "seqtp tune", file=sys.stderr)
        return 130
    return 0 if result.best_config is not None else 3
