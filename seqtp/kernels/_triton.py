"""Fused Triton kernel for the linearized and difference target recursions of TP by regularized inversion.

``delta_{t-1} = dhat_{t-1} + M (a'(h_t) * delta_t)``, ``delta_T = dhat_T`` (Roulet & Harchaoui, TMLR 2023), with the
optional per-step cap ``|delta_t| <= c |h_t|``. Batch rows are independent: each program owns ``BLOCK_B`` rows and
runs the whole time loop for them; nothing else is sequential.

Every ``delta_t`` is flushed (entries ``<= 2^-63`` zeroed, :func:`_flush`) after the cap, as in the torch loop.

- ``H <= 128`` (one tile): ``M^T`` is loaded once into registers and ``delta`` stays in registers across steps; per
  step the program reads ``h_{t-1}`` and ``dhat_{t-1}`` and writes ``delta_{t-1}`` (float32).
- larger ``H`` (streamed): ``M^T`` does not fit on chip; the whole row of ``delta_{t-1}`` accumulates in registers
  while ``M^T`` streams from L2 in ``[BK, H]`` slabs along the reduction, and ``delta_t`` is re-read slab by slab
  from the float32 output written the step before (a CTA barrier orders the two). Each step reads ``M`` once.

Options (``H <= 128``; off by default: none has a GPU measurement, see ``docs/performance.md``):

- ``prefetch``: the loads of ``h_{t-1}`` and ``dhat_{t-1}`` are issued one step ahead, off the dependency chain
  ``delta_t -> delta_{t-1}``.
- :func:`fused_local_grads`: the TP local update inside the kernel. Per step it forms ``g_t = -delta_t * phi'(z_t)
  / B`` and accumulates ``dW += g_t^T h_{t-1}``, ``dU += g_t^T x_t``, ``db += sum_rows g_t`` on chip, off the
  dependency chain; it writes only per-program partial sums and the norms ``|delta_t|`` (for the statistics).
- :func:`fused_local_factor`: writes ``g_t`` and ``|delta_t|`` instead of ``delta_t`` (the update's products then
  run in torch), for tuning against the other two.

The exact rule runs here as the difference rule on corrected direct shifts (see
:meth:`seqtp.AnalyticInverse.exact_as_difference`).

Inputs may be float32, bfloat16 or float16; loads are converted to float32 and the products accumulate in float32.
The matrix products use ``tl.dot`` with ``input_precision="tf32"`` by default (``"tf32x3"`` for about float32
accuracy). Defaults: 4 warps and 16 rows per program for ``H <= 128``; for ``H > 128`` ``auto`` uses the CUDA graph,
since the streamed kernel has no GPU measurement. Timings: ``docs/performance.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import SINGLE_TILE_MAX

ACTS = {"tanh": 0, "relu": 1, "identity": 2}


@triton.jit
def _a_grad(h, ACT: tl.constexpr, eps):
    """a'(h): 1 / (1 - clamp(h)^2) (tanh), 1[h > 0] (relu), 1 (identity)."""
    if ACT == 0:
        hc = tl.minimum(tl.maximum(h, -1.0 + eps), 1.0 - eps)
        return 1.0 / (1.0 - hc * hc)
    elif ACT == 1:
        return tl.where(h > 0, 1.0, 0.0)
    else:
        return h * 0.0 + 1.0


@triton.jit
def _a(v, ACT: tl.constexpr, eps):
    """a(v) = phi^{-1}(v): atanh(clamp(v)) (tanh), max(v, 0) (relu), v (identity)."""
    if ACT == 0:
        vc = tl.minimum(tl.maximum(v, -1.0 + eps), 1.0 - eps)
        return 0.5 * tl.log((1.0 + vc) / (1.0 - vc))
    elif ACT == 1:
        return tl.maximum(v, 0.0)
    else:
        return v


@triton.jit
def _back(delta, h, ACT: tl.constexpr, MODE: tl.constexpr, eps):
    """What multiplies M^T in one step back: a'(h) * delta (linearized) or a(h + delta) - a(h) (difference)."""
    if MODE == 0:
        return delta * _a_grad(h, ACT, eps)
    else:
        return _a(h + delta, ACT, eps) - _a(h, ACT, eps)


