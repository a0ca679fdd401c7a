"""Fast paths of the target recursion (Triton kernel, CUDA graph) against the pure-torch reference.

Tolerances: the reference runs in float64 on the same (possibly bf16-rounded) inputs. The kernel loads its inputs in
their dtype, accumulates in float32 and multiplies with ``tl.dot`` in ``tf32`` by default (10-bit mantissa products:
~5e-4 relative error per product) or ``tf32x3`` (about float32: ~1e-6). With ``M`` a contraction the per-step errors
do not compound, so we allow 3e-3 (tf32) and 1e-5 (tf32x3) relative error on ``delta``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import seqtp
from seqtp.inverses import AnalyticInverse, torch_shifts
from seqtp.kernels import choose_backend, triton_available

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


def recursion_inputs(batch, seq_len, hidden, nonlinearity, *, dtype, device, seed=0):
    """Random states in the activation's range, small direct shifts at every step, and a contraction M."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(batch, seq_len, hidden, generator=g, dtype=torch.float64)
    # tanh states within +-0.5, so that a'(h) <= 4/3 and M a'(h) stays a contraction (|M| = 1/2): with growing
    # shifts the difference rule saturates the clamp of atanh and the comparison would measure chaos, not the kernel
    states = {"tanh": 0.5 * torch.tanh(z), "relu": torch.relu(z), "identity": z}[nonlinearity]
    direct = 0.01 * torch.randn(batch, seq_len, hidden, generator=g, dtype=torch.float64)
    w = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))[0]  # orthogonal
    m = torch.linalg.solve(w.T @ w + 1.0 * torch.eye(hidden, dtype=torch.float64), w.T)  # reg 1: |M| = 1/2
    return (states.to(device, dtype), direct.to(device, dtype), m.to(device, torch.float32))


def reference(states, direct, m, *, mode, nonlinearity, shift_cap):
    """The torch reference in float64 on the same inputs (via the generic solver loop for ``difference``)."""
    s, d, mm = states.double(), direct.double(), m.double()
    if mode == "linearized":
        return torch_shifts(s, d, mm, nonlinearity=nonlinearity, eps=1e-3, shift_cap=shift_cap)
    from seqtp._cells import inverse_activation

    out = torch.empty_like(s)
    delta = seqtp.inverses.cap_shift(d[:, -1], s[:, -1], shift_cap)
    out[:, -1] = delta
    for t in range(s.shape[1] - 1, 0, -1):
        h = s[:, t]
        back = (inverse_activation(h + delta, nonlinearity) - inverse_activation(h, nonlinearity)) @ mm.T
        delta = seqtp.inverses.cap_shift(d[:, t - 1] + back, s[:, t - 1], shift_cap)
        out[:, t - 1] = delta
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(  # every activation, both tilings (H <= 128 on chip; H > 128 streamed), odd sizes
    ("hidden", "nonlinearity"),
    [(8, "tanh"), (100, "relu"), (128, "identity"), (128, "tanh"), (200, "tanh"), (512, "relu")],
)
@pytest.mark.parametrize("mode", ["linearized", "difference"])
@pytest.mark.parametrize("shift_cap", [None, 0.02])
@pytest.mark.parametrize(("dtype", "precision"), [(torch.float32, "tf32"), (torch.float32, "tf32x3"),
                                                  (torch.bfloat16, "tf32")])
def test_triton_kernel_matches_reference(hidden, nonlinearity, mode, shift_cap, dtype, precision):
    from seqtp.kernels._triton import fused_shifts

    for batch in (1, 37):
        states, direct, m = recursion_inputs(batch, 50, hidden, nonlinearity, dtype=dtype, device="cuda")
        got = fused_shifts(states, direct, m, mode=mode, nonlinearity=nonlinearity, eps=1e-3, shift_cap=shift_cap,
                           precision=precision)
        assert got.dtype == dtype and got.shape == states.shape
        assert torch.isfinite(got).all()
        want = reference(states, direct, m, mode=mode, nonlinearity=nonlinearity, shift_cap=shift_cap)
        tol = 1e-5 if precision == "tf32x3" else 3e-3
        assert rel_err(got, want) < tol, (batch, rel_err(got, want))


