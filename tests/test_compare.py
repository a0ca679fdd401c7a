"""``seqtp compare`` over seeds: run-folder layout, ``comparison.json`` statistics (recomputed here from the per-seed
metrics), the table, resume per run, and the plot data (seed bands, divergence markers, chance level, alignment
panels) checked on the :class:`~seqtp.compare.Panel` objects handed to matplotlib, not on pixels."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from seqtp.cli import main
from seqtp.compare import (
    ALIGN_PROFILES,
    HLine,
    alignment_panels,
    comparison_panels,
    format_table,
    load_runs,
    parse_seeds,
    plot_runs,
    run_dirs,
)
from seqtp.config import ConfigError
from seqtp.train import Result

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "temporal_order.yaml"
TINY = ["model.hidden_size=8", "train.batch_size=4", "task.val_size=32", "task.seq_len=10", "train.eval_every=2"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seqtp: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def write_run(folder: Path, metric_rows: list[dict], status: str = "completed", step: int | None = None) -> Path:
    """A fake run folder: ``metrics.jsonl`` from ``metric_rows`` and a ``summary.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_rows))
    step = metric_rows[-1]["step"] if step is None else step
    (folder / "summary.json").write_text(json.dumps({"status": status, "step": step, "metrics": metric_rows[-1]}))
    return folder


# --------------------------------------------------------------------------------------------------------------------
# seeds through the command line


def test_seeds_layout_statistics_table_and_resume(tmp_path: Path, capsys) -> None:
    out, seeds = tmp_path / "cmp", [0, 1]
    code, stdout, err = cli(capsys, "compare", CONFIG, "--seeds", "0,1", "--out", out,
                            "--set", *TINY, "train.steps=4")
    assert code == 0, err
    dirs = run_dirs(out, ["tp", "bptt"], seeds)
    assert sorted(p.name for p in out.iterdir()) == ["bptt", "comparison.json", "comparison.png", "tp"]
    for method in ("tp", "bptt"):
        assert sorted(p.name for p in (out / method).iterdir()) == ["seed_0", "seed_1"]
        for k in seeds:
            assert dirs[method][k] == out / method / f"seed_{k}"
            assert summary(dirs[method][k])["status"] == "completed"
    # Same seed -> same initial weights and validation data for every method; different seeds differ.
    first = {(m, k): rows(dirs[m][k])[0]["val_loss"] for m in ("tp", "bptt") for k in seeds}
    assert first["tp", 0] == first["bptt", 0] and first["tp", 1] == first["bptt", 1]
    assert first["tp", 0] != first["tp", 1]

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["seeds"] == seeds and comparison["figures"] == ["comparison.png"]
    table = stdout.splitlines()
    assert table[0].split()[:4] == ["method", "status", "step", "n"]
    for method in ("tp", "bptt"):
        entry = comparison["runs"][method]
        assert entry["n_seeds"] == entry["n_completed"] == 2 and entry["diverged"] == {}
        finals = {k: rows(dirs[method][k])[-1] for k in seeds}
        for k in seeds:
            assert entry["per_seed"][str(k)]["metrics"] == finals[k]
            assert entry["per_seed"][str(k)]["status"] == "completed" and entry["per_seed"][str(k)]["step"] == 4
        for key in ("val_loss", "val_accuracy", "time_s", "train_loss"):
            values = [finals[k][key] for k in seeds]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            assert entry["mean"][key] == pytest.approx(mean, rel=1e-12)
            assert entry["std"][key] == pytest.approx(std, rel=1e-12, abs=1e-15)
        line = next(ln for ln in table if ln.startswith(f"{method} "))
        assert "2/2 completed" in line
        assert f"{entry['mean']['val_loss']:.4g} +- {entry['std']['val_loss']:.2g}" in line
    assert any("mean +- sample std" in ln for ln in table)

    # The plot data: one line per method with a min-max band over the two seeds.
    panels = comparison_panels(load_runs(dirs))
    loss = next(p for p in panels if p.key == "val_loss" and p.xkey == "step")
    for method in ("tp", "bptt"):
        (s,) = [s for s in loss.series if s.label and s.label.startswith(method)]
        assert "min-max" in s.label and s.x == [0, 2, 4]
        per_seed = [[r["val_loss"] for r in rows(dirs[method][k])] for k in seeds]
        assert s.y == pytest.approx([statistics.fmean(v) for v in zip(*per_seed, strict=True)])
        assert s.lo == [min(v) for v in zip(*per_seed, strict=True)]
        assert s.hi == [max(v) for v in zip(*per_seed, strict=True)]

    # --resume continues every run; a run folder without a checkpoint starts from scratch.
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        (dirs["bptt"][1] / name).unlink()
    code, _, err = cli(capsys, "compare", CONFIG, "--seeds", "0,1", "--out", out, "--resume",
                       "--set", *TINY, "train.steps=6")
    assert code == 0, err
    for method in ("tp", "bptt"):
        for k in seeds:
            assert [r["step"] for r in rows(dirs[method][k])] == [0, 2, 4, 6], (method, k)


