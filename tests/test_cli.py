"""End-to-end tests of the command line: every shipped config with both methods, the run folder, exact resume (after a
clean stop and after a simulated crash), run-folder protection, bad configs, divergence and ``seqtp compare``."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import seqtp
from seqtp import BPTT, TargetProp
from seqtp.cli import main
from seqtp.config import config_from_dict, load_config
from seqtp.tasks import TASKS
from seqtp.tasks.mnist import SUBSET_NOTE

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
MNIST_TASKS = ("pixel_mnist", "permuted_mnist")
SHORT_SEQ = {"adding": 10, "copying": 5, "temporal_order": 10}  # MNIST keeps its 784 steps
SMALL = ["model.hidden_size=8", "train.batch_size=4", "task.val_size=32"]
METHOD_CLASSES = {"tp": TargetProp, "bptt": BPTT}


def shrink(task: str, mnist_dir: Path | None = None, *, steps: int = 6, eval_every: int = 2) -> list[str]:
    """``--set`` pairs that make a config of ``task`` train in a fraction of a second (MNIST: a few seconds)."""
    pairs = [*SMALL, f"train.steps={steps}", f"train.eval_every={eval_every}"]
    if task in MNIST_TASKS:
        assert mnist_dir is not None
        return [*pairs, f"task.data_dir={mnist_dir}"]
    return [*pairs, f"task.seq_len={SHORT_SEQ[task]}"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``seqtp`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, config: str | Path, out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    sets = ["--set", *overrides] if overrides else []
    return cli(capsys, "train", config, "--out", out, *sets, *extra)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rows_without_time(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows(run)]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("seqtp: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def config_path(task: str) -> Path:
    return REPO / "configs" / f"{task}.yaml"


# --------------------------------------------------------------------------------------------------------------------
# every config, both methods


@pytest.mark.parametrize("method", ["tp", "bptt"])
@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_trains(config: Path, method: str, tmp_path: Path, capsys, request) -> None:
    task = load_config(config).task.name
    is_mnist = task in MNIST_TASKS
    mnist_dir = request.getfixturevalue("mnist_dir") if is_mnist else None
    steps, eval_every = (3, 2) if is_mnist else (5, 2)
    overrides = shrink(task, mnist_dir, steps=steps, eval_every=eval_every)
    out = tmp_path / "run"
    code, stdout, err = train(capsys, config, out, *overrides, extra=("--method", method, "--device", "cpu"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json"]

    # config.yaml: the resolved configuration, loadable back, with the overrides and the method applied.
    stored = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert stored == load_config(config, overrides, method=method, device="cpu")
    assert stored.method == method and stored.train.steps == steps and stored.model.hidden_size == 8

    # metrics.jsonl: one row per evaluation (step 0, every eval_every steps, the last step).
    metrics = rows(out)
    assert [r["step"] for r in metrics] == sorted({0, *range(eval_every, steps + 1, eval_every), steps})
    classification = TASKS[task].kind == "classification"
    for row in metrics:
        assert {"step", "time_s", "train_loss", "val_loss"} <= row.keys()
        assert ("val_accuracy" in row) == classification
        assert (row["chance_accuracy"] is None) == (not classification)
        assert math.isfinite(row["val_loss"]) and row["time_s"] >= 0
        if classification:
            assert 0 <= row["val_accuracy"] <= 1 and 0 < row["chance_accuracy"] < 1
    assert metrics[0]["train_loss"] is None and metrics[0]["time_s"] == 0
    assert all(isinstance(r["train_loss"], float) and math.isfinite(r["train_loss"]) for r in metrics[1:])
    assert [r["time_s"] for r in metrics] == sorted(r["time_s"] for r in metrics)

    # checkpoint.pt: the final state.
    state = checkpoint(out)
    assert state["step"] == steps
    assert state["model"]["rnn.weight_hh_l0"].shape == (8, 8)

    # summary.json
    info = summary(out)
    assert info["status"] == "completed" and info["step"] == steps and info["message"] == ""
    assert info["method"] == method and info["task"] == task and info["device"] == "cpu"
    assert info["metrics"] == metrics[-1]

    # stdout: a table naming the method, the note where there is one, the run folder.
    table_row = next(line for line in stdout.splitlines() if line.startswith(method))
    assert "completed" in table_row and str(steps) in table_row.split()
    assert f"run folder: {out}" in stdout
    if is_mnist:
        assert info["note"] == SUBSET_NOTE
        assert f"note: {SUBSET_NOTE}" in stdout
        assert "10k" in info["note"]
    else:
        assert info["note"] == "" and "note:" not in stdout
    assert err == ""


def test_default_run_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(capsys, "train", config_path("adding"), "--set", *shrink("adding", steps=2))
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("adding-tp-")
    assert summary(run)["status"] == "completed"
    assert f"run folder: {Path('runs') / run.name}" in stdout


# --------------------------------------------------------------------------------------------------------------------
# exact resume


RESUME_TASK = "temporal_order"  # a classification task: val_accuracy is compared too
N = 8


@pytest.mark.parametrize("method", ["tp", "bptt"])
def test_resume_equals_straight_run(method: str, tmp_path: Path, capsys) -> None:
    config = config_path(RESUME_TASK)
    base = [*shrink(RESUME_TASK, steps=N, eval_every=2), f"method={method}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(capsys, config, straight, *base)[0] == 0
    assert train(capsys, config, split, *base, f"train.steps={N // 2}")[0] == 0
    assert checkpoint(split)["step"] == N // 2 and summary(split)["step"] == N // 2
    code, _, err = train(capsys, config, split, *base, f"train.steps={N}", extra=("--resume",))
    assert code == 0, err

    assert rows_without_time(split) == rows_without_time(straight)
    assert [r["step"] for r in rows(split)] == [0, 2, 4, 6, 8]
    a, b = checkpoint(straight), checkpoint(split)
    assert a["step"] == b["step"] == N
    assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["generator"], b["generator"])
    assert summary(split)["status"] == "completed" and summary(split)["metrics"]["step"] == N
    # The stored config now says N steps.
    assert yaml.safe_load((split / "config.yaml").read_text())["train"]["steps"] == N
    # The weights did change during training (the comparison above is not vacuous).
    first = checkpoint(tmp_path / "straight")["model"]["rnn.weight_hh_l0"]
    fresh = tmp_path / "fresh"
    assert train(capsys, config, fresh, *base, "train.steps=1", "train.eval_every=1")[0] == 0
    assert not torch.equal(first, checkpoint(fresh)["model"]["rnn.weight_hh_l0"])


@pytest.mark.parametrize("first", [3, 5])
def test_resume_from_a_run_ending_off_the_evaluation_grid(first: int, tmp_path: Path, capsys) -> None:
    """A first run of 3 or 5 steps (eval_every=2) writes an end-of-run row at an odd step; resuming to N drops it and
    ends exactly as the straight run, training-loss windows included."""
    config = config_path(RESUME_TASK)
    base = shrink(RESUME_TASK, steps=N, eval_every=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(capsys, config, straight, *base)[0] == 0
    assert train(capsys, config, split, *base, f"train.steps={first}")[0] == 0
    assert rows(split)[-1]["step"] == first
    assert train(capsys, config, split, *base, extra=("--resume",))[0] == 0
    assert rows_without_time(split) == rows_without_time(straight)
    assert_same_weights(checkpoint(straight)["model"], checkpoint(split)["model"])


def test_resume_below_the_checkpoint_step(tmp_path: Path, capsys) -> None:
    config = config_path(RESUME_TASK)
    out = tmp_path / "run"
    assert train(capsys, config, out, *shrink(RESUME_TASK, steps=4))[0] == 0
    code, _, err = train(capsys, config, out, *shrink(RESUME_TASK, steps=2), extra=("--resume",))
    assert code == 2
    assert_one_line_error(err, "step 4", "train.steps=2")


def test_compare_duplicate_method(tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "compare", config_path("adding"), "--methods", "tp,tp", "--out", tmp_path / "c")
    assert code == 2
    assert_one_line_error(err, "--methods", "once")


def test_resume_of_a_finished_run_adds_nothing(tmp_path: Path, capsys) -> None:
    config = config_path(RESUME_TASK)
    base = shrink(RESUME_TASK, steps=4, eval_every=2)
    out = tmp_path / "run"
    assert train(capsys, config, out, *base)[0] == 0
    before = rows(out)
    weights = checkpoint(out)["model"]
    code, _, err = train(capsys, config, out, *base, extra=("--resume",))
    assert code == 0, err
    assert rows(out) == before
    assert_same_weights(checkpoint(out)["model"], weights)
    assert summary(out)["status"] == "completed" and summary(out)["metrics"] == before[-1]


def interrupt_after(monkeypatch, cls: type, name: str, calls: int, *, batch_size: int = 4) -> None:
    """Make ``cls.name`` raise ``KeyboardInterrupt`` on its call number ``calls + 1`` of a training batch (calls of
    ``sample`` with another batch size, e.g. building the validation set, are not counted)."""
    original = getattr(cls, name)
    seen = {"n": 0}

    def wrapper(self, *args, **kwargs):
        counted = name != "sample" or args[0] == batch_size
        if counted:
            if seen["n"] == calls:
                raise KeyboardInterrupt
            seen["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


@pytest.mark.parametrize("where", ["sample", "backward", "optimizer"])
@pytest.mark.parametrize("method", ["tp", "bptt"])
def test_resume_after_crash_equals_straight_run(method: str, where: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C in the middle of step 6 (between evaluations at 4 and 6), then ``--resume``: identical to a straight
    run, whether the interrupt lands before the batch is drawn, while the method computes the gradient (the batch
    drawn is given back) or in the optimizer step (the step-4 checkpoint is kept)."""
    config = config_path(RESUME_TASK)
    base = [*shrink(RESUME_TASK, steps=N, eval_every=2), f"method={method}"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert train(capsys, config, straight, *base)[0] == 0

    with monkeypatch.context() as m:
        if where == "sample":
            interrupt_after(m, TASKS[RESUME_TASK], "sample", 5)
        elif where == "backward":
            interrupt_after(m, METHOD_CLASSES[method], "backward", 5)
        else:
            interrupt_after(m, torch.optim.SGD, "step", 5)
        code, _, err = train(capsys, config, crashed, *base)
    assert code == 130
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    info = summary(crashed)
    assert info["status"] == "interrupted" and info["step"] == 5
    assert checkpoint(crashed)["step"] == (4 if where == "optimizer" else 5)
    assert [r["step"] for r in rows(crashed)] == [0, 2, 4]

    code, _, err = train(capsys, config, crashed, *base, extra=("--resume",))
    assert code == 0, err
    assert rows_without_time(crashed) == rows_without_time(straight)
    assert_same_weights(checkpoint(crashed)["model"], checkpoint(straight)["model"])
    assert summary(crashed)["status"] == "completed"


def test_resume_without_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "empty"
    code, stdout, err = train(capsys, config_path("adding"), out, *shrink("adding"), extra=("--resume",))
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "cannot resume", "checkpoint.pt", str(out))


