"""Kernel tuning on a GPU: time the fused recursion alone over configurations, and break a TP iteration into parts.

    python scripts/kernel_tune.py            (CUDA + triton)
"""

# ruff: noqa: B023, E731  (every lambda here is called at once, inside its loop iteration)
from __future__ import annotations

import itertools

import torch
import triton.testing

import seqtp
from seqtp.inverses import torch_shifts
from seqtp.kernels._triton import fused_local_factor, fused_local_grads, fused_shifts
from seqtp.methods import local_update_grads_from_factor


def inputs(b, t, h, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    states = 0.5 * torch.tanh(torch.randn(b, t, h, device="cuda", generator=g))
    direct = torch.zeros(b, t, h, device="cuda")
    direct[:, -1] = 0.01 * torch.randn(b, h, device="cuda", generator=g)
    w = torch.linalg.qr(torch.randn(h, h, device="cuda", generator=g))[0]
    m = torch.linalg.solve(w.T @ w + torch.eye(h, device="cuda"), w.T)
    return states.to(dtype), direct.to(dtype), m


def kernel_table():
    print("kernel alone: shape, block_b, num_warps, precision, prefetch, epilogue -> ms (median), rel err vs float64")
    for b, t, h in [(512, 784, 128), (128, 1000, 128), (256, 784, 512)]:
        s, d, m = inputs(b, t, h)
        ref = torch_shifts(s.double(), d.double(), m.double(), nonlinearity="tanh", eps=1e-3)
        tref = triton.testing.do_bench(lambda: torch_shifts(s, d, m, nonlinearity="tanh", eps=1e-3),
                                       return_mode="median")
        print(f"  ({b},{t},{h}) torch loop: {tref:.3f} ms")
        blocks = (16, 32) if h <= 128 else (16,)
        prefetches = (False, True) if h <= 128 else (False,)
        epilogues = ("shifts", "factor", "grads") if h <= 128 else ("shifts",)
        slabs = (32,) if h <= 128 else (16, 32, 64)  # block_k: rows of M^T per slab of the streamed kernel
        for bb, nw, prec, pf, epi, bk in itertools.product(blocks, (4, 8), ("tf32", "tf32x3"), prefetches, epilogues,
                                                          slabs):
            if epi != "shifts" and (bb != 16 or prec != "tf32"):
                continue  # the epilogues at the default block and precision only: one device run holds the grid
            try:
                opts = dict(nonlinearity="tanh", eps=1e-3, block_b=bb, num_warps=nw, precision=prec, prefetch=pf)
                if h > 128:
                    opts["block_k"] = bk
                if epi == "grads":
                    opts["num_warps"] = max(nw, 8)  # the [H, H] accumulator spills with 4 warps
                if epi == "shifts":
                    fn = lambda: fused_shifts(s, d, m, **opts)
                    out = fn()
                    want = ref
                elif epi == "factor":
                    fn = lambda: fused_local_factor(s, d, m, grad_scale=1.0, **opts)[0]
                    out = fn()
                    want = ref * (1 - s.double() ** 2)
                else:  # dW accumulated in the kernel, against the float64 products
                    x = torch.randn(b, t, 1, device="cuda")
                    fn = lambda: fused_local_grads(s, d, m, x, grad_scale=1.0, **opts)[1]
                    out = fn()
                    want = local_update_grads_from_factor(x.double(), s.double(), ref * (1 - s.double() ** 2))[1]
                err = ((out.double() - want).norm() / want.norm()).item()
                ms = triton.testing.do_bench(fn, return_mode="median")
                print(f"  ({b},{t},{h}) bb={bb:<3} nw={nw} {prec:7s} prefetch={pf!s:5} {epi:6s} bk={bk:<3} "
                      f"{ms:8.3f} ms  err={err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  ({b},{t},{h}) bb={bb} nw={nw} {prec} prefetch={pf} {epi}: failed {type(e).__name__}: "
                      f"{str(e)[:80]}")


def breakdown():
    print("TP iteration parts (ms, CUDA events, median of 20)")
    for b, t, h, dim in [(512, 784, 128, 1), (128, 1000, 128, 10), (256, 784, 512, 1)]:
        torch.manual_seed(0)
        model = seqtp.RNNModel(dim, h, 10).cuda()
        x = torch.randn(b, t, dim, device="cuda")
        y = torch.randint(0, 10, (b,), device="cuda")
        cell = seqtp.make_cell(model)
        parts = {}

        def timed(name, fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            parts.setdefault(name, []).append(start.elapsed_time(end))
            return out

        for _ in range(23):
            with torch.no_grad():
                hs = timed("forward (cudnn)", lambda: model.states(x))
            leaf = hs.detach().requires_grad_()
            timed("readout+loss backward", lambda: torch.nn.functional.cross_entropy(model.read(leaf), y).backward())
            direct = leaf.grad * -0.1 * b
            solver = timed("factorize", lambda: seqtp.AnalyticInverse(reg=1.0, fuse_local_update=True).bind(
                cell, x, hs))
            deltas = timed("recursion (auto)", lambda: solver.propagate(direct))
            timed("local update", lambda: seqtp.local_update_grads(seqtp.elman_params(model), x, hs, deltas))
            if h <= 128:
                timed("recursion + local update in the kernel", lambda: solver.propagate_local_update(direct))
        print(f"  ({b},{t},{h},{dim}): " + ", ".join(f"{k} {sorted(v[3:])[len(v[3:]) // 2]:.3f}"
                                                   for k, v in parts.items()))


if __name__ == "__main__":
    breakdown()
    kernel_table()
