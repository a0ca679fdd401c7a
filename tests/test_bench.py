"""The iteration benchmark: row schema, JSON, the command line, memory, and the naive baseline's gradients."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import seqtp
from seqtp import bench as B
from seqtp.cli import main
from seqtp.kernels import triton_available

TINY = (4, 12, 8, 2)
NUMERIC = ("median_ms", "min_ms", "max_ms")


@pytest.fixture(scope="module")
def tiny_rows() -> list[dict]:
    return B.bench([TINY], device="cpu", repeats=2, warmup=1)


def test_rows_have_all_keys_and_ordered_positive_times(tiny_rows):
    cpu_variants = [n for n, spec in B.VARIANTS.items() if spec["backend"] not in B.CUDA_ONLY_BACKENDS]
    assert [B.variant_name(r) for r in tiny_rows] == cpu_variants
    assert "tp-linearized-local-triton" in B.VARIANTS and "tp-linearized-local-cuda_graph" in B.VARIANTS
    for row in tiny_rows:
        assert set(row) == set(B.ROW_KEYS)
        assert (row["batch"], row["seq_len"], row["hidden"], row["input"]) == TINY
        assert all(row[k] > 0 for k in NUMERIC)
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] > 0
    by_name = {B.variant_name(r): r for r in tiny_rows}
    assert by_name["bptt"]["backend"] == "torch" and by_name["bptt"]["mode"] is None
    assert by_name["tp-linearized-local-naive"]["backend"] == "naive"
    exact = by_name["tp-exact-through_time"]
    assert [exact[k] for k in ("method", "mode", "update", "backend")] == ["tp", "exact", "through_time", "torch"]


def test_json_matches_schema(tiny_rows, tmp_path):
    path = tmp_path / "sub" / "bench.json"
    B.write_json(tiny_rows, path, device="cpu", dtype=torch.float32)
    doc = json.loads(path.read_text())
    assert set(doc) == {"device", "torch", "dtype", "results"}
    assert doc["torch"] == torch.__version__ and doc["dtype"] == "float32" and doc["device"]
    assert doc["results"] == tiny_rows


def test_format_table_gives_ratios_to_bptt():
    shape = dict(zip(("batch", "seq_len", "hidden", "input"), TINY, strict=True))
    times = {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0}
    rows = [
        {**B.VARIANTS["bptt"], "backend": "torch", **shape, **times, "peak_mem_mb": 2.0},
        {**B.VARIANTS["tp-linearized-local"], **shape, **times, "median_ms": 25.0, "peak_mem_mb": 3.0},
        {**B.VARIANTS["tp-exact-local"], **shape, **times, "batch": 99, "peak_mem_mb": None},  # no BPTT row
    ]
    lines = B.format_table(rows).splitlines()
    assert len(lines) == 4 and "time/BPTT" in lines[0]
    assert lines[2].split()[-2:] == ["2.50x", "1.50x"]
    assert lines[3].split()[-3:] == ["-", "-", "-"]


def test_parse_variants():
    assert B.parse_variants(None) == list(B.VARIANTS) == B.parse_variants("all")
    assert B.parse_variants("bptt, tp-difference-through-time") == ["bptt", "tp-difference-through_time"]
    with pytest.raises(ValueError, match="unknown variants"):
        B.parse_variants("bptt,tp-nope")
    with pytest.raises(ValueError):
        B.bench([(4, 0, 8, 2)], device="cpu")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_naive_gradients_equal_reference(nonlinearity):
    """The naive per-step loop computes the same gradients as TargetProp(linearized, local), in float64."""
    torch.manual_seed(0)
    f64 = torch.float64
    batch, seq_len, input_size, hidden = 5, 9, 3, 6
    model = seqtp.RNNModel(input_size, hidden, 4, nonlinearity=nonlinearity).to(f64)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.9)
    x = 0.5 * torch.randn(batch, seq_len, input_size, dtype=f64)
    y = torch.randint(0, 4, (batch,))

    def grads(method):
        model.zero_grad(set_to_none=True)
        loss, _ = method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, ref = grads(seqtp.TargetProp(reg=0.5, target_lr=0.3, mode="linearized", update="local"))
    loss_naive, naive = grads(B._NaiveTargetProp(reg=0.5, target_lr=0.3))
    assert loss_naive == loss_ref
    assert ref.keys() == naive.keys()
    for name in ref:
        assert ref[name].abs().max() > 0, name
        torch.testing.assert_close(naive[name], ref[name], rtol=0, atol=1e-10, msg=name)


def test_peak_memory_grows_with_seq_len():
    rows = B.bench([(8, 25, 16, 2), (8, 100, 16, 2)], device="cpu", variants="bptt,tp-linearized-local",
                   repeats=1, warmup=1)
    short, long = {}, {}
    for r in rows:
        (short if r["seq_len"] == 25 else long)[B.variant_name(r)] = r["peak_mem_mb"]
    if short["bptt"] is None:
        pytest.skip("no CPU memory profile in this torch")
    states_mb = 8 * 100 * 16 * 4 / 2**20  # one [B, T, H] float32 tensor at T = 100
    for name in short:
        assert long[name] > states_mb, name  # at least the states
        assert 3 < long[name] / short[name] < 5, name  # linear in T (4x the length)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_from_args(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = _args("--batch", "4", "--seq-len", "12", "--hidden", "8", "--input", "2", "--device", "cpu",
                 "--repeats", "2", "--warmup", "1", "--variants", "bptt,tp-linearized-local-naive",
                 "--dtype", "float64", "--json", str(out))
    assert B.run_from_args(args, torch.device("cpu")) == 0
    text = capsys.readouterr().out
    assert "tp-linearized-local-naive" in text and "x" in text.splitlines()[-2]
    doc = json.loads(out.read_text())
    assert doc["dtype"] == "float64" and [B.variant_name(r) for r in doc["results"]] == [
        "bptt", "tp-linearized-local-naive"]


@pytest.mark.parametrize("argv", [["--batch", "4"], ["--variants", "nope"]])
def test_run_from_args_rejects_bad_options(argv, capsys):
    assert B.run_from_args(_args(*argv, "--repeats", "1", "--warmup", "0"), torch.device("cpu")) == 2
    assert "seqtp bench: error" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["nonsense", "cuda:0"])
def test_cli_bench_rejects_bad_device(device, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert main(["bench", "--device", device, "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqtp bench: error") and len(err.strip().splitlines()) == 1


def test_cli_bench_runs(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--batch", "2", "--seq-len", "5", "--hidden", "4", "--input", "1", "--device", "cpu",
                 "--repeats", "1", "--warmup", "0", "--variants", "bptt,tp-linearized-local", "--json", str(out)]) == 0
    assert [B.variant_name(r) for r in json.loads(out.read_text())["results"]] == ["bptt", "tp-linearized-local"]


def test_defaults():
    args = _args()
    assert (args.device, args.dtype, args.repeats, args.warmup, args.variants, args.json) == (
        "auto", "float32", 20, 3, None, None)
    assert (args.input, args.cell) == (1, "elman")


def test_cells_get_bptt_and_tp_rows():
    rows = B.bench([TINY], device="cpu", variants="bptt,tp-linearized-local,tp-linearized-local-naive",
                   cells="elman,gru,lstm", repeats=1, warmup=0)
    got = [(r["cell"], B.variant_name(r), r["solver"]) for r in rows]
    assert got == [("elman", "bptt", None), ("elman", "tp-linearized-local", "analytic"),
                   ("elman", "tp-linearized-local-naive", "analytic"), ("gru", "bptt", None),
                   ("gru", "tp-linearized-local", "dense"), ("lstm", "bptt", None),
                   ("lstm", "tp-linearized-local", "dense")]  # the naive loop is Elman-only
    for row in rows:
        assert set(row) == set(B.ROW_KEYS) and row["median_ms"] > 0
    lines = B.format_table(rows).splitlines()
    gru_tp = next(line for line in lines if " gru " in line and line.startswith("tp-"))
    gru_bptt = next(r for r in rows if r["cell"] == "gru" and r["method"] == "bptt")
    gru_row = next(r for r in rows if r["cell"] == "gru" and r["method"] == "tp")
    assert gru_tp.split()[-2] == f"{gru_row['median_ms'] / gru_bptt['median_ms']:.2f}x"  # ratio to the GRU's BPTT
    with pytest.raises(ValueError, match="unknown cells"):
        B.bench([TINY], device="cpu", cells="elman,transformer")


def test_bench_is_quiet(capfd):
    """The CPU memory profile prints nothing (no profiler start/stop lines, no allocator warning)."""
    B.bench([TINY], device="cpu", variants="bptt,tp-linearized-local", repeats=1, warmup=0)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_input_defaults_to_one(capsys):
    args = _args("--batch", "2", "--seq-len", "5", "--hidden", "4", "--device", "cpu", "--repeats", "1",
                 "--warmup", "0", "--variants", "bptt", "--cell", "gru")
    assert B.run_from_args(args, torch.device("cpu")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[:8] == ["bptt", "torch", "gru", "-", "2", "5", "4", "1"]
    assert B.CPU_SHAPE == (64, 200, 128, 1) and B.DEFAULT_SHAPES[0] == (512, 784, 128, 1)


@pytest.mark.gpu
def test_cuda_rows():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    rows = B.bench([TINY], device="cuda", variants=None, repeats=2, warmup=1)  # every variant, fast paths included
    assert rows[0]["backend"] == "cudnn"
    assert [B.variant_name(r) for r in rows] == list(B.VARIANTS)
    for row in rows:
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["peak_mem_mb"] > 0


def test_every_tp_variant_maps_to_solver_options():
    for name, spec in B.VARIANTS.items():
        assert B.variant_name(spec) == name
        if spec["method"] == "tp" and spec["backend"] != "naive":
            method = B._make_method(spec)
            assert method.solver_options == B.SOLVER_BACKENDS[spec["backend"]]
            seqtp.AnalyticInverse(reg=1.0, **method.solver_options)  # the options are the solver's


def test_graph_mode_needs_cuda(capsys):
    with pytest.raises(ValueError, match="graph=True"):
        B.bench([TINY], device="cpu", graph=True)
    assert main(["bench", "--device", "cpu", "--graph", "--batch", "4", "--seq-len", "12", "--hidden", "8",
                 "--input", "2", "--repeats", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_graph_mode_rows():
    if not (torch.cuda.is_available() and triton_available()):
        pytest.skip("needs CUDA and triton")
    names = ["bptt", "tp-linearized-local-triton", "tp-linearized-local-triton_fused", "tp-exact-local-triton",
             "tp-linearized-local-naive"]
    rows = B.bench([TINY], device="cuda", variants=names, repeats=2, warmup=1, graph=True)
    for row in rows[:-1]:
        assert row["backend"].endswith("+graph") and "error" not in row, row
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["peak_mem_mb"] >= 0
    assert rows[-1]["median_ms"] is None and "cannot be captured" in rows[-1]["error"]


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_captured_tp_iteration_equals_eager(fuse):
    """A captured TP training step (the kernel backend, as ``auto`` picks) moves the weights as eager steps do."""
    if not (torch.cuda.is_available() and triton_available()):
        pytest.skip("needs CUDA and triton")
    x = torch.randn(16, 20, 3, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    weights = {}
    for captured in (False, True):
        torch.manual_seed(0)
        model = seqtp.RNNModel(3, 32, 10).cuda()
        method = seqtp.TargetProp(reg=1.0, target_lr=0.1, solver_options={"fuse_local_update": fuse})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(model=model, method=method, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
            optimizer.step()

        step()  # compiles the kernel outside the capture
        run = B._captured(step, torch.device("cuda")) if captured else step  # the capture's warm-up steps twice
        for _ in range(1 if captured else 3):
            run()
        weights[captured] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)
