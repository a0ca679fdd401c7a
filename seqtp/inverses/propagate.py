"""Target propagation through time: the solver registry and :func:`propagate_targets` (math core: imports only torch).

Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023. Targets are ``v_t = s_t + delta_t``
with ``delta_T = dhat_T``, propagated backwards in time by one of three rules (``psi_t`` is the regularized inverse
of step ``t``, computed by an :class:`~seqtp.inverses.InverseSolver`):

- ``linearized``: ``delta_{t-1} = dhat_{t-1} + J_psi_t(s_t) delta_t`` (Elman: ``M (a'(h_t) * delta_t)``),
- ``difference``: ``v_{t-1} = s_{t-1} + dhat_{t-1} + psi_t(v_t) - psi_t(s_t)``,
- ``exact``:      ``v_{t-1} = psi_t(v_t) + dhat_{t-1}``.

The reference recursion is a Python loop over time, each step one batched computation over the batch rows.
"""

from __future__ import annotations

import torch

from .._cells import Cell, make_cell
from .base import InverseSolver, check_mode
from .registry import make_solver

__all__ = ["complete_states", "propagate_targets"]

def complete_states(
    cell: Cell, x: torch.Tensor, states: torch.Tensor, direct_shifts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full states ``[B, T, S]`` and direct shifts ``[B, T, S]`` from the module's outputs ``[B, T, H]`` (LSTM:
    ``s = [h, c]``, the cell state recomputed, its direct shifts zero); full-size inputs pass through."""
    if states.shape[-1] == cell.state_size:
        return states, direct_shifts
    if states.shape[-1] != cell.hidden_size or direct_shifts.shape != states.shape:
        raise ValueError(
            f"states {tuple(states.shape)} and direct_shifts {tuple(direct_shifts.shape)} must be [B, T, "
            f"{cell.hidden_size}] or [B, T, {cell.state_size}] for this {cell.kind} cell"
        )
    full = cell.full_states(x, states)  # [B, T, S]
    direct = torch.zeros_like(full)
    direct[..., : cell.hidden_size] = direct_shifts
    return full, direct


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
    solver: str | InverseSolver = "auto",
) -> torch.Tensor:
    """Propagate targets backwards through time by regularized inversion of each recurrent step.

    With ``v_T = s_T + dhat_T`` and ``delta_t = v_t - s_t``, each step back applies ``mode``:

    - ``"linearized"``: ``delta_{t-1} = dhat_{t-1} + J_psi_t(s_t) delta_t`` (Elman, analytic:
      ``M (a'(h_t) * delta_t)``, ``M = (W^T W + r I)^{-1} W^T``),
    - ``"difference"``: ``v_{t-1} = s_{t-1} + dhat_{t-1} + psi_t(v_t) - psi_t(s_t)``,
    - ``"exact"``: ``v_{t-1} = psi_t(v_t) + dhat_{t-1}``,

    where ``psi_t(v) = argmin_u |a(v) - W u - U x_t - b|^2 + r |u - h_{t-1}|^2`` for the analytic Elman inverse
    (Roulet & Harchaoui, TMLR 2023), or the solver's own regularized inverse. Device and dtype follow the inputs;
    nothing is differentiated (call it on detached tensors).

    Args:
        rnn: a single-layer, ``batch_first`` ``torch.nn.RNN``/``GRU``/``LSTM`` or a :class:`seqtp.RNNModel`.
        x: inputs ``[B, T, D]``.
        states: the forward states ``[B, T, H]`` (the module's output) or full states ``[B, T, S]`` (LSTM: ``S = 2H``,
            ``[h, c]``).
        direct_shifts: ``dhat`` with the shape of ``states``, zero at steps that carry no loss.
        reg: ``r > 0``, the proximal weight of the inverse.
        mode: ``"linearized"`` (default), ``"difference"`` or ``"exact"``.
        eps: the clamp margin of ``atanh`` for tanh cells (analytic solver).
        shift_cap: if given, every ``delta_t`` is rescaled per sample so that ``|delta_t| <= shift_cap * |s_t|``
            before it is propagated further (a safeguard against geometric growth; ``None`` = off).
        solver: a name of :data:`SOLVERS` or ``"auto"`` (analytic for Elman, else dense or Gauss-Newton by the
            state size, :func:`auto_solver_name`), or an
            :class:`~seqtp.inverses.InverseSolver` instance (then ``reg`` and ``eps`` are its own).

    Returns:
        The targets ``v`` ``[B, T, S]``, with ``v[:, -1] = s[:, -1] + dhat[:, -1]`` (when uncapped).

    Raises:
        ValueError: on a bad mode, shapes, ``reg`` or ``eps``, an unknown solver, or an unsupported RNN.
        seqtp.FactorizationError: if the analytic inverse cannot factorize ``W^T W + r I``.
    """
    check_mode(mode)
    cell = make_cell(rnn, dtype=states.dtype)
    full, direct = complete_states(cell, x, states, direct_shifts)
    if not isinstance(solver, InverseSolver):
        solver = make_solver(solver, cell=cell, reg=reg, eps=eps)
    solver.bind(cell, x, full)
    return full + solver.propagate(direct, mode=mode, shift_cap=shift_cap)
