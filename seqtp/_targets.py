"""Target rules of TP through time by regularized inversion (math core: imports only torch).

Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023. Targets are ``v_t = h_t + delta_t``
with ``delta_T = dhat_T``, propagated backwards in time by one of three rules (``psi_t`` is the regularized inverse
of step ``t``, see :mod:`seqtp._inverse`):

- ``linearized``: ``delta_{t-1} = dhat_{t-1} + M (a'(h_t) * delta_t)`` (Jacobian of ``psi_t`` at ``h_t``),
- ``difference``: ``v_{t-1} = h_{t-1} + dhat_{t-1} + psi_t(v_t) - psi_t(h_t)``,
- ``exact``:      ``v_{t-1} = psi_t(v_t) + dhat_{t-1}``.

This is the pure-torch reference recursion: a Python loop over time, each step one batched ``[B, H] x [H, H]``
product.
"""

from __future__ import annotations

import torch

from ._cells import elman_params, inverse_activation_grad
from ._inverse import ElmanInverse

MODES = ("linearized", "difference", "exact")


def cap_shift(delta: torch.Tensor, h: torch.Tensor, shift_cap: float | None) -> torch.Tensor:
    """Rescale each row so that ``|delta| <= shift_cap * |h|`` (no-op when ``shift_cap`` is ``None``).

    Linearized tanh targets are multiplied by ``a'(h) = 1 / (1 - h^2)`` at every step, so shifts can grow
    geometrically backwards in time; this per-step, per-sample cap relative to the state norm bounds them.

    Args:
        delta: shifts ``[B, H]``; h: states ``[B, H]``; shift_cap: the ratio, or ``None``.
    """
    if shift_cap is None:
        return delta
    norm = delta.norm(dim=-1, keepdim=True)  # [B, 1]
    limit = shift_cap * h.norm(dim=-1, keepdim=True)  # [B, 1]
    scale = torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return delta * scale


def propagate_shifts(
    inverse: ElmanInverse,
    x: torch.Tensor,
    states: torch.Tensor,
    direct_shifts: torch.Tensor,
    *,
    mode: str = "linearized",
    shift_cap: float | None = None,
) -> torch.Tensor:
    """The target shifts ``delta = v - h`` ``[B, T, H]`` (see :func:`propagate_targets`; same arguments)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    batch, seq_len, hidden = states.shape
    if direct_shifts.shape != states.shape or x.shape[:2] != states.shape[:2]:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, states {tuple(states.shape)}, "
            f"direct_shifts {tuple(direct_shifts.shape)}; expected [B, T, D], [B, T, H], [B, T, H]"
        )
    deltas = torch.empty_like(states)  # [B, T, H]
    delta = cap_shift(direct_shifts[:, -1], states[:, -1], shift_cap)  # [B, H]
    deltas[:, -1] = delta
    if mode == "linearized":
        a_grad = inverse_activation_grad(states, inverse.params.nonlinearity, eps=inverse.eps)  # [B, T, H]
        m_t = inverse.M.T
        for t in range(seq_len - 1, 0, -1):
            delta = torch.addmm(direct_shifts[:, t - 1], a_grad[:, t] * delta, m_t)  # [B, H]
            delta = cap_shift(delta, states[:, t - 1], shift_cap)
            deltas[:, t - 1] = delta
    elif mode == "difference":
        for t in range(seq_len - 1, 0, -1):
            delta = direct_shifts[:, t - 1] + inverse.difference(delta, states[:, t])  # [B, H]
            delta = cap_shift(delta, states[:, t - 1], shift_cap)
            deltas[:, t - 1] = delta
    else:  # exact
        drive = inverse.drive(x)  # [B, T, H]
        for t in range(seq_len - 1, 0, -1):
            h_prev = states[:, t - 1]  # [B, H]
            v_prev = inverse.invert(states[:, t] + delta, h_prev, drive[:, t]) + direct_shifts[:, t - 1]
            delta = cap_shift(v_prev - h_prev, h_prev, shift_cap)
            deltas[:, t - 1] = delta
    return deltas


def propagate_targets(
    rnn: torch.nn.Module,
    x: torch.Tensor,
    states: torch.Tensor,
    direct_shifts: torch.Tensor,
    *,
    reg: float,
    mode: str = "linearized",
    eps: float = 1e-3,
    shift_cap: float | None = None,
) -> torch.Tensor:
    """Propagate targets backwards through time by regularized inversion of each Elman step.

    With ``v_T = h_T + dhat_T`` and ``delta_t = v_t - h_t``, each step back applies ``mode``:

    - ``"linearized"``: ``delta_{t-1} = dhat_{t-1} + M (a'(h_t) * delta_t)``, ``M = (W^T W + r I)^{-1} W^T``,
    - ``"difference"``: ``v_{t-1} = h_{t-1} + dhat_{t-1} + psi_t(v_t) - psi_t(h_t)``,
    - ``"exact"``: ``v_{t-1} = psi_t(v_t) + dhat_{t-1}``,

    where ``psi_t(v) = argmin_u |a(v) - W u - U x_t - b|^2 + r |u - h_{t-1}|^2`` (Roulet & Harchaoui, TMLR 2023).
    Device and dtype follow the inputs; nothing is differentiated (call it on detached tensors).

    Args:
        rnn: a single-layer, ``batch_first`` ``torch.nn.RNN`` or a :class:`seqtp.RNNModel`.
        x: inputs ``[B, T, D]``.
        states: the forward states ``h_1 .. h_T`` ``[B, T, H]`` (the RNN's output).
        direct_shifts: ``dhat`` ``[B, T, H]``, zero at steps that carry no loss.
        reg: ``r > 0``, the proximal weight of the inverse.
        mode: ``"linearized"`` (default), ``"difference"`` or ``"exact"``.
        eps: the clamp margin of ``atanh`` for tanh cells.
        shift_cap: if given, every ``delta_t`` is rescaled per sample so that ``|delta_t| <= shift_cap * |h_t|``
            before it is propagated further (a safeguard against geometric growth; ``None`` = off).

    Returns:
        The targets ``v`` ``[B, T, H]``, with ``v[:, -1] = states[:, -1] + direct_shifts[:, -1]`` (when uncapped).

    Raises:
        ValueError: on a bad mode, shapes, ``reg`` or ``eps``, or an unsupported RNN.
        seqtp.FactorizationError: if ``W^T W + r I`` cannot be factorized.
    """
    inverse = ElmanInverse(elman_params(rnn, dtype=states.dtype), reg=reg, eps=eps)
    return states + propagate_shifts(inverse, x, states, direct_shifts, mode=mode, shift_cap=shift_cap)
