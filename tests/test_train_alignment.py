"""``train.alignment_every``: the alignment instrument logged by the training loop without changing the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seqtp.config import load_config
from seqtp.train import train

SMALL = ["task.name=temporal_order", "task.seq_len=10", "task.val_size=32", "model.hidden_size=8",
         "train.batch_size=4", "train.steps=6", "train.eval_every=2"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize("method", ["tp", "bptt"])
def test_alignment_is_logged_and_changes_nothing(tmp_path: Path, method: str) -> None:
    plain = train(load_config(None, [*SMALL, f"method={method}"]), tmp_path / "plain", progress=False)
    logged = train(load_config(None, [*SMALL, f"method={method}", "train.alignment_every=4"]), tmp_path / "logged",
                   progress=False)
    assert plain.status == logged.status == "completed"
    # The logged run trains exactly like the plain one: same weights, same validation curve.
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "logged")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain_rows, logged_rows = rows(tmp_path / "plain"), rows(tmp_path / "logged")
    assert [r["val_loss"] for r in plain_rows] == [r["val_loss"] for r in logged_rows]
    for r in logged_rows:
        has = "align_cosine" in r
        assert has == (r["step"] % 4 == 0), r["step"]
        if not has:
            continue
        assert -1 <= r["align_cosine"] <= 1 and r["align_norm_ratio"] > 0
        assert "align_cosine/rnn.weight_hh_l0" in r
        if method == "bptt":  # its update is the BPTT gradient itself
            assert math.isclose(r["align_cosine"], 1.0, rel_tol=0, abs_tol=1e-5)
            assert "align_step_cosine" not in r
        else:
            for key in ("align_step_cosine", "align_step_shift_norm", "align_step_adjoint_norm"):
                assert isinstance(r[key], list) and len(r[key]) == 10


def test_resume_with_alignment_is_exact(tmp_path: Path) -> None:
    pairs = [*SMALL, "train.alignment_every=2"]
    train(load_config(None, pairs), tmp_path / "whole", progress=False)
    train(load_config(None, [*pairs, "train.steps=2"]), tmp_path / "split", progress=False)
    train(load_config(None, pairs), tmp_path / "split", resume=True, progress=False)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "whole") == [{**r, "time_s": w["time_s"]} for r, w in
                                         zip(rows(tmp_path / "split"), rows(tmp_path / "whole"), strict=True)]