@triton.jit
def _cap(delta, h, cap):
    """Rescale rows of ``delta`` [BB, BH] so that |delta| <= cap * |h|."""
    dn = tl.sqrt(tl.sum(delta * delta, axis=1))  # [BB]
    lim = cap * tl.sqrt(tl.sum(h * h, axis=1))  # [BB]
    scale = tl.where(dn > lim, lim / tl.maximum(dn, 1e-30), 1.0)
    return delta * scale[:, None]


FLUSH_FLOOR = 2.0**-63
"""``sqrt`` of float32's smallest normal number: the kernel zeroes shifts at or below it (float32 arithmetic), as
:func:`seqtp.inverses.flush_tiny` does for the torch paths, so decaying shifts never become subnormal floats."""


@triton.jit
def _flush(delta):
    """Zero the entries of ``delta`` with ``|delta| <= 2^-63`` (:data:`FLUSH_FLOOR`; NaN passes through)."""
    return tl.where(tl.abs(delta) <= 1.0842021724855044e-19, 0.0, delta)


@triton.jit
def _phi_grad(h, ACT: tl.constexpr):
    """phi'(z) in terms of the output h = phi(z): 1 - h^2 (tanh), 1[h > 0] (relu), 1 (identity)."""
    if ACT == 0:
        return 1.0 - h * h
    elif ACT == 1:
        return tl.where(h > 0, 1.0, 0.0)
    else:
        return h * 0.0 + 1.0


@triton.jit
def _emit(out_ptr, norm_ptr, o_off, n_off, delta, h, mask, rmask, grad_scale, ACT: tl.constexpr, OUT: tl.constexpr):
    """Store step t's result: delta_t (OUT 0); or the local-update factor grad_scale * delta_t * phi'(z_t) and the row
    norms |delta_t| (OUT 1); or the row norms only (OUT 2: the gradients accumulate in the kernel)."""
    if OUT == 0:
        tl.store(out_ptr + o_off, delta, mask=mask)
    else:
        if OUT == 1:
            tl.store(out_ptr + o_off, delta * _phi_grad(h, ACT) * grad_scale, mask=mask)
        tl.store(norm_ptr + n_off, tl.sqrt(tl.sum(delta * delta, axis=1)), mask=rmask)


