"""``seqtp tune``: a study writes a trainable best.yaml, continues, runs exactly a grid, records divergence and
pruning, is shared by two processes on one SQLite file, and rejects bad keys, ranges and grids in one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import seqtp
from seqtp.cli import main
from seqtp.config import load_config
from seqtp.tune import DEFAULT_SPACE, parse_space, tune

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "adding.yaml"
STEPS, EVAL_EVERY = 4, 2
TINY = ["task.seq_len=8", "model.hidden_size=8", "train.batch_size=4", "task.val_size=32",
        f"train.steps={STEPS}", f"train.eval_every={EVAL_EVERY}"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["tune", *map(str, argv), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def first_val_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]


def tiny_cfg(*extra: str):
    return load_config(CONFIG, [*TINY, *extra])


def test_study_writes_best_yaml_that_train_accepts_with_the_same_seeds_everywhere(capsys, tmp_path):
    out = tmp_path / "t"
    code, stdout, _ = cli(capsys, CONFIG, "--method", "tp", "--trials", 2, "--seeds", "0,1", "--out", out,
                          "--space", "tp.reg=1:10", "--set", *TINY)  # small reg can fail the float32 Cholesky
    assert code == 0
    assert "budget (tp): 2 trials x 2 seeds (0,1) x 4 iterations" in stdout
    study = load(out, "adding-tp")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert set(study.trials[0].params) == {"tp.lr", "tp.target_lr", "tp.reg"}
    assert all(1 <= t.params["tp.reg"] <= 10 for t in study.trials)
    best = min(study.trials, key=lambda t: t.value)
    cfg = load_config(out / "best.yaml")
    assert cfg.method == "tp" and cfg.train.steps == STEPS
    assert (cfg.tp.lr, cfg.tp.target_lr, cfg.tp.reg) == (best.params["tp.lr"], best.params["tp.target_lr"],
                                                         best.params["tp.reg"])
    for t in study.trials:  # the objective is the mean of the seeds' final validation losses
        finals = [t.user_attrs[f"val_loss_seed_{s}"] for s in (0, 1)]
        assert t.value == pytest.approx(sum(finals) / 2)
    # every trial trains the same seeds: the same initial weights and validation set give the same first loss
    for seed in (0, 1):
        runs = [out / "trials" / str(t.number) / f"seed_{seed}" for t in study.trials]
        assert {load_config(r / "config.yaml").seed for r in runs} == {seed}
        assert len({first_val_loss(r) for r in runs}) == 1
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert (out / "tune.png").stat().st_size > 0
    code, _, _ = main_train(capsys, out / "best.yaml", tmp_path / "retrain")
    assert code == 0


def main_train(capsys, config: Path, out: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["train", str(config), "--out", str(out), "--device", "cpu", "--no-progress"])
    return code, *capsys.readouterr()


def test_continuing_adds_trials_up_to_the_total_and_matches_one_run(tmp_path):
    kwargs = dict(method="tp", device="cpu", pruner="none", log=lambda line: None)
    a, b = tmp_path / "a", tmp_path / "b"
    tune(tiny_cfg(), a, trials=2, **kwargs)
    tune(tiny_cfg(), a, trials=2, **kwargs)  # the total is reached: nothing runs
    assert len(load(a, "adding-tp").trials) == 2
    tune(tiny_cfg(), a, trials=3, **kwargs)
    tune(tiny_cfg(), b, trials=3, **kwargs)
    ta, tb = load(a, "adding-tp").trials, load(b, "adding-tp").trials
    assert len(ta) == 3
    assert [t.params for t in ta] == [t.params for t in tb]  # seeded sampler: 2 then 3 == 3 at once
    assert len({json.dumps(t.params) for t in ta}) == 3


@pytest.mark.parametrize("grid", [(), ("tp.reg=1,3",)], ids=["tpe", "grid"])
def test_an_interrupted_trial_is_failed_and_run_again(monkeypatch, tmp_path, grid):
    import seqtp.tune as tune_module

    real_train, calls = tune_module.train, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train", interrupted_once)
    space = () if grid else ("tp.reg=1:10",)  # small reg can fail the float32 Cholesky
    kwargs = dict(method="tp", device="cpu", pruner="none", grid=grid, space=space, log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_cfg(), tmp_path, trials=2, **kwargs)
    assert [t.state for t in load(tmp_path, "adding-tp").trials] == [optuna.trial.TrialState.FAIL]
    tune(tiny_cfg(), tmp_path, trials=2, **kwargs)
    trials = load(tmp_path, "adding-tp").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]  # the failed trial does not count
    if grid:  # the grid point of the failed trial is run again: the grid is covered once
        assert sorted(t.params["tp.reg"] for t in trials[1:]) == [1.0, 3.0]


def test_continuing_with_another_setup_is_an_error(capsys, tmp_path):
    out = tmp_path / "t"
    assert cli(capsys, CONFIG, "--method", "tp", "--trials", 1, "--out", out, "--set", *TINY)[0] == 0
    code, _, err = cli(capsys, CONFIG, "--method", "tp", "--trials", 2, "--out", out, "--set", *TINY,
                       "train.steps=6")
    assert code == 2 and err.count("\n") == 1 and "train.steps was 4, now 6" in err
    assert len(load(out, "adding-tp").trials) == 1


def test_grid_runs_exactly_the_grid(capsys, tmp_path):
    out = tmp_path / "g"
    code, _, _ = cli(capsys, CONFIG, "--method", "bptt", "--grid", "bptt.lr=0.01,0.1", "bptt.nesterov=true,false",
                     "--out", out, "--set", *TINY)
    assert code == 0
    trials = load(out, "adding-bptt").trials
    got = sorted((t.params["bptt.lr"], t.params["bptt.nesterov"]) for t in trials)
    assert got == sorted((lr, n) for lr in (0.01, 0.1) for n in (True, False))
    assert all(set(t.params) == {"bptt.lr", "bptt.nesterov"} for t in trials)
    assert cli(capsys, CONFIG, "--method", "bptt", "--grid", "bptt.lr=0.01,0.1", "bptt.nesterov=true,false",
               "--out", out, "--set", *TINY)[0] == 0
    assert len(load(out, "adding-bptt").trials) == 4  # a finished grid adds nothing


def test_diverging_trial_is_recorded_not_a_crash(capsys, tmp_path):
    out = tmp_path / "d"
    code, stdout, _ = cli(capsys, CONFIG, "--method", "bptt", "--grid", "bptt.lr=0.01,1e10", "--out", out,
                          "--set", *TINY, "bptt.clip=null")
    assert code == 0
    trials = {t.params["bptt.lr"]: t for t in load(out, "adding-bptt").trials}
    assert trials[1e10].state == optuna.trial.TrialState.PRUNED
    assert trials[1e10].user_attrs["status"] == "diverged" and "diverged" in trials[1e10].user_attrs["message"]
    assert trials[0.01].state == optuna.trial.TrialState.COMPLETE
    assert load_config(out / "best.yaml").bptt.lr == 0.01
    assert "diverged" in stdout


def test_pruning_stops_the_trial_at_the_reported_evaluation(tmp_path):
    """A pruner that prunes every value after the warm-up: the trial stops at the first evaluation past it, and
    every evaluation of every seed was reported at step ``k * (steps + 1) + step``."""
    seeds = (0, 1)
    warmup = STEPS + 1 + EVAL_EVERY  # seed 1's evaluation at step 2 is the first one past the warm-up
    tune(tiny_cfg(), tmp_path / "p", method="tp", trials=1, seeds=seeds, device="cpu", log=lambda line: None,
         pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=warmup))
    (trial,) = load(tmp_path / "p", "adding-tp").trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["status"] == "pruned"
    evals = list(range(0, STEPS + 1, EVAL_EVERY))
    assert sorted(trial.intermediate_values) == [*evals, STEPS + 1, STEPS + 1 + EVAL_EVERY]
    run = tmp_path / "p" / "trials" / "0" / "seed_1"
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [0, EVAL_EVERY]
    assert trial.intermediate_values[STEPS + 1] == first_val_loss(run)


def test_two_processes_share_one_sqlite_study(tmp_path):
    out = tmp_path / "shared"
    argv = [sys.executable, "-m", "seqtp", "tune", str(CONFIG), "--method", "tp", "--trials", "4", "--out",
            str(out), "--device", "cpu", "--pruner", "none", "--space", "tp.reg=1:10", "--set", *TINY,
            "train.steps=10", "train.eval_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    trials = load(out, "adding-tp").trials
    assert 4 <= len(trials) <= 5  # two workers starting a trial at the same instant may add one
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials of the one study
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == sorted(t.number for t in trials)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--space", "tp.bogus=1:2"], "unknown key 'tp.bogus'"),
        (["--space", "bptt.clip=1:2"], "searches tp.* keys only"),
        (["--space", "seed=0:3"], "searches tp.* keys only"),
        (["--space", "tp.lr=1:0.1"], "empty range"),
        (["--space", "tp.lr=-1:1:log"], "log range needs LOW > 0"),
        (["--space", "tp.lr=0:1"], "tp.lr must be > 0"),
        (["--space", "tp.momentum=0:1"], "tp.momentum must be in [0, 1)"),
        (["--space", "tp.mode=0:1"], "a range needs a numeric key"),
        (["--space", "tp.lr=a:b"], "bad range bound"),
        (["--space", "tp.mode=linearized,bogus"], "tp.mode must be one of"),
        (["--grid", "tp.reg=-1,1"], "tp.reg must be > 0"),
        (["--grid", "tp.bogus=1,2"], "unknown key 'tp.bogus'"),
        (["--grid", "tp.reg=1,,2"], "empty value"),
        (["--grid", "tp.reg=1,1"], "repeated value"),
        (["--grid", "tp.nesterov=1,2"], "tp.nesterov: expected bool"),
        (["--grid", "tp.reg=1,2", "--trials", "3"], "exceeds the grid's 2 points"),
        (["--grid", "tp.reg=1,2", "--space", "tp.lr=0.1:1"], "exclude each other"),
        (["--seeds", "0,x", "--trials", "1"], "--seeds"),
        (["--trials", "0"], "--trials"),
        ([], "--trials"),
    ],
)
def test_bad_keys_ranges_and_grids_exit_2_with_one_line(capsys, tmp_path, args, needle):
    code, _, err = cli(capsys, CONFIG, "--method", "tp", "--out", tmp_path / "bad", "--set", *TINY, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("seqtp tune: error:") and needle in err, err
    assert not (tmp_path / "bad" / "trials").exists()


@pytest.mark.parametrize("method", sorted(DEFAULT_SPACE))
def test_default_space_is_the_schema_keys_of_the_method(method):
    space = parse_space(tiny_cfg(), method)
    expected = {"tp": {"tp.lr", "tp.target_lr", "tp.reg"}, "bptt": {"bptt.lr", "bptt.clip"}}
    # every method's space is its class's search_space, in its own section
    assert set(space) == expected.get(method, {f"{method}.{spec.split('=')[0]}"
                                                for spec in seqtp.METHODS[method].search_space})
    assert all(p.log and 0 < p.low < p.high for p in space.values())
