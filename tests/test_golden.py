"""Method configurations are unchanged: the gradients ``Method.backward`` writes, against the reference
``tests/data/golden_methods.json`` (``scripts/golden_methods.py``): for the configurations that existed before the
split into ``seqtp/methods`` and ``seqtp/inverses``, written by the code before it; for the methods added with it,
by the code that added them. Float64 on small instances whose parameters and data are float64 uniform draws (the same
bits on every CPU; a float32 QR init is not, and moved the gradients by 1e-7 between an AMD and an Intel CPU).
``python scripts/golden_methods.py --check tests/data/golden_methods.json`` reports the largest difference. The
tolerance is 1e-9 of each tensor's largest entry: far below any change of the math, and above the ~1e-15 that other
CPUs' vector paths may move a float64 sum by, amplified at most by the solvers' stopping tests (tolerances >= 1e-6 on
relative steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("golden_methods", ROOT / "scripts" / "golden_methods.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
REFERENCE = json.loads((ROOT / "tests" / "data" / "golden_methods.json").read_text())


def test_every_case_has_a_reference():
    assert sorted(REFERENCE) == sorted(name for name, *_ in golden.CASES)


@pytest.mark.parametrize("case", golden.CASES, ids=[c[0] for c in golden.CASES])
def test_gradients_match_the_reference(case):
    name, cell, nonlinearity, make, calls = case
    result = golden.run_case(cell, nonlinearity, make, calls)
    assert sorted(result) == sorted(REFERENCE[name])
    for key, values in result.items():
        got, ref = torch.tensor(values, dtype=torch.float64), torch.tensor(REFERENCE[name][key], dtype=torch.float64)
        scale = ref.abs().max().clamp_min(1e-300)
        assert float((got - ref).abs().max() / scale) <= 1e-9, (name, key)