@triton.jit
def _recursion_single_tile(
    states_ptr, direct_ptr, mt_ptr, out_ptr, norm_ptr, x_ptr, gw_ptr, gu_ptr, gb_ptr,
    B, T, H, D,
    stride_sb, stride_st, stride_db, stride_dt, stride_ob, stride_ot, stride_xb, stride_xt,
    eps, cap, grad_scale,
    ACT: tl.constexpr, MODE: tl.constexpr, HAS_CAP: tl.constexpr, PREC: tl.constexpr,
    OUT: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    cols = tl.arange(0, BLOCK_H)  # [BH]
    rmask = rows < B
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]  # [BB, BH]
    mt = tl.load(mt_ptr + cols[:, None] * H + cols[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    s_off = rows[:, None] * stride_sb + cols[None, :]  # [BB, BH]
    d_off = rows[:, None] * stride_db + cols[None, :]
    o_off = rows[:, None] * stride_ob + cols[None, :]
    n_off = rows * T  # [BB]: row offsets into the [B, T] norms
    t = T - 1
    h = tl.load(states_ptr + s_off + t * stride_st, mask=mask, other=0.0).to(tl.float32)  # [BB, BH]
    delta = tl.load(direct_ptr + d_off + t * stride_dt, mask=mask, other=0.0).to(tl.float32)
    if HAS_CAP:
        delta = _cap(delta, h, cap)
    delta = _flush(delta)
    _emit(out_ptr, norm_ptr, o_off + t * stride_ot, n_off + t, delta, h, mask, rmask, grad_scale, ACT, OUT)
    if OUT == 2:  # the local update accumulates here: dW += g_t^T h_{t-1}, dU += g_t^T x_t, db += sum_rows g_t
        dcols = tl.arange(0, BLOCK_D)  # [BD]
        x_off = rows[:, None] * stride_xb + dcols[None, :]  # [BB, BD]
        xmask = rmask[:, None] & (dcols < D)[None, :]
        g = delta * _phi_grad(h, ACT) * grad_scale  # [BB, BH]: g_t = dL_loc/dz_t, zero on padded rows and columns
        x_t = tl.load(x_ptr + x_off + t * stride_xt, mask=xmask, other=0.0).to(tl.float32)  # [BB, BD]
        acc_u = tl.dot(tl.trans(g), x_t, input_precision=PREC)  # [BH, BD]
        acc_b = tl.sum(g, axis=0)  # [BH]
        acc_w = tl.zeros([BLOCK_H, BLOCK_H], dtype=tl.float32)  # [BH, BH]
    if PREFETCH:  # the loads of step t - 1 are issued one step ahead, off the recursion's dependency chain
        pmask = mask & (T >= 2)
        h_next = tl.load(states_ptr + s_off + tl.maximum(T - 2, 0) * stride_st, mask=pmask, other=0.0)
        d_next = tl.load(direct_ptr + d_off + tl.maximum(T - 2, 0) * stride_dt, mask=pmask, other=0.0)
    for i in range(1, T):
        t = T - i  # delta_t is known; compute delta_{t-1}
        u = _back(delta, h, ACT, MODE, eps)  # [BB, BH]
        if PREFETCH:
            h = h_next.to(tl.float32)
            d = d_next.to(tl.float32)
            pmask = mask & (t >= 2)
            h_next = tl.load(states_ptr + s_off + tl.maximum(t - 2, 0) * stride_st, mask=pmask, other=0.0)
            d_next = tl.load(direct_ptr + d_off + tl.maximum(t - 2, 0) * stride_dt, mask=pmask, other=0.0)
        else:
            h = tl.load(states_ptr + s_off + (t - 1) * stride_st, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(direct_ptr + d_off + (t - 1) * stride_dt, mask=mask, other=0.0).to(tl.float32)
        if OUT == 2:
            acc_w += tl.dot(tl.trans(g), h, input_precision=PREC)  # g_t^T h_{t-1}: off the dependency chain
        delta = tl.dot(u, mt, input_precision=PREC) + d  # [BB, BH]
        if HAS_CAP:
            delta = _cap(delta, h, cap)
        delta = _flush(delta)
        _emit(out_ptr, norm_ptr, o_off + (t - 1) * stride_ot, n_off + t - 1, delta, h, mask, rmask, grad_scale, ACT,
              OUT)
        if OUT == 2:
            g = delta * _phi_grad(h, ACT) * grad_scale  # g_{t-1}
            x_t = tl.load(x_ptr + x_off + (t - 1) * stride_xt, mask=xmask, other=0.0).to(tl.float32)
            acc_u += tl.dot(tl.trans(g), x_t, input_precision=PREC)
            acc_b += tl.sum(g, axis=0)
    if OUT == 2:  # this program's partial sums; g_0 pairs with h_0 = 0 and adds nothing to dW
        wmask = cmask[:, None] & cmask[None, :]
        tl.store(gw_ptr + pid * H * H + cols[:, None] * H + cols[None, :], acc_w, mask=wmask)
        tl.store(gu_ptr + pid * H * D + cols[:, None] * D + dcols[None, :], acc_u,
                 mask=cmask[:, None] & (dcols < D)[None, :])
        tl.store(gb_ptr + pid * H + cols, acc_b, mask=cmask)


@triton.jit
def _recursion_streamed(
    states_ptr, direct_ptr, mt_ptr, out_ptr, norm_ptr, x_ptr, gw_ptr, gu_ptr, gb_ptr,
    B, T, H, D,
    stride_sb, stride_st, stride_db, stride_dt, stride_ob, stride_ot, stride_xb, stride_xt,
    eps, cap, grad_scale,
    ACT: tl.constexpr, MODE: tl.constexpr, HAS_CAP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """H > 128: the whole row of ``delta_{t-1}`` accumulates in registers ([BB, BH]) while ``M^T`` streams from L2 in
    [BK, BH] slabs along the reduction; ``delta_t`` is re-read slab by slab from the float32 output written the step
    before (a CTA barrier orders the two), so each step reads ``M`` once and ``delta_t`` once."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    cols = tl.arange(0, BLOCK_H)  # [BH]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    rmask = rows < B
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]  # [BB, BH]
    s_off = rows[:, None] * stride_sb + cols[None, :]  # [BB, BH]
    d_off = rows[:, None] * stride_db + cols[None, :]
    o_off = rows[:, None] * stride_ob + cols[None, :]
    t = T - 1
    delta = tl.load(direct_ptr + d_off + t * stride_dt, mask=mask, other=0.0).to(tl.float32)  # [BB, BH]
    if HAS_CAP:
        delta = _cap(delta, tl.load(states_ptr + s_off + t * stride_st, mask=mask, other=0.0).to(tl.float32), cap)
    tl.store(out_ptr + o_off + t * stride_ot, _flush(delta), mask=mask)
    tl.debug_barrier()
    for i in range(1, T):
        t = T - i  # delta_t is in out[:, t]; compute delta_{t-1} into out[:, t-1]
        acc = tl.load(direct_ptr + d_off + (t - 1) * stride_dt, mask=mask, other=0.0).to(tl.float32)  # [BB, BH]
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + ks) < H  # [BK]
            mk = rmask[:, None] & kmask[None, :]  # [BB, BK]
            d = tl.load(out_ptr + rows[:, None] * stride_ob + t * stride_ot + k0 + ks[None, :], mask=mk, other=0.0)
            h = tl.load(states_ptr + rows[:, None] * stride_sb + t * stride_st + k0 + ks[None, :], mask=mk,
                        other=0.0).to(tl.float32)
            u = _back(d, h, ACT, MODE, eps)  # [BB, BK]: zero where masked
            mt = tl.load(mt_ptr + (k0 + ks)[:, None] * H + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                         other=0.0)  # [BK, BH]
            acc += tl.dot(u, mt, input_precision=PREC)
        if HAS_CAP:
            acc = _cap(acc, tl.load(states_ptr + s_off + (t - 1) * stride_st, mask=mask, other=0.0).to(tl.float32),
                       cap)
        tl.store(out_ptr + o_off + (t - 1) * stride_ot, _flush(acc), mask=mask)
        tl.debug_barrier()


MODES = {"linearized": 0, "difference": 1}


STREAMED_MAX = 2048  # the streamed kernel's [BK, H] float32 slab of M^T: 16 x 2048 x 4 B = 128 KiB of shared memory


OUTPUTS = {"shifts": 0, "factor": 1, "grads": 2}  # what the kernel writes (see _emit)


def kernel_config(
    hidden: int,
    *,
    mode: str,
    nonlinearity: str,
    shift_cap: float | None,
    output: str = "shifts",
    input_size: int = 1,
    block_b: int = 16,
    num_warps: int | None = None,
    precision: str | None = None,
    prefetch: bool = False,
    block_k: int | None = None,
) -> tuple:
    """The kernel, its compile-time constants and its launch options for hidden size ``hidden``: the one place where
    they are chosen (the launch uses it, and ``tests/test_kernels.py`` compiles the same configurations for sm_90 and
    sm_80 to check registers, spills and shared memory without a GPU).

    Defaults: ``H <= 128``: 4 warps (8 when the kernel accumulates the gradients: their ``[H, H]`` float32
    accumulator takes 64 registers per thread), 3 pipeline stages (the fastest on an H100, ``docs/performance.md``).
    ``H > 128`` (streamed): a single stage and 8 warps up to ``H = 512`` (16 above), slabs of 32 rows of ``M^T`` up
    to ``H = 1024`` (16 above), chosen so that sm_90 compiles them without spills up to ``H = 512`` and within shared
    memory up to ``H = 2048``.

    Args:
        output: ``"shifts"`` (``delta``), ``"factor"`` (:func:`fused_local_factor`) or ``"grads"``
            (:func:`fused_local_grads`, with ``input_size`` ``D``). The others as in :func:`fused_shifts`.

    Returns:
        ``(kernel, constexprs, {"num_warps", "num_stages"})``.

    Raises:
        ValueError: an unknown rule, activation or output, an epilogue with ``H > 128``, or ``H > 2048``.
    """
    if mode not in MODES:
        raise ValueError(f"the kernel runs the linearized and difference rules, got {mode!r}")
    if nonlinearity not in ACTS:
        raise ValueError(f"nonlinearity must be one of {', '.join(ACTS)}, got {nonlinearity!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    block_h = max(16, triton.next_power_of_2(hidden))
    consts = dict(ACT=ACTS[nonlinearity], MODE=MODES[mode], HAS_CAP=shift_cap is not None, PREC=precision or "tf32",
                  BLOCK_B=block_b, BLOCK_H=block_h)
    if hidden <= SINGLE_TILE_MAX:
        consts.update(OUT=OUTPUTS[output], PREFETCH=prefetch, BLOCK_D=max(16, triton.next_power_of_2(input_size)))
        return _recursion_single_tile, consts, {"num_warps": num_warps or (8 if output == "grads" else 4),
                                                "num_stages": 3}
    if output != "shifts":
        raise ValueError(f"the fused local-update epilogues need hidden <= {SINGLE_TILE_MAX}, got {hidden}")
    if hidden > STREAMED_MAX:
        raise ValueError(f"the kernel takes hidden <= {STREAMED_MAX}, got {hidden}; use backend='cuda_graph'")
    consts["BLOCK_K"] = block_k or (32 if block_h <= 1024 else 16)
    return _recursion_streamed, consts, {"num_warps": num_warps or (8 if block_h <= 512 else 16), "num_stages": 1}


def _launch(states, direct, m, *, output, x=None, mode, nonlinearity, eps, shift_cap, grad_scale=0.0, block_b=16,
            num_warps=None, precision=None, prefetch=False, block_k=None):
    """Run the kernel; returns ``delta`` (``output="shifts"``), ``(g, norms)`` (``"factor"``) or ``(dU, dW, db,
    norms)`` (``"grads"``, from ``x`` ``[B, T, D]``), all float32."""
    batch, seq_len, hidden = states.shape
    states, direct = states.contiguous(), direct.contiguous()
    input_size = 1 if x is None else x.shape[-1]
    kernel, consts, options = kernel_config(hidden, mode=mode, nonlinearity=nonlinearity, shift_cap=shift_cap,
                                            output=output, input_size=input_size, block_b=block_b,
                                            num_warps=num_warps, precision=precision, prefetch=prefetch,
                                            block_k=block_k)
    programs = triton.cdiv(batch, block_b)
    f32 = dict(device=states.device, dtype=torch.float32)
    mt = m.T.contiguous().float()  # [H, H]: row k holds M[:, k]
    out = torch.empty(batch, seq_len, hidden, **f32) if output != "grads" else mt  # [B, T, H] (unused for grads)
    norms = torch.empty(batch, seq_len, **f32) if output != "shifts" else out  # [B, T]
    if output == "grads":
        x = x.contiguous()
        gw = torch.empty(programs, hidden, hidden, **f32)  # [P, H, H]: per-program partial sums
        gu = torch.empty(programs, hidden, input_size, **f32)  # [P, H, D]
        gb = torch.empty(programs, hidden, **f32)  # [P, H]
    else:
        x, gw, gu, gb = states, out, out, out  # not read
    kernel[(programs,)](
        states, direct, mt, out, norms, x, gw, gu, gb,
        batch, seq_len, hidden, input_size,
        states.stride(0), states.stride(1), direct.stride(0), direct.stride(1), out.stride(0),
        out.stride(1) if out.dim() == 3 else 0, x.stride(0), x.stride(1),
        float(eps), float(shift_cap or 0.0), float(grad_scale),
        **consts, **options,
    )  # fmt: skip
    if output == "shifts":
        return out
    if output == "factor":
        return out, norms
    return gu.sum(dim=0), gw.sum(dim=0), gb.sum(dim=0), norms


def fused_shifts(
    states: torch.Tensor,
    direct: torch.Tensor,
    m: torch.Tensor,
    *,
    mode: str = "linearized",
    nonlinearity: str,
    eps: float,
    shift_cap: float | None = None,
    block_b: int = 16,
    num_warps: int | None = None,
    precision: str | None = None,
    prefetch: bool = False,
    block_k: int | None = None,
) -> torch.Tensor:
    """The shifts ``delta`` ``[B, T, H]`` of the linearized or difference rule by the fused kernel.

    ``linearized``: ``delta_{t-1} = dhat_{t-1} + M (a'(h_t) * delta_t)``; ``difference``: ``delta_{t-1} = dhat_{t-1} +
    M (a(h_t + delta_t) - a(h_t))`` (``= psi_t(v_t) - psi_t(h_t)``, the drive ``U x_t + b`` cancels). The exact rule
    is the difference rule on modified direct shifts (:meth:`seqtp.AnalyticInverse.exact_as_difference`).

    Args:
        states: ``h_1 .. h_T`` ``[B, T, H]`` (CUDA; float32, bfloat16 or float16).
        direct: ``dhat`` ``[B, T, H]``.
        m: ``M = (W^T W + r I)^{-1} W^T`` ``[H, H]`` (used in float32).
        mode: ``linearized`` or ``difference``.
        nonlinearity: ``tanh``, ``relu`` or ``identity``; eps: clamp margin of ``a`` for tanh.
        shift_cap: the per-step cap ratio, or ``None``.
        block_b: batch rows per program (>= 16, a power of two).
        num_warps: warps per program (default: :func:`kernel_config`).
        precision: ``tl.dot``'s ``input_precision``: ``"tf32"`` (default; relative error ~7e-4 on delta, the
            precision cuDNN's default TF32 RNN kernels also run at), ``"tf32x3"`` (~3e-7, slower) or ``"ieee"``
            (float32 FMA, slowest; timings in ``docs/performance.md``).
        prefetch: ``H <= 128`` only: issue the loads of ``h_{t-1}`` and ``dhat_{t-1}`` one step ahead, so that their
            latency is off the recursion's dependency chain. Off by default (no GPU measurement).
        block_k: ``H > 128`` only: rows of ``M^T`` streamed per slab (>= 16, a power of two; default:
            :func:`kernel_config`).

    Returns:
        ``delta`` ``[B, T, H]`` in the dtype of ``states`` (computed in float32).
    """
    out = _launch(states, direct, m, output="shifts", mode=mode, nonlinearity=nonlinearity, eps=eps,
                  shift_cap=shift_cap, block_b=block_b, num_warps=num_warps, precision=precision, prefetch=prefetch,
                  block_k=block_k)
    return out if states.dtype == torch.float32 else out.to(states.dtype)


def fused_local_factor(
    states: torch.Tensor,
    direct: torch.Tensor,
    m: torch.Tensor,
    *,
    mode: str = "linearized",
    nonlinearity: str,
    eps: float,
    shift_cap: float | None = None,
    grad_scale: float,
    block_b: int = 16,
    num_warps: int | None = None,
    precision: str | None = None,
    prefetch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recursion of :func:`fused_shifts` with the local update's first pass fused into its epilogue: instead of
    ``delta`` the kernel writes ``g_t = grad_scale * delta_t * phi'(z_t)`` (``phi'(z_t)`` from ``h_t``: ``1 - h_t^2``
    for tanh) and the row norms ``|delta_t|``; ``delta`` itself is never stored. With ``grad_scale = -1/B``, ``g`` is
    ``dL_loc/dz`` of :func:`seqtp.methods.local_update_grads`. ``H <= 128`` only.

    Args:
        states, direct, m, mode, nonlinearity, eps, shift_cap, block_b, num_warps, precision, prefetch: as in
            :func:`fused_shifts`. grad_scale: the factor of ``g``.

    Returns:
        ``(g [B, T, H] float32, norms [B, T] float32)``.

    Raises:
        ValueError: ``H > 128``.
    """
    return _launch(states, direct, m, output="factor", mode=mode, nonlinearity=nonlinearity, eps=eps,
                   shift_cap=shift_cap, grad_scale=grad_scale, block_b=block_b, num_warps=num_warps,
                   precision=precision, prefetch=prefetch)


def fused_local_grads(
    states: torch.Tensor,
    direct: torch.Tensor,
    m: torch.Tensor,
    x: torch.Tensor,
    *,
    mode: str = "linearized",
    nonlinearity: str,
    eps: float,
    shift_cap: float | None = None,
    grad_scale: float,
    block_b: int = 16,
    num_warps: int | None = None,
    precision: str | None = None,
    prefetch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recursion of :func:`fused_shifts` with the whole local update inside: per step the kernel forms
    ``g_t = grad_scale * delta_t * phi'(z_t)`` and accumulates ``dW += g_t^T h_{t-1}``, ``dU += g_t^T x_t`` and
    ``db += sum_rows g_t`` on chip (off the recursion's dependency chain); each program writes its partial sums and
    they are added here. Nothing of size ``[B, T, H]`` is written. With ``grad_scale = -1/B`` these are the gradients
    of :func:`seqtp.local_update_grads`. The products use ``precision`` like the recursion. ``H <= 128`` only.

    Args:
        states, direct, m, mode, nonlinearity, eps, shift_cap, block_b, num_warps, precision, prefetch: as in
            :func:`fused_shifts`. x: the inputs ``[B, T, D]``. grad_scale: the factor of ``g``.

    Returns:
        ``(dU [H, D], dW [H, H], db [H], norms [B, T])``, float32; ``norms`` are the row norms ``|delta_t|``.

    Raises:
        ValueError: ``H > 128``.
    """
    return _launch(states, direct, m, output="grads", x=x, mode=mode, nonlinearity=nonlinearity, eps=eps,
                   shift_cap=shift_cap, grad_scale=grad_scale, block_b=block_b, num_warps=num_warps,
                   precision=precision, prefetch=prefetch)
