"""TP-vs-BPTT comparison: the same config, seed and data for each method, a table and a plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .config import Config
from .train import METRICS, Result, train


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def compare(
    cfg: Config,
    out: str | Path,
    *,
    methods: list[str],
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Result]:
    """Train each method of ``methods`` on ``cfg`` into ``out/<method>``, then write ``comparison.json`` and
    ``comparison.png`` in ``out``. Every method gets the same seed, initial weights and data stream."""
    out = Path(out)
    results = {}
    for name in methods:
        results[name] = train(replace(cfg, method=name), out / name, device=device, resume=resume, progress=progress)
    note = next(iter(results.values())).note
    rows = {name: {"status": r.status, "step": r.step, **r.metrics} for name, r in results.items()}
    (out / "comparison.json").write_text(json.dumps({"task": cfg.task.name, "note": note, "runs": rows}, indent=2))
    title = f"{cfg.task.name} (T={cfg.task.seq_len}, hidden={cfg.model.hidden_size}, seed={cfg.seed})"
    plot_runs({name: out / name for name in methods}, out / "comparison.png", title=f"{title}\n{note}".strip())
    return results


def format_table(results: dict[str, Result]) -> str:
    """A plain-text table: one row per method with its final metrics."""
    cols = ["status", "step", "time_s", "train_loss", "val_loss", "val_accuracy", "baseline"]
    cols = [c for c in cols if c in ("status", "step") or any(c in r.metrics for r in results.values())]
    lines = ["method  " + "  ".join(f"{c:>12}" for c in cols)]
    for name, r in results.items():
        values = {"status": r.status, "step": r.step, **r.metrics}
        cells = []
        for c in cols:
            v = values.get(c)
            cells.append(f"{v:>12.4g}" if isinstance(v, float) else f"{'-' if v is None else v:>12}")
        lines.append(f"{name:<8}" + "  ".join(cells))
    return "\n".join(lines)


def plot_runs(runs: dict[str, Path], path: str | Path, *, title: str = "") -> None:
    """Validation loss (and accuracy, where measured) against iteration and wall-clock time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {name: read_metrics(d) for name, d in runs.items()}
    has_acc = any("val_accuracy" in row for rows in data.values() for row in rows)
    panels = [("val_loss", "validation loss")] + ([("val_accuracy", "validation accuracy")] if has_acc else [])
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for i, (key, label) in enumerate(panels):
        for j, xkey in enumerate(("step", "time_s")):
            ax = axes[i][j]
            for name, rows in data.items():
                pts = [(r[xkey], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=False), marker=".", label=name)
            baseline = next((r.get("baseline") for rows in data.values() for r in rows), None)
            if key == "val_loss" and baseline is not None:
                ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="memoryless baseline")
            ax.set_xlabel("iteration" if xkey == "step" else "training wall-clock (s)")
            ax.set_ylabel(label)
            if key == "val_loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
