"""Regularized inverse of the Elman step (math core: imports only torch).

Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023, Sec. 3: the inverse of step ``t``
maps a target ``v`` of ``h_t`` to a target of ``h_{t-1}``::

    psi_t(v) = argmin_u |a(v) - W u - U x_t - b|^2 + r |u - h_{t-1}|^2
             = (W^T W + r I)^{-1} (W^T (a(v) - U x_t - b) + r h_{t-1})
             = M (a(v) - c_t) + N h_{t-1},   M = (W^T W + r I)^{-1} W^T,  N = r (W^T W + r I)^{-1},

with ``c_t = U x_t + b``, so that ``psi_t(h_t) = h_{t-1}`` exactly (up to the clamp of ``a``). One Cholesky
factorization of ``W^T W + r I`` per training iteration gives ``M`` and ``N`` for every step and batch row.
"""

from __future__ import annotations

import torch

from ._cells import ElmanParams, inverse_activation, inverse_activation_grad


class FactorizationError(RuntimeError):
    """The Cholesky factorization of ``W^T W + r I`` failed (non-finite weights or a vanishing ``reg``)."""


class ElmanInverse:
    """The analytic regularized inverse ``psi_t`` of an Elman step, factorized once.

    Args:
        params: the cell's parameters (:func:`seqtp._cells.elman_params`); device and dtype are taken from them.
        reg: ``r > 0``, the weight of the proximal term ``r |u - h_{t-1}|^2``.
        eps: clamp margin of ``a`` for tanh (``atanh(clamp(v, -1 + eps, 1 - eps))``).

    Raises:
        ValueError: if ``reg <= 0`` or ``eps`` is not in ``(0, 1)``.
        FactorizationError: if the Cholesky factorization fails (on the CPU). There is no jitter retry: with
            ``reg > 0`` the matrix is positive definite, so a failure means non-finite weights and the iteration
            must stop. On CUDA, to keep the iteration free of host syncs, ``M`` and ``N`` are filled with NaN
            instead, so the targets and gradients are NaN and the training loop stops the run as diverged.

    Attributes:
        M: ``(W^T W + r I)^{-1} W^T`` ``[H, H]``.
        N: ``r (W^T W + r I)^{-1}`` ``[H, H]`` (solved at the first use).
    """

    def __init__(self, params: ElmanParams, *, reg: float, eps: float = 1e-3):
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.params, self.reg, self.eps = params, float(reg), float(eps)
        w = params.weight_hh  # [H, H]
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        chol, info = torch.linalg.cholesky_ex(torch.addmm(eye, w.T, w, beta=self.reg))  # W^T W + r I
        if w.is_cuda:  # no host sync: a failed factorization poisons the factor (so M and N), the loss check sees NaN
            chol = chol.masked_fill(info != 0, float("nan"))
        elif int(info) != 0:
            raise FactorizationError(
                f"Cholesky factorization of W^T W + reg*I failed (reg={self.reg}, finite weights: "
                f"{bool(torch.isfinite(w).all())})"
            )
        self._chol = chol  # [H, H] lower factor
        self.M = torch.cholesky_solve(w.T, chol)  # [H, H]
        self._n: torch.Tensor | None = None

    @property
    def N(self) -> torch.Tensor:  # noqa: N802 - the paper's name
        """``r (W^T W + r I)^{-1}`` ``[H, H]``, solved at the first use (only :meth:`invert` needs it)."""
        if self._n is None:
            eye = torch.eye(self._chol.shape[0], dtype=self._chol.dtype, device=self._chol.device)
            self._n = torch.cholesky_solve(self.reg * eye, self._chol)
        return self._n

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """``c_t = U x_t + b`` for all steps: ``x`` ``[B, T, D]`` -> ``[B, T, H]``."""
        return x @ self.params.weight_ih.T + self.params.bias

    def invert(self, v: torch.Tensor, h_prev: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """``psi_t(v) = M (a(v) - c_t) + N h_{t-1}``.

        Args:
            v: targets of ``h_t`` ``[..., H]``; h_prev: ``h_{t-1}`` ``[..., H]``; drive: ``c_t`` ``[..., H]``
            (any matching leading dims, e.g. ``[B]`` for one step or ``[B, T]`` for all).

        Returns:
            ``psi_t(v)`` ``[..., H]``.
        """
        a_v = inverse_activation(v, self.params.nonlinearity, eps=self.eps)
        return (a_v - drive) @ self.M.T + h_prev @ self.N.T

    def linearized(self, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The Jacobian of ``psi_t`` at ``h_t`` applied to a shift: ``M (a'(h_t) * delta)`` ``[..., H]``."""
        return (inverse_activation_grad(h, self.params.nonlinearity, eps=self.eps) * delta) @ self.M.T

    def difference(self, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``psi_t(h_t + delta) - psi_t(h_t) = M (a(h_t + delta) - a(h_t))`` ``[..., H]`` (``c_t`` cancels)."""
        nl = self.params.nonlinearity
        return (inverse_activation(h + delta, nl, eps=self.eps) - inverse_activation(h, nl, eps=self.eps)) @ self.M.T
