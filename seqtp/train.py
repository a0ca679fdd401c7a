"""The training loop: task, model, method and optimizer from a :class:`~seqtp.config.Config`, with evaluation,
``metrics.jsonl``, atomic checkpoints, exact resume and divergence handling.

Run folder layout::

    config.yaml      the resolved configuration
    metrics.jsonl    one JSON object per evaluation (step, time_s, train_loss, val_loss, [val_accuracy], ...)
    checkpoint.pt    model, optimizer, data-generator and RNG states (written atomically at every evaluation)
    summary.json     status (completed | diverged | interrupted), step, final metrics, message, note

Ctrl-C and SIGTERM (a cluster's preemption: Slurm, Kubernetes) stop a run the same way: the state at the last
completed step is checkpointed, ``summary.json`` says ``interrupted``, and ``--resume`` continues it exactly.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ._alignment import alignment
from ._model import RNNModel
from .config import Config, ConfigError, build_method, config_from_dict, to_dict
from .inverses import FactorizationError
from .methods import Method
from .tasks import TASKS, Task

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL_CHUNK = 1024  # validation rows per forward pass


class RunError(RuntimeError):
    """A run cannot start or continue (existing run folder, missing checkpoint, incompatible resume)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during :func:`train`; handled like Ctrl-C (it is a ``KeyboardInterrupt``)."""


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, the first SIGTERM raises :class:`Terminated` (later ones are ignored, so that the checkpoint
    being written is finished); the previous handler is restored on exit. Signal handlers can only be set from the
    main thread: elsewhere SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def build_task(cfg: Config, device: torch.device) -> Task:
    """The task of ``cfg.task``; options left ``None`` keep the task's defaults.

    Raises:
        ConfigError: unknown task, an option the task does not take, or a value the task rejects.
    """
    t = cfg.task
    if t.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {t.name!r}; choose from {', '.join(TASKS)}")
    cls = TASKS[t.name]
    accepted = inspect.signature(cls).parameters
    options = {"seq_len": t.seq_len, "val_size": t.val_size}
    for key in ("variant", "bits", "data_dir", "permutation_seed"):
        value = getattr(t, key)
        if value is None:
            continue
        if key not in accepted:
            raise ConfigError(f"task.{key} does not apply to task {t.name!r}")
        options[key] = value
    try:
        return cls(device=device, seed=cfg.seed, **options)
    except (ValueError, OSError) as e:  # OSError: a missing MNIST folder or file (task.data_dir)
        raise ConfigError(str(e)) from None


def build_model(cfg: Config, task: Task, device: torch.device) -> RNNModel:
    torch.manual_seed(cfg.seed)  # same initial weights on every device
    model = RNNModel(
        task.input_size,
        cfg.model.hidden_size,
        task.output_size,
        cell=cfg.model.cell,
        nonlinearity=cfg.model.nonlinearity,
        readout=task.readout,
        init=cfg.model.init,
    )
    return model.to(device)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    m = getattr(cfg, cfg.method)
    if m.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=m.lr)
    return torch.optim.SGD(model.parameters(), lr=m.lr, momentum=m.momentum, nesterov=m.nesterov and m.momentum > 0)


@torch.no_grad()
def evaluate(model: RNNModel, task, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Validation loss and metrics, in chunks of rows (weighted by chunk size)."""
    totals: dict[str, float] = {}
    n = x.shape[0]
    for start in range(0, n, EVAL_CHUNK):
        xs, ys = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
        outputs, _ = model(xs)
        values = {"val_loss": task.loss(outputs, ys).item()}
        values.update({f"val_{k}": v for k, v in task.metrics(outputs, ys).items()})
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v * xs.shape[0] / n
    return totals


