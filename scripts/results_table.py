"""Markdown rows of the family results tables from ``seqtp compare`` run folders.

    python scripts/results_table.py --metric accuracy RUN_FOLDER[:METHOD] ...   # temporal order
    python scripts/results_table.py --metric mse RUN_FOLDER[:METHOD] ...        # adding

Each argument is a compare folder (``OUT/<method>/seed_<k>/metrics.jsonl``, or ``OUT/<method>/metrics.jsonl`` for
one seed); ``:METHOD`` picks one method of it (default: every method folder in it). Per method: the seeds, the last
step, the final validation metric per seed (mean +- sample std; temporal order: and the loss), the first evaluation
at or above 0.95 accuracy (temporal order), the alignment cosine at the first and last evaluation that has one, the
final norm ratio and the milliseconds per iteration (``time_s / step``; the training loop's clock, evaluations
included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} +- {statistics.stdev(values):.2g}"


def _seed_runs(folder: Path) -> list[tuple[str, list[dict]]]:
    """``(seed label, metrics rows)`` of one method folder."""
    if (folder / "metrics.jsonl").is_file():
        paths = [("0", folder / "metrics.jsonl")]
    else:
        paths = [(p.parent.name.removeprefix("seed_"), p) for p in sorted(folder.glob("seed_*/metrics.jsonl"))]
    return [(label, [json.loads(line) for line in p.read_text().splitlines() if line.strip()]) for label, p in paths]


def row(method: str, runs: list[tuple[str, list[dict]]], metric: str) -> str:
    finals, losses, first95, cos0, cos_end, ratio, ms, steps = [], [], [], [], [], [], [], []
    for _, rows in runs:
        evals = [r for r in rows if r.get("val_loss") is not None]
        last = evals[-1]
        steps.append(last["step"])
        finals.append(last["val_accuracy"] if metric == "accuracy" else last["val_loss"])
        losses.append(last["val_loss"])
        hit = [r["step"] for r in evals if (r.get("val_accuracy") or 0) >= 0.95]
        first95.append(str(hit[0]) if hit else "never")
        aligned = [r for r in rows if r.get("align_cosine") is not None]
        if aligned:
            cos0.append(aligned[0]["align_cosine"])
            cos_end.append(aligned[-1]["align_cosine"])
            ratio.append(aligned[-1]["align_norm_ratio"])
        if last["step"]:
            ms.append(1000 * last["time_s"] / last["step"])
    per_seed = ", ".join(f"{v:.3g}" for v in finals)
    cells = [f"`{method}`", str(len(runs)), str(max(steps)), f"{_fmt(finals)} ({per_seed})"]
    if metric == "accuracy":
        cells += [_fmt(losses, 2), " / ".join(first95)]
    cells += [_fmt(cos0, 2), _fmt(cos_end), _fmt(ratio, 2), _fmt(ms)]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--metric", choices=("accuracy", "mse"), required=True)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    head = ["method", "seeds", "iterations", "val accuracy (per seed)" if args.metric == "accuracy"
            else "val MSE (per seed)"]
    if args.metric == "accuracy":
        head += ["val loss", "first eval >= 0.95"]
    head += ["cosine at first eval", "final cosine", "final norm ratio", "ms/it"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for spec in args.runs:
        folder, _, only = spec.partition(":")
        folder = Path(folder)
        methods = [only] if only else sorted(p.name for p in folder.iterdir() if p.is_dir())
        for method in methods:
            runs = _seed_runs(folder / method)
            if not runs:
                print(f"no metrics.jsonl under {folder / method}", file=sys.stderr)
                return 1
            print(row(method, runs, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
