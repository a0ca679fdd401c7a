"""The exact inverse of an Elman step (the ``reg -> 0`` limit of the regularized one), math core: imports only torch.

``h_t = phi(z_t)``, ``z_t = W h_{t-1} + U x_t + b``, is inverted exactly where ``W`` is invertible:
``psi_t(v) = W^{-1} (a(v) - U x_t - b)`` with ``a = phi^{-1}``, so ``psi_t(h_t) = h_{t-1}`` (where the ``atanh`` clamp
does not bind). It is the inverse of GAIT-prop (Ahmad, van Gerven & Ambrogioni, NeurIPS 2020) and of Gauss-Newton
targets for a square step (Bengio 2020; Meulemans et al., NeurIPS 2020); with ``a'(h_t) = 1 / phi'(z_t)`` the
linearized rule applies ``J_t^{-1}``, ``J_t = diag(phi'(z_t)) W``.
"""

from __future__ import annotations

import torch

from .._cells import ElmanParams, inverse_activation, inverse_activation_grad
from .analytic import FactorizationError
from .base import InverseSolver

__all__ = ["ExactInverse", "inverse_increment", "inverse_weight"]


def inverse_increment(h: torch.Tensor, d: torch.Tensor, nonlinearity: str, *, eps: float = 1e-3) -> torch.Tensor:
    """``a(h + d) - a(h)`` with ``a = phi^{-1}`` (clamped as :func:`seqtp._cells.inverse_activation`), computed
    without the cancellation of the two terms, so that its relative error stays at rounding level for tiny ``d``.

    tanh: with ``hc = clamp(h)`` and ``dc = clamp(h + d) - hc = clamp((h - hc) + d, lo - hc, hi - hc)``
    (``lo, hi = -1 + eps, 1 - eps``), ``atanh(hc + dc) - atanh(hc) = atanh(dc / ((1 - hc)(1 + hc) - hc dc))``
    (the subtraction formula of ``atanh``). relu (``a(v) = max(v, 0)``, ``h >= 0``): ``max(d, -h)``. identity:
    ``d``.

    Args:
        h: forward states ``phi(z)`` ``[..., H]``; d: increments ``[..., H]``; nonlinearity: ``tanh``, ``relu`` or
            ``identity``; eps: clamp margin of ``atanh``.

    Returns:
        ``a(h + d) - a(h)`` ``[..., H]``.
    """
    if nonlinearity == "tanh":
        lo, hi = -1.0 + eps, 1.0 - eps
        hc = h.clamp(lo, hi)  # [..., H]
        dc = ((h - hc) + d).clamp(lo - hc, hi - hc)  # [..., H]: clamp(h + d) - hc
        return torch.atanh(dc / ((1 - hc) * (1 + hc) - hc * dc))
    if nonlinearity == "relu":
        return torch.maximum(d, -h)
    return d


def inverse_weight(weight_hh: torch.Tensor) -> torch.Tensor:
    """``W^{-1}`` ``[H, H]`` by one LU factorization (``torch.linalg.lu_factor_ex``) and one solve against ``I``.

    Raises:
        seqtp.FactorizationError: ``W`` is singular (on the CPU). On CUDA, to keep the iteration free of host
            syncs, the inverse is filled with NaN instead, so the update is NaN and the training loop stops the run
            as diverged.
    """
    lu, pivots, info = torch.linalg.lu_factor_ex(weight_hh)
    if weight_hh.is_cuda:
        lu = lu.masked_fill(info != 0, float("nan"))
    elif int(info) != 0:
        raise FactorizationError(f"weight_hh is singular: the exact inverse needs an invertible W (finite weights: "
                                 f"{bool(torch.isfinite(weight_hh).all())})")
    eye = torch.eye(weight_hh.shape[0], dtype=weight_hh.dtype, device=weight_hh.device)
    return torch.linalg.lu_solve(lu, pivots, eye)  # [H, H]


class ExactInverse(InverseSolver):
    """The exact inverse of an Elman step: ``psi_t(v) = W^{-1} (a(v) - U x_t - b)`` (no regularization).

    ``W^{-1}`` comes from one LU factorization per :meth:`bind` (:func:`inverse_weight`). The linearized rule is
    ``W^{-1} (a'(h_t) * delta)``; the difference rule ``W^{-1} (a(h_t + delta) - a(h_t))`` is computed without
    cancellation (:func:`inverse_increment`), so it keeps its relative precision for the tiny increments of
    GAIT-prop's rule (:class:`~seqtp.inverses.base.GaitRule`). Through ``T`` steps ``W^{-1}`` amplifies a shift by up
    to ``sigma_min(W)^{-T}``: the exact inverse needs a ``W`` near the orthogonal matrices (GAIT-prop's penalty).

    Args:
        reg: unused (accepted so that the solver builds from a TP config like the others; the exact inverse is the
            ``reg -> 0`` limit of :class:`~seqtp.inverses.AnalyticInverse`).
        eps: clamp margin of ``atanh`` for tanh cells, in ``(0, 1)``.

    Raises:
        ValueError: ``eps`` outside ``(0, 1)``. TypeError (at :meth:`bind`): not an Elman cell.
        seqtp.FactorizationError (at :meth:`bind`): ``W`` is singular (as :func:`inverse_weight`).
    """

    cells = ("elman",)
    config_options = ()

    def __init__(self, *, reg: float = 0.0, eps: float = 1e-3):
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.reg, self.eps = 0.0, float(eps)
        self._report: dict[str, float] = {}

    def bind(self, cell, x, states):
        super().bind(cell, x, states)
        self.params: ElmanParams = cell.elman_params()
        self.w_inv_t = inverse_weight(self.params.weight_hh).T  # [H, H]: W^{-T}, so that rows map as u @ W^{-T}
        self._drive: torch.Tensor | None = None
        return self

    @property
    def drive(self) -> torch.Tensor:
        """``U x_t + b`` ``[B, T, H]``, built at the first use after :meth:`bind` (only :meth:`invert` needs it)."""
        if self._drive is None:
            self._drive = self.params.drive(self.x)  # [B, T, H]
        return self._drive

    def invert(self, t, v):
        z = inverse_activation(v, self.params.nonlinearity, eps=self.eps)  # [B, H]: a(v)
        return (z - self.drive[:, t]) @ self.w_inv_t  # [B, H]

    def linearized(self, t, delta):
        grad = inverse_activation_grad(self.states[:, t], self.params.nonlinearity, eps=self.eps)  # [B, H]: a'(h_t)
        return (grad * delta) @ self.w_inv_t  # [B, H]

    def difference(self, t, delta):
        inc = inverse_increment(self.states[:, t], delta, self.params.nonlinearity, eps=self.eps)  # [B, H]
        return inc @ self.w_inv_t  # [B, H]