def test_resume_needs_out(capsys) -> None:
    code, _, err = cli(capsys, "train", config_path("adding"), "--resume", "--set", *shrink("adding"))
    assert code == 2
    assert_one_line_error(err, "--resume needs --out")


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, capsys) -> None:
    config, out = config_path("adding"), tmp_path / "run"
    assert train(capsys, config, out, *shrink("adding", steps=2))[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, stdout, err = train(capsys, config, out, *shrink("adding", steps=4))
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "already holds a run", "--resume")
    assert (out / "metrics.jsonl").read_text() == before
    assert checkpoint(out)["step"] == 2 and yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2


@pytest.mark.parametrize(
    ("change", "key"),
    [("tp.lr=0.07", "tp.lr"), ("model.hidden_size=9", "model.hidden_size"), ("method=bptt", "method"),
     ("seed=1", "seed"), ("train.eval_every=1", "train.eval_every")],
)
def test_resume_with_a_changed_key(change: str, key: str, tmp_path: Path, capsys) -> None:
    config, out = config_path("adding"), tmp_path / "run"
    base = shrink("adding", steps=2)
    assert train(capsys, config, out, *base)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = train(capsys, config, out, *base, "train.steps=4", change, extra=("--resume",))
    assert code == 2
    assert_one_line_error(err, "cannot resume", key)
    assert (out / "metrics.jsonl").read_text() == before
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2