def test_compare_out_is_a_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    code, stdout, err = cli(capsys, "compare", CONFIG, "--out", target, "--set", *TINY, "train.steps=2")
    assert code == 2 and stdout == ""
    assert_one_line_error(err, str(target))
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("seeds", ["0,0", "0,x", "-1", ","])
def test_bad_seeds(seeds: str, tmp_path: Path, capsys) -> None:
    code, stdout, err = cli(capsys, "compare", CONFIG, "--seeds", seeds, "--out", tmp_path / "c", "--set", *TINY)
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "--seeds")
    assert not (tmp_path / "c").exists()


def test_parse_seeds() -> None:
    assert parse_seeds(None, 7) == [7]
    assert parse_seeds("2, 0,5", 7) == [2, 0, 5]
    assert parse_seeds([3], 0) == [3]
    with pytest.raises(ConfigError):
        parse_seeds([1.5], 0)


def test_diverged_seeds_marked(tmp_path: Path, capsys) -> None:
    out, seeds = tmp_path / "cmp", [0, 1]
    code, stdout, err = cli(capsys, "compare", CONFIG, "--methods", "tp", "--seeds", "0,1", "--out", out,
                            "--set", *TINY, "train.steps=6", "tp.lr=1e6")
    dirs = run_dirs(out, ["tp"], seeds)
    status = {k: summary(dirs["tp"][k])["status"] for k in seeds}
    steps = {k: summary(dirs["tp"][k])["step"] for k in seeds}
    bad = [k for k in seeds if status[k] == "diverged"]
    assert bad, f"tp.lr=1e6 should diverge on some seed: {status}"
    assert code == 3
    for k in bad:
        assert f"seed {k}: diverged" in err
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("tp ")]
    assert f"{len(seeds) - len(bad)}/{len(seeds)} completed" in line
    for k in bad:
        assert f"diverged@{steps[k]} (seed {k})" in line
    entry = json.loads((out / "comparison.json").read_text())["runs"]["tp"]
    assert entry["status"] == "diverged" and entry["n_completed"] == len(seeds) - len(bad)
    assert entry["diverged"] == {str(k): steps[k] for k in bad}
    if len(bad) == len(seeds):
        assert entry["mean"] == {}
    else:  # one seed left: its value, no spread
        (good,) = set(seeds) - set(bad)
        assert entry["mean"]["val_loss"] == rows(dirs["tp"][good])[-1]["val_loss"] and entry["std"]["val_loss"] is None
    for panel in comparison_panels(load_runs(dirs)):
        assert [s.label for s in panel.series if s.linestyle == "--"] == [None] * len(bad)
        assert len(panel.markers) == len(bad)
        for k in bad:
            last = rows(dirs["tp"][k])[-1]
            (m,) = [m for m in panel.markers if m.label == f"tp seed {k}: diverged at step {steps[k]}"]
            assert (m.x, m.y) == (last[panel.xkey], last[panel.key]) and m.symbol == "x"
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_table_shows_diverged_at_step() -> None:
    results = {"tp": Result("diverged", 4, {"step": 2, "val_loss": 3.0}),
               "bptt": Result("completed", 6, {"step": 6, "val_loss": 1.25})}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["method", "status", "step", "val_loss"]
    assert lines[1].split() == ["tp", "diverged@4", "4", "3"]
    assert lines[2].split() == ["bptt", "completed", "6", "1.25"]