@gpu
@needs_cuda
@pytest.mark.parametrize("shift_cap", [None, 0.02])
@pytest.mark.parametrize("mode", ["linearized", "difference", "exact"])
def test_cuda_graph_replays_the_reference(shift_cap, mode):
    from seqtp.kernels._graphs import graphed

    for seed in (0, 1):  # the second call replays the captured graph on new inputs
        states, direct, m = recursion_inputs(16, 30, 64, "tanh", dtype=torch.float32, device="cuda", seed=seed)
        tensors = (states, direct, m)
        if mode == "exact":  # pre-activations of the steps back near a(h): the forward's, up to a perturbation
            tensors += (torch.atanh(states[:, 1:]) + 0.01 * torch.randn_like(states[:, 1:]),)
        opts = dict(mode=mode, nonlinearity="tanh", eps=1e-3, shift_cap=shift_cap)
        want = torch_shifts(*tensors, **opts)
        got = graphed(torch_shifts, *tensors, **opts)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "triton_fused", "cuda_graph"])
def test_tp_iteration_fast_path_equals_torch_path(backend):
    if backend != "cuda_graph" and not triton_available():
        pytest.skip("needs triton")
    # tf32 products in the kernel (also the fused update's accumulations): rounding the operands of every product to
    # tf32 in a float64 emulation of this setup gives 4e-4 relative error on the RNN gradients; the graph replays
    # float32 ops, off by up to 3e-5 for the exact rule on the CPU (see the interpreter test)
    tol = 3e-4 if backend == "cuda_graph" else 3e-3
    assert fast_path_errors("cuda", names=(backend,)) < tol


@gpu
@needs_cuda
@pytest.mark.parametrize("method_name", ["tp", "tp-exact", "tp-fused", "tp-wide", "bptt"])
def test_training_iteration_has_no_host_sync(method_name):
    """Forward, targets (fast path), update and optimizer step, under ``torch.cuda.set_sync_debug_mode("error")``:
    the kernel (linearized; exact; with the fused local update) and, at H = 160, the CUDA graph."""
    torch.manual_seed(0)
    model = seqtp.RNNModel(1, 160 if method_name == "tp-wide" else 64, 10).cuda()
    methods = {
        "tp": lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1),
        "tp-exact": lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1, mode="exact"),
        "tp-fused": lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1, solver_options={"fuse_local_update": True}),
        "tp-wide": lambda: seqtp.TargetProp(reg=1.0, target_lr=0.1, mode="difference"),
        "bptt": lambda: seqtp.BPTT(clip=1.0),
    }
    method = methods[method_name]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 100, 1, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def iteration():
        opt.zero_grad(set_to_none=True)
        method.backward(model, x, lambda s: torch.nn.functional.cross_entropy(model.read(s), y))
        opt.step()

    iteration()  # warm-up: compilation, graph capture, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        iteration()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@needs_cuda
def test_failed_factorization_on_cuda_poisons_instead_of_syncing():
    model = seqtp.RNNModel(2, 8, 2).cuda()
    with torch.no_grad():
        model.rnn.weight_hh_l0[0, 0] = float("nan")
    solver = AnalyticInverse(reg=1.0).bind(seqtp.make_cell(model), torch.zeros(2, 3, 2, device="cuda"),
                                           torch.zeros(2, 3, 8, device="cuda"))
    assert torch.isnan(solver.inverse.M).all()


def test_backend_choice_on_cpu():
    states = torch.zeros(2, 3, 4)
    assert choose_backend("auto", states) == "torch"
    assert choose_backend("torch", states) == "torch"
    with pytest.raises(ValueError, match="triton"):
        choose_backend("triton", states)
    with pytest.raises(ValueError, match="cuda_graph"):
        choose_backend("cuda_graph", states)
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("cudnn", states)
    with pytest.raises(ValueError, match="backend must be"):
        AnalyticInverse(reg=1.0, backend="fast")


def _interpreter_ok() -> bool:
    if not triton_available():
        return False
    import numpy

    major, minor = (int(v) for v in numpy.__version__.split(".")[:2])
    return (major, minor) < (2, 3)  # Triton 3.6's interpreter breaks on NumPy >= 2.3 (int() of 1-element arrays)