@dataclass
class Result:
    """What :func:`train` returns (also written to ``summary.json``)."""

    status: str  # completed | diverged | interrupted
    step: int  # completed steps; diverged: the iteration N (counted from 1) whose update was non-finite
    metrics: dict
    message: str = ""
    note: str = ""  # the task's data remark (e.g. the offline MNIST subset), carried by every output


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_checkpoint(out: Path, state: dict) -> None:
    _atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def _json_default(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def alignment_row(model: RNNModel, method: Method, task: Task, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The metrics-row entries of :func:`seqtp.alignment` on the batch ``(x, y)``: ``align_<key>`` for each scalar
    (``align_cosine``, ``align_norm_ratio``, ``align_cosine/<parameter>``, ...) and a list of ``T`` floats for each
    per-step profile (``align_step_cosine``, ``align_step_shift_norm``, ``align_step_adjoint_norm``; ``None`` for a
    non-finite entry). The model, its ``.grad``, the method's state and the random state are left as they were."""
    values = alignment(model, x, lambda s: task.loss(model.read(s), y), method)
    row = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            row[f"align_{key}"] = [_finite_or_none(v) for v in value.tolist()]
        else:
            row[f"align_{key}"] = _finite_or_none(float(value))
    return row


def _check_resume_config(old: dict, new: dict, prefix: str = "") -> None:
    """Resuming may change ``train.steps`` (and ``device``); any other difference is an error naming the key."""
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_resume_config(a, b, f"{full}.")
        elif a != b and full not in ("train.steps", "device"):
            raise RunError(f"cannot resume: {full} was {a!r} in the run folder, now {b!r}")


def train(
    cfg: Config,
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
) -> Result:
    """Train ``cfg.method`` on ``cfg.task``, writing the run folder ``out``.

    Args:
        cfg: the validated configuration.
        out: the run folder (created if needed).
        device: a concrete device (``"auto"`` is resolved by the CLI, not here).
        resume: continue the run in ``out`` from its checkpoint; ``cfg`` may differ from the stored one only in
            ``train.steps`` and ``device``. The resumed run ends exactly where an uninterrupted run of that length
            ends (the data generator, optimizer and RNG states are checkpointed).
        progress: show a tqdm bar.
        on_eval: called with each metrics row right after it is written and checkpointed (e.g. to report it
            to a tuner); an exception it raises propagates out of ``train``.

    Returns:
        A :class:`Result`; ``status`` is ``"diverged"`` (non-finite loss, gradient or validation loss, failed
        factorization: the last good checkpoint is kept; ``step`` is the iteration N, counted from 1, whose update
        was non-finite, the N of the message "diverged at step N: ...") or ``"completed"``.

    Raises:
        KeyboardInterrupt: on Ctrl-C, and :class:`Terminated` (a ``KeyboardInterrupt``) on SIGTERM, which ``train``
            handles while it runs (in the main thread; the previous handler is restored when it returns). Either
            way the state at the last completed step is checkpointed (the last checkpoint is kept if the interrupt
            lands in an optimizer step or an evaluation), ``summary.json`` says ``interrupted`` at that step, and
            the exception propagates; ``resume`` then continues exactly.
        RunError: ``out`` already holds a run and ``resume`` is false, there is nothing to resume, or ``out`` cannot
            be a folder.
        ConfigError: a bad task option.
    """
    with _sigterm_interrupts():
        return _run(cfg, Path(out), device=torch.device(device), resume=resume, progress=progress, on_eval=on_eval)


def _run(cfg: Config, out: Path, *, device: torch.device, resume: bool, progress: bool,
         on_eval: Callable[[dict], None] | None) -> Result:
    """The body of :func:`train` (with its arguments normalized)."""
    ckpt_path = out / CHECKPOINT
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunError(f"run folder {out}: {blocking} exists and is not a folder")
    if resume:
        if not ckpt_path.is_file():
            raise RunError(f"cannot resume: no {CHECKPOINT} in {out}")
        if not (out / "config.yaml").is_file():
            raise RunError(f"cannot resume: no config.yaml in {out}")
        stored = yaml.safe_load((out / "config.yaml").read_text())
        # through the current schema: a section or option added since (a new method) takes its default
        stored = to_dict(config_from_dict(stored, str(out / "config.yaml")))
        _check_resume_config(stored, to_dict(cfg))
        cfg = config_from_dict({**stored, "train": {**stored["train"], "steps": cfg.train.steps},
                                "device": cfg.device}, str(out / "config.yaml"))
    elif ckpt_path.exists() or (out / METRICS).exists():
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run folder {out}: {e.strerror}") from None
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    task = build_task(cfg, device)
    model = build_model(cfg, task, device)
    method = build_method(cfg)
    optimizer = build_optimizer(cfg, model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # tasks seed validation differently
    val_x, val_y = task.validation_set()
    align_x, align_y = val_x[: cfg.train.batch_size], val_y[: cfg.train.batch_size]  # a fixed batch: no RNG drawn

    step, elapsed, window_sum, window_n = 0, 0.0, 0.0, 0
    last_metrics: dict = {}
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        method.load_state_dict(state.get("method", {}))
        step, elapsed = state["step"], state["elapsed"]
        window_sum, window_n = state["window_sum"], state["window_n"]
        if step > cfg.train.steps:
            raise RunError(f"cannot resume: the checkpoint is at step {step}, beyond train.steps={cfg.train.steps}")
        rows = [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln]
        # keep the rows up to the checkpoint; an end-of-run row off the evaluation grid is dropped when the run
        # goes on (its training-loss window was not reset), so the rows match an uninterrupted run's
        kept = [json.dumps(r) for r in rows if r["step"] <= step
                and (r["step"] % cfg.train.eval_every == 0 or step == cfg.train.steps)]
        (out / METRICS).write_text("".join(f"{ln}\n" for ln in kept))
        last_metrics = json.loads(kept[-1]) if kept else {}

    def snapshot() -> dict:
        return {
            "step": step,
            "elapsed": elapsed,
            "window_sum": window_sum,
            "window_n": window_n,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "method": method.state_dict(),
        }

    last_stats: dict = {}
    # The data-generator and RNG states before the step in progress (restored if Ctrl-C lands before its update),
    # and whether the state is being changed (optimizer step, metrics row + checkpoint): Ctrl-C then keeps the last
    # checkpoint, so that the resumed run is exactly the uninterrupted one wherever the interrupt lands.
    pending: tuple | None = None
    busy = False

    def record() -> dict | None:
        """Evaluate, append the row to metrics.jsonl and checkpoint; ``None`` (nothing written) if the validation
        loss is not finite, so that the checkpoint kept is the last good one. An interrupt anywhere in it keeps the
        last checkpoint (a checkpoint of this step without its row would not resume exactly)."""
        nonlocal window_sum, window_n, busy
        busy = True
        model.eval()
        row = {
            "step": step,
            "time_s": round(elapsed, 4),
            "train_loss": window_sum / window_n if window_n else None,
            **evaluate(model, task, val_x, val_y),
        }
        row["baseline"] = task.baseline
        row["chance_accuracy"] = task.chance_accuracy
        row["w_spectral_norm"] = torch.linalg.matrix_norm(model.rnn.weight_hh_l0.detach().float(), ord=2).item()
        row.update({k: _finite_or_none(float(v)) for k, v in last_stats.items()})  # method diagnostics
        if cfg.train.alignment_every and step % cfg.train.alignment_every == 0:
            row.update(alignment_row(model, method, task, align_x, align_y))
        model.train()
        if not math.isfinite(row["val_loss"]):
            busy = False
            return None
        row = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}  # strict JSON
        with (out / METRICS).open("a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if step % cfg.train.eval_every == 0:  # an end-of-run row off the grid keeps the window (exact resume)
            window_sum, window_n = 0.0, 0
        _save_checkpoint(out, snapshot())
        busy = False
        if on_eval is not None:
            on_eval(row)
        return row

    def finish(status: str, message: str = "", at: int | None = None) -> Result:
        """Write summary.json; ``at`` is the step it reports (default: the completed steps)."""
        result = Result(status, step if at is None else at, last_metrics, message, task.note)
        summary = {**asdict(result), "method": cfg.method, "task": cfg.task.name, "device": str(device),
                   "time_s": round(elapsed, 4)}
        _atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2,
                                                                                 default=_json_default)))
        return result

    def diverged(n: int, what: str) -> Result:
        """Stop as diverged: the update of iteration ``n`` (counted from 1) was non-finite."""
        return finish("diverged", f"diverged at step {n}: {what}; last good checkpoint kept in {ckpt_path}", at=n)

    def eval_diverged() -> Result:  # the weights after ``step`` updates give a non-finite validation loss
        return diverged(step, "non-finite validation loss")

    bar = tqdm(total=cfg.train.steps, initial=step, disable=not progress, dynamic_ncols=True,
               desc=f"{cfg.method} {cfg.task.name}")
    try:
        if step == 0 and not resume:
            row = record()
            if row is None:
                return eval_diverged()
            last_metrics = row
        while step < cfg.train.steps:
            pending = (generator.get_state(), torch.get_rng_state())
            x, y = task.sample(cfg.train.batch_size, generator=generator)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            try:
                loss, last_stats = method.backward(model, x, lambda s, y=y: task.loss(model.read(s), y))
            except FactorizationError as e:
                return diverged(step + 1, str(e))
            grad_sq = sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None)
            loss_value, grad_value = torch.stack([loss.float(), grad_sq.float()]).tolist()  # one host sync
            if not math.isfinite(loss_value):
                return diverged(step + 1, f"non-finite loss ({loss_value})")
            if not math.isfinite(grad_value):
                return diverged(step + 1, f"non-finite gradient (norm {math.sqrt(grad_value)})")
            busy, pending = True, None
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            step += 1
            window_sum, window_n = window_sum + loss_value, window_n + 1
            busy = False
            bar.update(1)
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                row = record()
                if row is None:
                    return eval_diverged()
                last_metrics = row
                bar.set_postfix({k: f"{v:.4g}" for k, v in last_metrics.items()
                                 if k in ("train_loss", "val_loss", "val_accuracy") and v is not None})
    except KeyboardInterrupt as e:
        if not busy:
            if pending is not None:
                generator.set_state(pending[0])
                torch.set_rng_state(pending[1])
            _save_checkpoint(out, snapshot())
        by = " by SIGTERM" if isinstance(e, Terminated) else ""
        finish("interrupted", f"interrupted{by} at step {step}; resume with --resume")
        raise
    finally:
        bar.close()
    if not last_metrics or last_metrics["step"] != step:
        row = record()
        if row is None:
            return eval_diverged()
        last_metrics = row
    return finish("completed")