# --------------------------------------------------------------------------------------------------------------------
# plot data from hand-written run folders


def row(step: int, val_loss: float, *, acc: float | None = None, chance: float | None = None, **extra) -> dict:
    r = {"step": step, "time_s": 0.1 * step, "train_loss": val_loss, "val_loss": val_loss, "baseline": 2.0}
    if acc is not None:
        r["val_accuracy"] = acc
    r["chance_accuracy"] = chance
    return {**r, **extra}


def test_mixed_seeds_band_over_completed_and_marker_for_diverged(tmp_path: Path) -> None:
    losses = {0: [2.0, 1.0, 0.5], 1: [2.2, 1.4, 0.9], 2: [2.1, 9.0]}
    for k, ls in losses.items():
        write_run(tmp_path / "tp" / f"seed_{k}", [row(2 * i, v, acc=0.5, chance=0.25) for i, v in enumerate(ls)],
                  status="diverged" if k == 2 else "completed", step=3 if k == 2 else 4)
    data = load_runs(run_dirs(tmp_path, ["tp"], [0, 1, 2]))
    panels = comparison_panels(data)
    assert [(p.key, p.xkey) for p in panels] == [("val_loss", "step"), ("val_loss", "time_s"),
                                                 ("val_accuracy", "step"), ("val_accuracy", "time_s")]
    loss = panels[0]
    assert loss.yscale == "log" and loss.hlines == [HLine(2.0, "memoryless baseline")]
    band, diverged = loss.series
    assert band.label == "tp: mean of 2 seeds, band min-max over seeds"
    assert band.x == [0, 2, 4]
    assert band.y == pytest.approx([(a + b) / 2 for a, b in zip(losses[0], losses[1], strict=True)])
    assert band.lo == [min(a, b) for a, b in zip(losses[0], losses[1], strict=True)]
    assert band.hi == [max(a, b) for a, b in zip(losses[0], losses[1], strict=True)]
    assert diverged.label is None and diverged.y == losses[2] and diverged.color == band.color
    (marker,) = loss.markers
    assert (marker.x, marker.y, marker.label) == (2, 9.0, "tp seed 2: diverged at step 3")
    assert panels[1].markers[0].x == pytest.approx(0.2)  # the time panel marks its time_s
    for acc in panels[2:]:
        assert acc.hlines == [HLine(0.25, "chance level")]
    table = format_table({"tp": _method_runs(tmp_path, [0, 1, 2])})
    (line,) = [ln for ln in table.splitlines() if ln.startswith("tp ")]
    assert "2/3 completed, diverged@3 (seed 2)" in line
    assert f"{statistics.fmean([0.5, 0.9]):.4g} +- {statistics.stdev([0.5, 0.9]):.2g}" in line


def _method_runs(folder: Path, seeds: list[int]):
    from seqtp.compare import MethodRuns

    runs = {}
    for k in seeds:
        s = summary(folder / "tp" / f"seed_{k}")
        runs[k] = Result(s["status"], s["step"], s["metrics"])
    return MethodRuns(runs)


def test_regression_has_no_accuracy_panel_or_chance_line(tmp_path: Path) -> None:
    write_run(tmp_path / "bptt", [row(0, 1.0), row(2, 0.5)])
    panels = comparison_panels(load_runs({"bptt": tmp_path / "bptt"}))
    assert [p.key for p in panels] == ["val_loss", "val_loss"]
    assert all(h.label != "chance level" for p in panels for h in p.hlines)
    (s,) = panels[0].series
    assert s.label == "bptt" and s.lo is None and s.y == [1.0, 0.5]