def kernel_errors(device: str) -> float:
    """The worst relative error of the kernel's variants against the float64 reference on ``device``: both tilings,
    every activation, both rules, with and without the cap, with and without prefetching, and the two local-update
    epilogues (``g = -delta * phi'(z) / B`` with ``|delta_t|``; the gradients accumulated in the kernel); ``T = 1``
    and ``T = 2`` included."""
    from seqtp._cells import activation_grad_from_output
    from seqtp.kernels._triton import fused_local_factor, fused_local_grads, fused_shifts
    from seqtp.methods import local_update_grads_from_factor

    worst = 0.0
    for hidden in (12, 150):
        for nl in ("tanh", "relu", "identity"):
            for mode in ("linearized", "difference"):
                for cap in (None, 0.02):
                    for prefetch in (False, True):
                        for seq_len in (1, 2, 6):
                            s, d, m = recursion_inputs(5, seq_len, hidden, nl, dtype=torch.float32, device=device)
                            want = reference(s, d, m, mode=mode, nonlinearity=nl, shift_cap=cap)
                            opts = dict(mode=mode, nonlinearity=nl, eps=1e-3, shift_cap=cap, prefetch=prefetch,
                                        precision="tf32x3")
                            worst = max(worst, rel_err(fused_shifts(s, d, m, **opts), want))
                            if hidden > 128:
                                continue
                            g, norms = fused_local_factor(s, d, m, grad_scale=-0.2, **opts)
                            g_want = -0.2 * want * activation_grad_from_output(s.double(), nl)  # [B, T, H]
                            worst = max(worst, rel_err(g, g_want), rel_err(norms, want.norm(dim=-1)))
                            x = torch.randn(5, seq_len, 3, generator=torch.Generator().manual_seed(1)).to(device)
                            *grads, norms = fused_local_grads(s, d, m, x, grad_scale=-0.2, **opts)
                            grads_want = local_update_grads_from_factor(x.double(), s.double(), g_want)
                            for got, exp in zip(grads, grads_want, strict=True):
                                worst = max(worst, rel_err(got, exp))
                            worst = max(worst, rel_err(norms, want.norm(dim=-1)))
    return worst


FAST_PATHS = {  # name -> AnalyticInverse options
    "triton": {"backend": "triton"},
    "triton_fused": {"backend": "triton", "fuse_local_update": True},
    "cuda_graph": {"backend": "cuda_graph"},
}


def fast_path_errors(device: str, names=("triton", "triton_fused"), modes=("linearized", "difference", "exact")):
    """The worst relative error, over ``modes`` and with and without a binding cap, of one TP iteration's gradients
    and shift statistics by each fast path in ``names`` (float32) against the torch path in float64.

    The reference is float64 because the float32 torch path is itself off by more than the fast paths for the exact
    rule: its loop forms ``psi_t(v_t) - h_{t-1}`` from O(1) terms (cancellation), where the fast paths add the small
    reconstruction error ``M (a(h_t) - z_t)`` to the difference rule (measured under the interpreter: 3e-3 against
    2.6e-4 relative error on ``dW`` with the cap)."""
    worst = 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(19, 40, 3, generator=gen).to(device)  # [B, T, D]
    y = torch.randint(0, 4, (19,), generator=gen).to(device)
    for mode in modes:
        for cap in (None, 0.002):
            results = {}
            for name in ("torch", *names):
                torch.manual_seed(0)
                dtype = torch.float64 if name == "torch" else torch.float32
                model = seqtp.RNNModel(3, 48, 4).to(device, dtype)
                method = seqtp.TargetProp(reg=1.0, target_lr=0.1, mode=mode, shift_cap=cap, solver="analytic",
                                          solver_options={"backend": "torch"} if name == "torch" else FAST_PATHS[name])
                _, stats = method.backward(model, x.to(dtype),
                                           lambda s, m=model: torch.nn.functional.cross_entropy(m.read(s), y))
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
                results[name] = (grads, torch.stack([stats["shift_first"], stats["shift_mid"], stats["shift_last"]]))
            for name in names:
                for got, want in zip(results[name], results["torch"], strict=True):
                    worst = max(worst, rel_err(got, want))
    return worst


