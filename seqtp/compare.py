"""Method comparison over seeds: the same config for each method and seed, a table, ``comparison.json`` and plots.

Run folders: ``OUT/<method>/`` with one seed, ``OUT/<method>/seed_<k>/`` with several. For a given seed every method
starts from the same initial weights and sees the same data stream (``train`` seeds both from ``cfg.seed``).

Plots are built in two stages: :func:`comparison_panels` and :func:`alignment_panels` turn the runs' metrics rows
into plain data (:class:`Panel`: lines, seed bands, divergence markers, reference lines), :func:`draw_panels` hands
that data to matplotlib. The tests check the data.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config, ConfigError
from .train import CHECKPOINT, METRICS, Result, RunError, train

STATS_KEYS = ("time_s", "train_loss", "val_loss", "val_accuracy")  # + every align_* scalar present
CONSTANT_KEYS = ("baseline", "chance_accuracy")  # task constants: shown once, not averaged
TABLE_KEYS = ("time_s", "train_loss", "val_loss", "val_accuracy", "baseline", "chance_accuracy")
ALIGN_SCALARS = ("align_cosine", "align_norm_ratio")
ALIGN_PROFILES = ("align_step_cosine", "align_step_shift_norm", "align_step_adjoint_norm")
STATISTIC = ("mean and sample standard deviation (n - 1) over the seeds that did not diverge; std is null for fewer "
             "than 2 seeds")
BAND = "min-max over seeds"


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (``[]`` when the file is absent)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def parse_seeds(seeds: str | Sequence[int] | None, default: int) -> list[int]:
    """``"0,1,2"`` (the ``--seeds`` flag) or a sequence of ints -> a list of distinct seeds >= 0; ``None`` ->
    ``[default]``.

    Raises:
        ConfigError: an empty list, a non-integer, a negative or a repeated seed (one line naming ``--seeds``).
    """
    if seeds is None:
        return [default]
    if isinstance(seeds, str):
        parts = [s.strip() for s in seeds.split(",") if s.strip()]
        try:
            values = [int(s) for s in parts]
        except ValueError:
            raise ConfigError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    else:
        values = list(seeds)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"--seeds: expected integers, got {values!r}")
    if not values:
        raise ConfigError(f"--seeds: no seed given ({seeds!r})")
    if any(v < 0 for v in values):
        raise ConfigError(f"--seeds: seeds must be >= 0, got {seeds!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"--seeds: each seed once, got {seeds!r}")
    return values


def run_dirs(out: str | Path, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, Path]]:
    """The run folder of each (method, seed): ``out/<method>`` for one seed, ``out/<method>/seed_<k>`` for several."""
    out = Path(out)
    if len(seeds) == 1:
        return {m: {seeds[0]: out / m} for m in methods}
    return {m: {k: out / m / f"seed_{k}" for k in seeds} for m in methods}


@dataclass
class MethodRuns:
    """One method's runs, by seed (what :func:`compare` returns for each method).

    ``status`` is ``"diverged"`` when any seed diverged, else the runs' common status; ``message`` joins the
    diverged seeds' messages, so that code written for one :class:`~seqtp.train.Result` reads it the same way.
    """

    runs: dict[int, Result]

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.runs.values()}
        if "diverged" in statuses:
            return "diverged"
        return statuses.pop() if len(statuses) == 1 else "/".join(sorted(statuses))

    @property
    def message(self) -> str:
        bad = [(k, r) for k, r in self.runs.items() if r.status == "diverged"]
        if len(self.runs) == 1:
            return bad[0][1].message if bad else ""
        return "; ".join(f"seed {k}: {r.message}" for k, r in bad)

    @property
    def note(self) -> str:
        return next(iter(self.runs.values())).note

    @property
    def step(self) -> int:
        return max(r.step for r in self.runs.values())


def compare(
    cfg: Config,
    out: str | Path,
    *,
    methods: list[str],
    seeds: str | Sequence[int] | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, MethodRuns]:
    """Train every method of ``methods`` on every seed of ``seeds``, then write ``comparison.json``,
    ``comparison.png`` and, when the runs log alignment, ``alignment.png`` in ``out``.

    Each (method, seed) run is ``train(replace(cfg, seed=k, method=name), run_dirs(...)[name][k])``: for one seed
    every method starts from the same initial weights and sees the same data stream.

    Args:
        cfg: the validated configuration.
        out: the comparison folder (created if needed); must not be a file.
        methods: method names, each once.
        seeds: ``"0,1,2"``, a sequence of ints, or ``None`` for ``cfg.seed`` alone.
        device: a concrete device.
        resume: continue each run from its checkpoint; runs that have none yet start from scratch (at least one
            run must have a checkpoint).
        progress: show a tqdm bar per run.

    Returns:
        ``{method: MethodRuns}`` in the order of ``methods``.

    Raises:
        RunError: ``out`` is a file, a run folder already holds a run (without ``resume``), or ``resume`` finds no
            checkpoint in any run folder.
        ConfigError: bad ``seeds`` (or a bad task option, from ``train``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    seed_list = parse_seeds(seeds, cfg.seed)
    dirs = run_dirs(out, methods, seed_list)
    if resume and not any((d / CHECKPOINT).is_file() for by_seed in dirs.values() for d in by_seed.values()):
        raise RunError(f"cannot resume: no {CHECKPOINT} in any run folder of {out} (seeds {seed_list})")
    results = {}
    for name in methods:
        runs = {}
        for k in seed_list:
            d = dirs[name][k]
            runs[k] = train(replace(cfg, seed=k, method=name), d, device=device,
                            resume=resume and (d / CHECKPOINT).is_file(), progress=progress)
        results[name] = MethodRuns(runs)
    note = next(iter(results.values())).note
    figures = ["comparison.png"]
    title = (f"{cfg.task.name} (T={cfg.task.seq_len}, hidden={cfg.model.hidden_size}, "
             f"seed{'s' if len(seed_list) > 1 else ''}={','.join(map(str, seed_list))})")
    data = load_runs(dirs)
    if any(row.get(k) is not None for recs in data.values() for rec in recs.values() for row in rec.rows
           for k in ALIGN_SCALARS + ALIGN_PROFILES):
        figures.append("alignment.png")
    summary = {"task": cfg.task.name, "note": note, "seeds": seed_list, "statistic": STATISTIC,
               "figures": figures, "runs": summarize(results)}
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    plot_runs(dirs, out / "comparison.png", title=f"{title}\n{note}".strip(),
              alignment_path=out / "alignment.png" if "alignment.png" in figures else None)
    return results


# --------------------------------------------------------------------------------------------------------------------
# statistics and the table


def _as_runs(value: Result | MethodRuns) -> MethodRuns:
    return value if isinstance(value, MethodRuns) else MethodRuns({0: value})


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``n - 1``); ``(None, None)`` for no value, std ``None`` for one."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def seed_stats(runs: MethodRuns) -> tuple[dict, dict, list[int]]:
    """``(mean, std, seeds)`` of the final metrics (:data:`STATS_KEYS` and the ``align_*`` scalars) over the seeds
    that did not diverge; a key enters only if every such seed has a finite value for it."""
    kept = [k for k, r in runs.runs.items() if r.status != "diverged"]
    present = {key for k in kept for key in runs.runs[k].metrics}
    keys = [*STATS_KEYS, *sorted(key for key in present if key.startswith("align_") and key not in ALIGN_PROFILES)]
    mean, std = {}, {}
    for key in keys:
        values = [runs.runs[k].metrics.get(key) for k in kept]
        if kept and all(_finite(v) for v in values):
            mean[key], std[key] = mean_std(values)
    return mean, std, kept