def align_row(step: int, scale: float, T: int = 4) -> dict:
    """A metrics row with the alignment keys: cosine and norms that depend on ``scale``."""
    return row(step, 1.0 / (1 + step), align_cosine=0.1 * scale + 0.01 * step, align_norm_ratio=scale * (step + 1),
               align_step_cosine=[0.1 * scale * t for t in range(T)],
               align_step_shift_norm=[scale * 2.0 ** -t for t in range(T)],
               align_step_adjoint_norm=[scale * 3.0 ** -t for t in range(T)])


def test_alignment_panels(tmp_path: Path) -> None:
    T, seeds = 4, [0, 1]
    scales = {0: 1.0, 1: 3.0}
    for k in seeds:
        write_run(tmp_path / "tp" / f"seed_{k}", [align_row(s, scales[k], T) for s in (0, 2, 4)])
        write_run(tmp_path / "bptt" / f"seed_{k}", [row(s, 1.0) for s in (0, 2, 4)])  # no alignment keys
    dirs = run_dirs(tmp_path, ["tp", "bptt"], seeds)
    panels = alignment_panels(load_runs(dirs))
    assert [p.key for p in panels] == ["align_cosine", "align_norm_ratio", *ALIGN_PROFILES]
    by_key = {p.key: p for p in panels}
    assert by_key["align_norm_ratio"].yscale == "log" and by_key["align_cosine"].yscale == "linear"
    for p in panels:
        (s,) = p.series  # bptt is skipped
        assert s.label.startswith("tp: mean of 2 seeds, band min-max")
    cos = by_key["align_cosine"].series[0]
    assert cos.x == [0, 2, 4]
    assert cos.y == pytest.approx([statistics.fmean(0.1 * scales[k] + 0.01 * s for k in seeds) for s in (0, 2, 4)])
    for key, base in (("align_step_shift_norm", 2.0), ("align_step_adjoint_norm", 3.0)):
        p = by_key[key]
        assert p.yscale == "log" and p.xkey == "t"
        (s,) = p.series
        assert s.x == list(range(1, T + 1)) and "(step 4)" in s.label
        assert s.y == pytest.approx([statistics.fmean(scales[k] * base ** -t for k in seeds) for t in range(T)])
        assert s.lo == pytest.approx([min(scales.values()) * base ** -t for t in range(T)])
        assert s.hi == pytest.approx([max(scales.values()) * base ** -t for t in range(T)])

    plot_runs(dirs, tmp_path / "comparison.png", title="t", alignment_path=tmp_path / "alignment.png")
    assert (tmp_path / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_alignment_no_panels(tmp_path: Path) -> None:
    write_run(tmp_path / "bptt", [row(0, 1.0), row(2, 0.5)])
    assert alignment_panels(load_runs({"bptt": tmp_path / "bptt"})) == []
    plot_runs({"bptt": tmp_path / "bptt"}, tmp_path / "c.png", alignment_path=tmp_path / "alignment.png")
    assert (tmp_path / "c.png").is_file() and not (tmp_path / "alignment.png").exists()


def test_summary_averages_align_scalars_not_profiles() -> None:
    from seqtp.compare import MethodRuns, summarize

    def result(val: float, cos: float) -> Result:
        return Result("completed", 6, {"step": 6, "val_loss": val, "align_cosine": cos, "align_norm_ratio": 2 * cos,
                                       "align_step_cosine": [cos, cos]})

    cosines = [0.5, 0.7, 0.2]
    runs = MethodRuns({k: result(1.0 + k, c) for k, c in enumerate(cosines)})
    entry = summarize({"tp": runs})["tp"]
    assert entry["mean"]["align_cosine"] == pytest.approx(sum(cosines) / 3)
    assert entry["std"]["align_norm_ratio"] == pytest.approx(2 * statistics.stdev(cosines))
    assert not any(k in entry["mean"] for k in ALIGN_PROFILES)
    (line,) = [ln for ln in format_table({"tp": runs}).splitlines() if ln.startswith("tp ")]
    assert f"{statistics.fmean(cosines):.4g} +- {statistics.stdev(cosines):.2g}" in line