def _run_interpreted(expr: str) -> float:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n" \
           f"import test_kernels\nprint(test_kernels.{expr})"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


interpreter = pytest.mark.skipif(not _interpreter_ok(), reason="needs triton and numpy < 2.3 for TRITON_INTERPRET=1")


@interpreter
def test_triton_kernel_in_interpreter_mode_on_cpu():
    """The kernel's logic on the CPU (TRITON_INTERPRET=1, numpy arithmetic): all its variants (see
    :func:`kernel_errors`). The interpreter's products are float32, so the error is float32 rounding."""
    assert _run_interpreted('kernel_errors("cpu")') < 1e-5


@interpreter
def test_tp_fast_paths_in_interpreter_mode_on_cpu():
    """A whole TP iteration through the kernel (plain, and with the fused local update) on the CPU under the
    interpreter, for the three rules: the gradients and shift statistics of the float64 torch path, up to float32
    rounding. The difference and exact rules subtract ``a(h_t + delta_t) - a(h_t)`` with ``delta_t`` small, which
    costs digits in float32: measured 2e-7 (linearized), 9e-6 (difference), 3e-5 (exact)."""
    assert _run_interpreted('fast_path_errors("cpu")') < 1e-4


@gpu
@needs_cuda
@needs_triton
def test_triton_kernel_variants_on_gpu():
    """The interpreter test's grid, compiled, at ``tf32x3`` (about float32)."""
    assert kernel_errors("cuda") < 1e-5


SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use: H100/H200 (sm_90), A100 (sm_80)


def compile_for(arch: int, hidden: int, **options) -> dict:
    """Compile :func:`seqtp.kernels._triton.kernel_config`'s configuration for compute capability ``arch`` without a
    GPU (Triton's cross-compilation and its bundled ``ptxas``) and read the resources a launch would need."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seqtp.kernels._triton import kernel_config

    kernel, consts, launch = kernel_config(hidden, **options)
    def arg_type(name: str) -> str:
        if name in consts:
            return "constexpr"
        return "*fp32" if name.endswith("_ptr") else "fp32" if name in ("eps", "cap", "grad_scale") else "i32"

    signature = {name: arg_type(name) for name in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)
    ptx = Path(tempfile.mkdtemp(prefix="seqtp-ptx-")) / f"kernel_sm{arch}_{hidden}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    info = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu_name}", str(ptx), "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    shutil.rmtree(ptx.parent)
    return {
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "shared": compiled.metadata.shared,
    }


def _ptxas_available() -> bool:
    if not triton_available():
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_configurations_compile_within_the_hardware(arch):
    """Without a GPU: every default configuration compiles for sm_90 (H100/H200) and sm_80 (A100) and fits a block's
    shared memory; on sm_90, the on-chip kernel (H <= 128, the one timed on the H100; with all its options) and the
    streamed one up to H = 512 without a cap do not spill registers (on sm_80 the difference rule with the cap
    spills a few bytes)."""
    cases = [(128, dict(mode=mode, nonlinearity="tanh", shift_cap=0.5, output=output, prefetch=prefetch, input_size=10))
             for mode in ("linearized", "difference") for output in ("shifts", "factor", "grads")
             for prefetch in (False, True)]
    cases += [(hidden, dict(mode="linearized", nonlinearity="tanh", shift_cap=cap))
              for hidden in (512, 2048) for cap in (None, 0.5)]
    if arch != 90:  # elsewhere the shared-memory check of the default launches is enough
        cases = [(h, o) for h, o in cases if o.get("output", "shifts") == "shifts" and not o.get("prefetch")]
    for hidden, options in cases:
        got = compile_for(arch, hidden, **options)
        assert got["shared"] <= SHARED_LIMIT[arch], (hidden, options, got)
        if arch == 90 and (hidden <= 128 or (hidden <= 512 and options["shift_cap"] is None)):
            assert got["spill_bytes"] == 0, (hidden, options, got)