# --------------------------------------------------------------------------------------------------------------------
# bad configurations


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["train.stepz=3"], ["unknown key 'train.stepz'"]),
        (["modle.hidden_size=3"], ["unknown key 'modle'"]),
        (["train.steps=abc"], ["train.steps", "expected int"]),
        (["train.steps=1.5"], ["train.steps", "expected int"]),
        (["tp.lr=fast"], ["tp.lr", "expected float"]),
        (["task.seq_len=-3"], ["task.seq_len", ">= 1"]),
        (["model.hidden_size=0"], ["model.hidden_size", ">= 1"]),
        (["tp.mode=magic"], ["tp.mode", "linearized"]),
        (["task.name=sorting"], ["task.name", "sorting"]),
        (["task.bits=3"], ["task.bits", "adding"]),  # an option the task does not take
        (["task.seq_len=1"], ["task.seq_len", "1"]),  # a value the task rejects (the adding task needs T >= 2)
        (["seed=-1"], ["error: seed must be >= 0"]),
        (["device=tpu"], ["device"]),
        (["train.steps"], ["--set", "key=value"]),
    ],
)
def test_bad_config_is_one_line(overrides: list[str], fragments: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = train(capsys, config_path("adding"), out, *overrides)
    assert code == 2 and stdout == ""
    assert_one_line_error(err, *fragments)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()


def test_bad_yaml_files(tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "train", tmp_path / "missing.yaml")
    assert code == 2
    assert_one_line_error(err, "missing.yaml", "not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: {name: adding\n")
    code, _, err = cli(capsys, "train", broken)
    assert code == 2
    assert_one_line_error(err, "broken.yaml", "invalid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stpes: 3\n")
    code, _, err = cli(capsys, "train", unknown)
    assert code == 2
    assert_one_line_error(err, "unknown key 'train.stpes'", "unknown.yaml")


def test_missing_mnist_folder_is_one_line(tmp_path: Path, capsys) -> None:
    nowhere = tmp_path / "no-mnist"
    code, _, err = train(capsys, config_path("pixel_mnist"), tmp_path / "run", *SMALL, f"task.data_dir={nowhere}")
    assert code == 2
    assert_one_line_error(err, str(nowhere))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(tmp_path: Path, capsys) -> None:
    code, _, err = train(capsys, config_path("adding"), tmp_path / "run", *shrink("adding"), extra=("--device", "cuda"))
    assert code == 2
    assert_one_line_error(err, "device", "CUDA is not available")


def test_unknown_method_flag(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", str(config_path("adding")), "--method", "nope", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["seqtp", "seqtp.cli"])
def test_subprocess_bad_config(module: str, tmp_path: Path) -> None:
    """Through a real interpreter: exit code 2 and exactly one line on stderr, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: adding\n  seq_len: -4\n")
    proc = subprocess.run(
        [sys.executable, "-m", module, "train", str(bad), "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["seqtp: error: task.seq_len must be >= 1, got -4"]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------------------
# divergence


def assert_finite_weights(state: dict) -> None:
    for key, value in state["model"].items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("method", ["tp", "bptt"])
def test_divergence_from_a_nan_loss(method: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """The method returns a NaN loss at step 4: exit 3, status diverged, the step-2 checkpoint kept."""
    cls = METHOD_CLASSES[method]
    original = cls.backward
    calls = {"n": 0}

    def poisoned(self, model, x, loss_fn):
        calls["n"] += 1
        loss, stats = original(self, model, x, loss_fn)
        return (loss * float("nan"), stats) if calls["n"] == 4 else (loss, stats)

    monkeypatch.setattr(cls, "backward", poisoned)
    out = tmp_path / "run"
    code, stdout, err = train(capsys, config_path("adding"), out, *shrink("adding", steps=6), f"method={method}")
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "diverged at step 4" in lines[0] and "Traceback" not in err
    info = summary(out)
    assert info["status"] == "diverged" and info["step"] == 4
    assert "diverged at step 4: non-finite loss (nan)" in lines[0] and lines[0].endswith(info["message"])
    assert info["metrics"]["step"] == 2
    state = checkpoint(out)
    assert state["step"] == 2
    assert_finite_weights(state)
    assert [r["step"] for r in rows(out)] == [0, 2]
    assert "diverged" in next(line for line in stdout.splitlines() if line.startswith(method))


def test_divergence_from_a_nan_gradient_reports_its_norm(tmp_path: Path, capsys, monkeypatch) -> None:
    original = TargetProp.backward
    calls = {"n": 0}

    def poisoned(self, model, x, loss_fn):
        calls["n"] += 1
        loss, stats = original(self, model, x, loss_fn)
        if calls["n"] == 3:
            model.rnn.weight_hh_l0.grad[0, 0] = float("inf")
        return loss, stats

    monkeypatch.setattr(TargetProp, "backward", poisoned)
    out = tmp_path / "run"
    code, _, err = train(capsys, config_path("adding"), out, *shrink("adding", steps=6))
    assert code == 3
    assert "diverged at step 3: non-finite gradient (norm inf)" in err
    assert summary(out)["step"] == 3 and checkpoint(out)["step"] == 2


@pytest.mark.parametrize(("method", "lr"), [("tp", "1e30"), ("bptt", "1e30")])
def test_divergence_from_a_huge_learning_rate(method: str, lr: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    overrides = [*shrink("adding", steps=20, eval_every=1), f"method={method}", f"{method}.lr={lr}"]
    code, _, err = train(capsys, config_path("adding"), out, *overrides)
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "diverged" in err
    info = summary(out)
    assert info["status"] == "diverged" and info["step"] < 20
    assert f"diverged at step {info['step']}: " in err and f"diverged at step {info['step']}: " in info["message"]
    state = checkpoint(out)
    assert state["step"] < info["step"]  # the last good checkpoint is before the iteration that diverged
    assert_finite_weights(state)
    # The kept checkpoint is a good one: its evaluation is finite and it is the last row of metrics.jsonl.
    metrics = rows(out)
    assert state["step"] == metrics[-1]["step"] == info["metrics"]["step"]
    assert all(r["val_loss"] is not None and math.isfinite(r["val_loss"]) for r in metrics)
    text = (out / "metrics.jsonl").read_text() + (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON


# --------------------------------------------------------------------------------------------------------------------
# compare


def test_compare(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", config_path("temporal_order"), "--methods", "tp,bptt", "--out", out,
                            "--set", *shrink("temporal_order", steps=4))
    assert code == 0, err
    for method in ("tp", "bptt"):
        assert summary(out / method)["status"] == "completed"
        assert summary(out / method)["method"] == method
        assert [r["step"] for r in rows(out / method)] == [0, 2, 4]
    # Same seed, initial weights and validation data for both methods.
    assert rows(out / "tp")[0]["val_loss"] == rows(out / "bptt")[0]["val_loss"]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["task"] == "temporal_order" and set(comparison["runs"]) == {"tp", "bptt"}
    assert comparison["runs"]["bptt"]["val_loss"] == rows(out / "bptt")[-1]["val_loss"]
    png = (out / "comparison.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    table = stdout.splitlines()
    assert table[0].split()[:3] == ["method", "status", "step"]
    assert any(line.startswith("tp ") and "completed" in line for line in table)
    assert any(line.startswith("bptt ") and "completed" in line for line in table)


def test_compare_single_method(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", config_path("adding"), "--methods", "bptt", "--out", out,
                            "--set", *shrink("adding", steps=2))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bptt", "comparison.json", "comparison.png"]
    assert "tp " not in stdout and any(line.startswith("bptt ") for line in stdout.splitlines())


@pytest.mark.parametrize(("methods", "fragment"), [("tp,nope", "nope"), ("", "(empty)"), ("BPTT", "BPTT")])
def test_compare_unknown_method(methods: str, fragment: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    code, stdout, err = cli(capsys, "compare", config_path("adding"), "--methods", methods, "--out", out)
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "--methods", fragment)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# GRU / LSTM cells and inverse solvers through the CLI


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.cell=gru"],
        ["model.cell=lstm"],
        ["model.cell=gru", "tp.solver=gauss_newton", "tp.space=output", "tp.max_iter=3"],
        ["model.cell=lstm", "tp.solver=learned", "tp.feedback_lr=0.05"],
        ["model.cell=lstm", "tp.update=through_time", "tp.mode=difference"],
        ["tp.solver=gauss_newton", "tp.space=preactivation"],
        ["tp.solver=iterated", "tp.steps=3"],
        ["tp.solver=learned", "tp.mode=difference"],
    ],
    ids=lambda o: ",".join(o),
)
def test_cells_and_solvers_train(overrides: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = train(capsys, config_path("temporal_order"), out, *shrink("temporal_order"), *overrides)
    assert code == 0, err
    info = summary(out)
    assert info["status"] == "completed" and info["step"] == 6
    last = rows(out)[-1]
    assert math.isfinite(last["val_loss"]) and last["shift_last"] > 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for pair in overrides:
        key, value = pair.split("=")
        section, name = key.split(".")
        assert str(cfg[section][name]) == value


def test_bptt_trains_gru(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = train(capsys, config_path("adding"), out, *shrink("adding"), "model.cell=gru", "method=bptt")
    assert code == 0, err
    assert summary(out)["status"] == "completed"


def test_learned_solver_resumes_exactly(tmp_path: Path, capsys) -> None:
    """The learned inverse's weights and noise generator are checkpointed: resume equals the straight run."""
    config = config_path(RESUME_TASK)
    base = [*shrink(RESUME_TASK, steps=N, eval_every=2), "tp.solver=learned", "tp.mode=difference"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(capsys, config, straight, *base)[0] == 0
    assert train(capsys, config, split, *base, f"train.steps={N // 2}")[0] == 0
    assert train(capsys, config, split, *base, extra=("--resume",))[0] == 0
    assert rows_without_time(split) == rows_without_time(straight)
    assert_same_weights(checkpoint(straight)["model"], checkpoint(split)["model"])


# --------------------------------------------------------------------------------------------------------------------
# small edges of the command line


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"seqtp {seqtp.__version__}"


@pytest.mark.parametrize(("command", "default"), [("train", "runs/<config>-<method>-<time>"),
                                                  ("compare", "runs/<config>-compare-<time>")])
def test_help_names_the_default_run_folder(command: str, default: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())


def test_config_without_a_task_is_one_line(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    code, stdout, err = cli(capsys, "train", empty, "--out", tmp_path / "run")
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "task.name is required", "temporal_order")
    assert not (tmp_path / "run").exists()


def test_config_is_required_without_resume(capsys) -> None:
    code, _, err = cli(capsys, "train", "--set", "train.steps=2")
    assert code == 2
    assert_one_line_error(err, "CONFIG is required", "--resume")


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("below", [False, True])
def test_out_that_is_a_file_is_one_line(command: str, below: bool, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder\n")
    out = blocker / "run" if below else blocker
    code, stdout, err = cli(capsys, command, config_path("adding"), "--out", out, "--set", *shrink("adding", steps=2))
    assert code == 2 and stdout == ""
    assert_one_line_error(err, str(blocker))
    assert blocker.read_text() == "not a folder\n"


def test_bad_data_dir_variable_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SEQTP_DATA_DIR", str(tmp_path / "nowhere"))
    code, _, err = train(capsys, config_path("pixel_mnist"), tmp_path / "run", *SMALL)
    assert code == 2
    assert_one_line_error(err, str(tmp_path / "nowhere"), "$SEQTP_DATA_DIR")
    assert "task.data_dir" not in err


def test_mnist_fallback_prints_one_clean_line(mnist_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SEQTP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code, stdout, err = train(capsys, config_path("pixel_mnist"), out, *SMALL, "train.steps=1", "train.eval_every=1")
    assert code == 0, err
    assert err.splitlines() == [f"seqtp: warning: Hugging Face hub unreachable; reading MNIST from the offline copy "
                                f"{mnist_dir.resolve()}"]
    assert f"note: {SUBSET_NOTE}" in stdout and summary(out)["note"] == SUBSET_NOTE


# --------------------------------------------------------------------------------------------------------------------
# resume without the config, preemption by SIGTERM


def test_resume_without_config_reads_the_run_folder(tmp_path: Path, capsys) -> None:
    """``train --out RUN --resume`` continues from RUN/config.yaml (all earlier --set values included);
    ``--set train.steps=N`` still extends it."""
    config = config_path(RESUME_TASK)
    base = [*shrink(RESUME_TASK, steps=N, eval_every=2), "tp.reg=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(capsys, config, straight, *base)[0] == 0
    assert train(capsys, config, split, *base, f"train.steps={N // 2}")[0] == 0
    code, _, err = cli(capsys, "train", "--out", split, "--resume", "--set", f"train.steps={N}")
    assert code == 0, err
    assert rows_without_time(split) == rows_without_time(straight)
    assert_same_weights(checkpoint(straight)["model"], checkpoint(split)["model"])
    assert yaml.safe_load((split / "config.yaml").read_text())["tp"]["reg"] == 3.0
    code, _, err = cli(capsys, "train", "--out", split, "--resume", "--set", "tp.reg=4")
    assert code == 2
    assert_one_line_error(err, "cannot resume", "tp.reg")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "nothing", "--resume")
    assert code == 2
    assert_one_line_error(err, "config.yaml", "nothing")


@pytest.mark.parametrize("seeds", [None, "0,1"])
def test_compare_resume_without_config(seeds: str | None, tmp_path: Path, capsys) -> None:
    config = config_path(RESUME_TASK)
    base = shrink(RESUME_TASK, steps=4, eval_every=2)
    flags = ["--seeds", seeds] if seeds else []
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(capsys, "compare", config, "--out", straight, *flags, "--set", *base)[0] == 0
    assert cli(capsys, "compare", config, "--out", split, *flags, "--set", *base, "train.steps=2")[0] == 0
    code, _, err = cli(capsys, "compare", "--out", split, "--resume", "--set", "train.steps=4")
    assert code == 0, err
    folders = ["tp", "bptt"] if seeds is None else [f"{m}/seed_{k}" for m in ("tp", "bptt") for k in (0, 1)]
    for folder in folders:
        assert rows_without_time(split / folder) == rows_without_time(straight / folder), folder
        assert_same_weights(checkpoint(straight / folder)["model"], checkpoint(split / folder)["model"])


def test_train_restores_the_sigterm_handler(tmp_path: Path, capsys) -> None:
    def mine(signum, frame):
        raise AssertionError("not expected to run")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert train(capsys, config_path("adding"), tmp_path / "run", *shrink("adding", steps=2))[0] == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "")])
def test_signal_then_resume_equals_straight_run(sig: int, code: int, said: str, tmp_path: Path, capsys) -> None:
    """A real signal to ``python -m seqtp train`` in the middle of a long run: it checkpoints, writes summary.json
    (``interrupted``) and exits 130 / 143; ``--resume`` (no config) to K steps then ends bit for bit where a straight
    run of K steps ends."""
    config = config_path(RESUME_TASK)
    base = shrink(RESUME_TASK, steps=100_000, eval_every=5)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seqtp", "train", str(config), "--out", str(run), "--set", *base,
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):  # evaluated at steps 0, 5, 10
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    info = summary(run)
    stopped = checkpoint(run)["step"]
    assert info["status"] == "interrupted" and 5 <= stopped <= info["step"] < 100_000  # row 10 may lack its checkpoint
    assert f"interrupted{' by ' + said if said else ''} at step {info['step']}" in info["message"]

    steps = stopped + 7  # off the evaluation grid: the end-of-run row is compared too
    resumed, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", f"train.steps={steps}")
    assert resumed == 0, err
    straight = tmp_path / "straight"
    assert train(capsys, config, straight, *base, f"train.steps={steps}")[0] == 0
    assert rows_without_time(run) == rows_without_time(straight)
    a, b = checkpoint(straight), checkpoint(run)
    assert a["step"] == b["step"] == steps
    assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    assert summary(run)["status"] == "completed"