def _status(r: Result) -> str:
    return f"diverged@{r.step}" if r.status == "diverged" else r.status


def summarize(results: dict[str, Result | MethodRuns]) -> dict:
    """The ``runs`` entry of ``comparison.json``: per method its per-seed results (status, step, message, final
    metrics under ``metrics``), the mean and std over the seeds that did not diverge, and counts. With one seed the
    method's entry also holds that run's status, step and final metrics at its top level."""
    out = {}
    for name, value in results.items():
        runs = _as_runs(value)
        mean, std, kept = seed_stats(runs)
        per_seed = {str(k): {"status": r.status, "step": r.step, "message": r.message, "metrics": r.metrics}
                    for k, r in runs.runs.items()}
        entry = {"status": runs.status, "n_seeds": len(runs.runs), "n_completed": len(kept),
                 "diverged": {str(k): r.step for k, r in runs.runs.items() if r.status == "diverged"},
                 "mean": mean, "std": std, "per_seed": per_seed}
        if len(runs.runs) == 1:
            (r,) = runs.runs.values()
            entry = {**r.metrics, "status": r.status, "step": r.step, **entry}
        out[name] = entry
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(results: dict[str, Result | MethodRuns]) -> str:
    """A plain-text table, one row per method. One seed: the run's final metrics, status ``diverged@N`` for a run
    that diverged at iteration N. Several seeds: ``mean +- std`` over the seeds that did not diverge (column ``n``),
    status e.g. ``2/3 completed, diverged@4 (seed 1)``; a footnote line names the statistic."""
    groups = {name: _as_runs(v) for name, v in results.items()}
    multi = any(len(g.runs) > 1 for g in groups.values())
    all_keys = {key for g in groups.values() for r in g.runs.values() for key in r.metrics}
    metric_cols = [c for c in TABLE_KEYS if c in all_keys]
    metric_cols += [c for c in ALIGN_SCALARS if c in all_keys]  # the rest of align_* is in comparison.json
    header = ["method", "status", "step", *(["n"] if multi else []), *metric_cols]
    table = [header]
    for name, g in groups.items():
        if len(g.runs) == 1 and not multi:
            (r,) = g.runs.values()
            table.append([name, _status(r), str(r.step), *(_fmt(r.metrics.get(c)) for c in metric_cols)])
            continue
        mean, std, kept = seed_stats(g)
        diverged = [f"diverged@{r.step} (seed {k})" for k, r in g.runs.items() if r.status == "diverged"]
        others = sorted({r.status for r in g.runs.values()} - {"diverged"})
        status = ", ".join([f"{len(kept)}/{len(g.runs)} {'/'.join(others) or 'completed'}", *diverged])
        steps = sorted({r.step for k, r in g.runs.items() if k in kept})
        step = "-" if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        cells = []
        for c in metric_cols:
            if c in CONSTANT_KEYS:
                cells.append(_fmt(next((r.metrics.get(c) for r in g.runs.values() if c in r.metrics), None)))
            elif mean.get(c) is None:
                cells.append("-")
            else:
                cells.append(_fmt(mean[c]) + ("" if std.get(c) is None else f" +- {std[c]:.2g}"))
        table.append([name, status, step, str(len(kept)), *cells])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in table]
    if multi:
        lines.append("(mean +- sample std over the n seeds of each row that did not diverge)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# plot data


@dataclass
class RunRecord:
    """One run folder as read back: its metrics rows and ``summary.json`` status and step."""

    rows: list[dict]
    status: str
    step: int | None


@dataclass
class Series:
    """One line (``lo``/``hi``: a shaded band) in a panel."""

    label: str | None
    x: list[float]
    y: list[float]
    color: str
    lo: list[float] | None = None
    hi: list[float] | None = None
    linestyle: str = "-"
    linewidth: float = 1.5
    marker: str | None = "."


@dataclass
class Marker:
    """A point marker with a legend entry (a diverged run's last evaluation)."""

    x: float
    y: float
    label: str
    color: str
    symbol: str = "x"
    text: str = ""  # a short annotation beside the marker


@dataclass
class HLine:
    """A horizontal reference line (memoryless baseline, chance level)."""

    y: float
    label: str
    color: str = "gray"
    linestyle: str = "--"


@dataclass
class Panel:
    """One axes: what to draw and how to label it."""

    key: str
    xkey: str
    xlabel: str
    ylabel: str
    yscale: str = "linear"
    title: str = ""
    series: list[Series] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    hlines: list[HLine] = field(default_factory=list)


def load_runs(runs: dict[str, Path | dict[int, Path]]) -> dict[str, dict[int, RunRecord]]:
    """Read each run folder (``{method: folder}`` or ``{method: {seed: folder}}``): metrics rows, and status and
    step from ``summary.json`` (``"unknown"`` / ``None`` where there is none)."""
    data = {}
    for name, dirs in runs.items():
        by_seed = dirs if isinstance(dirs, dict) else {0: dirs}
        data[name] = {}
        for k, d in by_seed.items():
            path = Path(d) / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else {}
            data[name][k] = RunRecord(read_metrics(d), summary.get("status", "unknown"), summary.get("step"))
    return data


def _color(i: int) -> str:
    return f"C{i % 10}"


def _spread(name: str, recs: dict[int, RunRecord], points: dict[int, dict], color: str, *, what: str = "",
            show_marker: bool = True) -> tuple[list[Series], list[Marker]]:
    """Series and markers of one method in one panel from per-seed points ``{seed: {index: (x, y)}}``.

    The seeds that did not diverge give one line: at each index present in all of them, the mean of x and of y,
    with a min-max band when there are several; each diverged seed gets its own thin line and an ``x`` at its last
    point, labelled ``diverged at step N`` (N = its ``summary.json`` step)."""
    kept = [k for k in points if recs[k].status != "diverged"]
    series, markers = [], []
    common = sorted(set.intersection(*(set(points[k]) for k in kept))) if kept else []
    if common:
        xs = [statistics.fmean(points[k][i][0] for k in kept) for i in common]
        ys = [[points[k][i][1] for k in kept] for i in common]
        several = len(kept) > 1
        label = (f"{name}: mean of {len(kept)} seeds, band {BAND}" if several
                 else name if len(recs) == 1 else f"{name} seed {kept[0]}")
        series.append(Series(label + what, xs, [statistics.fmean(v) for v in ys], color,
                             lo=[min(v) for v in ys] if several else None,
                             hi=[max(v) for v in ys] if several else None))
    single = len(recs) == 1
    for k in points:
        if k in kept:
            continue
        pts = [points[k][i] for i in sorted(points[k])]
        who = name if single else f"{name} seed {k}"
        series.append(Series(None, [p[0] for p in pts], [p[1] for p in pts], color, linestyle="--",
                             linewidth=1.0, marker="."))
        if pts and show_marker:
            markers.append(Marker(pts[-1][0], pts[-1][1], f"{who}: diverged at step {recs[k].step}", color,
                                  text=f"{who} diverged@{recs[k].step}"))
    return series, markers


def _curve_points(recs: dict[int, RunRecord], key: str, xkey: str) -> dict[int, dict]:
    """``{seed: {step: (x, y)}}`` of ``key`` against ``xkey`` (rows where both are numbers)."""
    return {k: {r["step"]: (r[xkey], r[key]) for r in rec.rows if _finite(r.get(key)) and _finite(r.get(xkey))}
            for k, rec in recs.items()}


def _first(data: dict[str, dict[int, RunRecord]], key: str):
    return next((r[key] for recs in data.values() for rec in recs.values() for r in rec.rows
                 if r.get(key) is not None), None)


def _xlabel(xkey: str, several: bool) -> str:
    if xkey == "step":
        return "iteration"
    return "training wall-clock (s)" + (", mean over seeds" if several else "")


def comparison_panels(data: dict[str, dict[int, RunRecord]]) -> list[Panel]:
    """Validation loss (log y, memoryless baseline dashed) and, where measured, validation accuracy (chance level
    dashed, from ``chance_accuracy``) against iteration and wall-clock, one line (seed band) per method, diverged
    runs marked. Panels in row order: loss/step, loss/time, [accuracy/step, accuracy/time]."""
    has_acc = any("val_accuracy" in r for recs in data.values() for rec in recs.values() for r in rec.rows)
    several = any(len(recs) > 1 for recs in data.values())
    baseline, chance = _first(data, "baseline"), _first(data, "chance_accuracy")
    panels = []
    for key, label in [("val_loss", "validation loss")] + ([("val_accuracy", "validation accuracy")] if has_acc
                                                              else []):
        for xkey in ("step", "time_s"):
            p = Panel(key, xkey, _xlabel(xkey, several), label, "log" if key == "val_loss" else "linear")
            for i, (name, recs) in enumerate(data.items()):
                s, m = _spread(name, recs, _curve_points(recs, key, xkey), _color(i))
                p.series += s
                p.markers += m
            if key == "val_loss" and baseline is not None:
                p.hlines.append(HLine(baseline, "memoryless baseline"))
            if key == "val_accuracy" and chance is not None:
                p.hlines.append(HLine(chance, "chance level"))
            panels.append(p)
    return panels


def alignment_panels(data: dict[str, dict[int, RunRecord]]) -> list[Panel]:
    """Alignment of each method with BPTT, from rows that carry the ``align_*`` keys (methods without them are
    skipped): ``align_cosine`` and ``align_norm_ratio`` (log y) against iteration, and, at each seed's last
    evaluation with them, ``align_step_cosine``, ``align_step_shift_norm`` and ``align_step_adjoint_norm`` (log y)
    against the time step t = 1..T. ``[]`` when no run logs alignment."""
    panels = []
    labels = {"align_cosine": ("alignment cosine with BPTT", "linear"),
              "align_norm_ratio": ("norm ratio to BPTT", "log"),
              "align_step_cosine": ("cosine per time step", "linear"),
              "align_step_shift_norm": ("target shift norm |delta_t|", "log"),
              "align_step_adjoint_norm": ("BPTT adjoint norm |dL/dh_t|", "log")}
    for key in ALIGN_SCALARS:
        p = Panel(key, "step", "iteration", labels[key][0], labels[key][1], title=key)
        for i, (name, recs) in enumerate(data.items()):
            s, m = _spread(name, recs, _curve_points(recs, key, "step"), _color(i))
            p.series += s
            p.markers += m
        if p.series:
            panels.append(p)
    for key in ALIGN_PROFILES:
        p = Panel(key, "t", "time step t (last evaluation)", labels[key][0], labels[key][1], title=key)
        for i, (name, recs) in enumerate(data.items()):
            points, steps = {}, set()
            for k, rec in recs.items():
                last = next((r for r in reversed(rec.rows) if isinstance(r.get(key), list)), None)
                if last is not None:
                    points[k] = {t: (t + 1, v) for t, v in enumerate(last[key]) if _finite(v)}
                    steps.add(last["step"])
            if not points:
                continue
            at = f" (step {steps.pop()})" if len(steps) == 1 else ""
            s, m = _spread(name, {k: recs[k] for k in points}, points, _color(i), what=at, show_marker=False)
            p.series += s
            p.markers += m
        if p.series:
            panels.append(p)
    return panels


def draw_panels(panels: list[Panel], path: str | Path, *, ncols: int = 2, title: str = "") -> None:
    """Render ``panels`` (row-major, ``ncols`` per row) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows + 0.4), squeeze=False)
    for ax, p in zip(list(axes.flat)[: len(panels)], panels, strict=True):
        for s in p.series:
            ax.plot(s.x, s.y, color=s.color, linestyle=s.linestyle, linewidth=s.linewidth, marker=s.marker,
                    markersize=4, label=s.label)
            if s.lo is not None:
                ax.fill_between(s.x, s.lo, s.hi, color=s.color, alpha=0.2, linewidth=0)
        for m in p.markers:
            ax.plot([m.x], [m.y], linestyle="none", marker=m.symbol, markersize=10, markeredgewidth=2.5,
                    color=m.color, label=m.label, zorder=5)
            if m.text:
                ax.annotate(m.text, (m.x, m.y), xytext=(8, -3), textcoords="offset points", fontsize=7, color=m.color,
                            va="top")
        for h in p.hlines:
            ax.axhline(h.y, color=h.color, linestyle=h.linestyle, linewidth=1, label=h.label)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.set_yscale(p.yscale)
        if p.title:
            ax.set_title(p.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runs(runs: dict[str, Path | dict[int, Path]], path: str | Path, *, title: str = "",
              alignment_path: str | Path | None = None) -> None:
    """Write :func:`comparison_panels` of ``runs`` (``{method: folder}`` or ``{method: {seed: folder}}``) to
    ``path`` and, when ``alignment_path`` is given and some run logs alignment, :func:`alignment_panels` to it."""
    data = load_runs(runs)
    draw_panels(comparison_panels(data), path, title=title)
    if alignment_path is not None:
        panels = alignment_panels(data)
        if panels:
            draw_panels(panels, alignment_path, ncols=3, title=f"{title}\nalignment with BPTT".strip())
