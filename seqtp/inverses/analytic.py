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

from .._cells import ElmanParams, inverse_activation, inverse_activation_grad
from ..kernels import BACKENDS, SINGLE_TILE_MAX, choose_backend
from .base import InverseSolver, backward_recursion


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
            finite = bool(torch.isfinite(w).all())
            size = f", |W|_max = {float(w.abs().max()):.3g}" if finite else ""
            hint = ("; W^T W swamps reg*I in this precision: the weights have grown (lower the learning rate, or clip)"
                    if finite and float(w.abs().max()) ** 2 * torch.finfo(w.dtype).eps > self.reg else "")
            raise FactorizationError(f"Cholesky factorization of W^T W + reg*I failed (reg={self.reg}, finite weights: "
                                     f"{finite}{size}){hint}")
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
        return self.params.drive(x)

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


class AnalyticInverse(InverseSolver):
    """The closed-form regularized inverse of an Elman step (Roulet & Harchaoui, TMLR 2023, Sec. 3).

    ``psi_t(v) = argmin_u |a(v) - W u - U x_t - b|^2 + r |u - h_{t-1}|^2 = M (a(v) - U x_t - b) + N h_{t-1}``,
    ``M = (W^T W + r I)^{-1} W^T``, ``N = r (W^T W + r I)^{-1}``: one Cholesky factorization per iteration
    (:class:`seqtp.ElmanInverse`); the linearized rule is ``M (a'(h_t) * delta)``, the difference rule
    ``M (a(h_t + delta) - a(h_t))``. The regularization acts in the pre-activation space.

    Args:
        reg: ``r > 0``. eps: clamp margin of ``atanh`` for tanh cells.
        backend: how :meth:`propagate` runs the recursion: ``"torch"`` (the reference loops), ``"triton"`` (the
            fused kernel of :mod:`seqtp.kernels`, CUDA), ``"cuda_graph"`` (the torch loop captured once per shape and
            replayed, CUDA), or ``"auto"`` (default: triton where it applies, else a CUDA graph on CUDA, else torch).
            The Triton path runs the exact rule as the difference rule (:meth:`exact_as_difference`); the CUDA
            graph replays :func:`torch_shifts` with the rule as it is.
        fuse_local_update: where the kernel runs with ``H <= 128``, let :meth:`propagate_local_update` accumulate
            the local update's gradients inside the kernel instead of writing the shifts (used by
            :class:`seqtp.TargetProp` with ``update="local"``). Off by default (no GPU measurement).

    Raises:
        TypeError (at :meth:`bind`): the cell is not an Elman cell.
        seqtp.FactorizationError (at :meth:`bind`): ``W^T W + r I`` cannot be factorized.
    """

    cells = ("elman",)
    fused_rules = ("linearized", "difference", "exact")

    def __init__(self, *, reg: float, eps: float = 1e-3, backend: str = "auto", fuse_local_update: bool = False):
        super().__init__(reg=reg)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.eps, self.backend, self.fuse_local_update = eps, backend, bool(fuse_local_update)

    def bind(self, cell, x, states):
        super().bind(cell, x, states)
        self.inverse = ElmanInverse(cell.elman_params(), reg=self.reg, eps=self.eps)
        self._drive: torch.Tensor | None = None
        return self

    @property
    def drive(self) -> torch.Tensor:
        """``c_t = U x_t + b`` ``[B, T, H]``, built at the first use after :meth:`bind` (only ``invert`` needs it)."""
        if self._drive is None:
            self._drive = self.inverse.drive(self.x)
        return self._drive

    def invert(self, t, v):
        return self.inverse.invert(v, self.prev[:, t], self.drive[:, t])

    def linearized(self, t, delta):
        return self.inverse.linearized(delta, self.states[:, t])

    def difference(self, t, delta):
        return self.inverse.difference(delta, self.states[:, t])

    def exact_as_difference(self, direct: torch.Tensor) -> torch.Tensor:
        """Direct shifts that turn the exact rule into the difference rule (call :meth:`bind` first).

        ``delta_{t-1} = v_{t-1} - h_{t-1} = dhat_{t-1} + [psi_t(h_t + delta_t) - psi_t(h_t)] + e_t`` with the
        reconstruction error ``e_t = psi_t(h_t) - h_{t-1}``, which does not depend on the targets. Since
        ``I - N = M W``, ``e_t = M (a(h_t) - z_t)`` with ``z_t = W h_{t-1} + U x_t + b`` the forward pre-activation:
        the two rules differ only where ``a(h_t) != z_t``, i.e. where the clamp of ``atanh`` binds (and by rounding).
        ``e`` is computed for all steps at once (two ``[B*T, H] x [H, H]`` products) and added to ``dhat_{t-1}``; the
        sequential part is then the difference rule's recursion.

        Args:
            direct: ``dhat`` ``[B, T, H]``.

        Returns:
            ``dhat + e`` ``[B, T, H]``, with ``e_t`` added at index ``t - 1`` (the last step unchanged).
        """
        states = self.states
        preact = self.cell.preactivation(states[:, :-1], self.x[:, 1:])  # [B, T-1, H]: z_t, t = 2 .. T
        resid = inverse_activation(states[:, 1:], self.inverse.params.nonlinearity, eps=self.eps) - preact
        out = direct.clone()  # resid: a(h_t) - z_t (a may return its input: no in-place op on it)
        out[:, :-1] += resid @ self.inverse.M.T  # [B, T-1, H]: e_t at index t - 1
        return out

    def propagate_local_update(
        self, direct: torch.Tensor, *, mode: str = "linearized", shift_cap: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shifts of :meth:`propagate` consumed inside the fused kernel (``fuse_local_update=True``), which
        accumulates the local update itself: returns ``(dU [H, D], dW [H, H], db [H], norms [B, T])``, the gradients
        of :func:`seqtp.local_update_grads` and the row norms ``|delta_t|``, or ``None`` where the fused kernel does
        not apply (option off, backend not ``triton``, ``H > 128``); then call :meth:`propagate`."""
        if not self.fuse_local_update or mode not in self.fused_rules:
            return None
        self._check_propagate(direct, mode)
        backend = choose_backend(self.backend, self.states)
        if not (self.fuse_local_update and backend == "triton" and self.states.shape[-1] <= SINGLE_TILE_MAX):
            return None
        from ..kernels._triton import fused_local_grads

        if mode == "exact":
            direct, mode = self.exact_as_difference(direct), "difference"
        return fused_local_grads(self.states, direct, self.inverse.M, self.x, mode=mode,
                                 nonlinearity=self.inverse.params.nonlinearity, eps=self.eps, shift_cap=shift_cap,
                                 grad_scale=-1.0 / self.states.shape[0])

    def propagate(self, direct, *, mode="linearized", shift_cap=None):
        """As :meth:`InverseSolver.propagate`, by the backend: ``torch`` runs :func:`torch_shifts` (the generic loop
        over :meth:`invert` stays the reference in the tests), ``cuda_graph`` replays it, ``triton`` runs the exact
        rule as the difference rule on corrected direct shifts (:meth:`exact_as_difference`); a rule outside
        :attr:`fused_rules` runs the generic recursion of :meth:`InverseSolver.propagate`."""
        if mode not in self.fused_rules:  # another rule (GAIT's, or a TargetRule instance): the generic recursion
            return super().propagate(direct, mode=mode, shift_cap=shift_cap)
        self._check_propagate(direct, mode)
        backend = choose_backend(self.backend, self.states)
        opts = dict(nonlinearity=self.inverse.params.nonlinearity, eps=self.eps, shift_cap=shift_cap)
        if backend == "triton":
            from ..kernels._triton import fused_shifts

            if mode == "exact":
                direct, mode = self.exact_as_difference(direct), "difference"
            return fused_shifts(self.states, direct, self.inverse.M, mode=mode, **opts)
        tensors = (self.states, direct, self.inverse.M)
        if mode == "exact":  # + the pre-activations z_t [B, T-1, H] of the steps back
            tensors += (self.cell.preactivation(self.states[:, :-1], self.x[:, 1:]),)
        if backend == "cuda_graph":
            from ..kernels._graphs import graphed

            return graphed(torch_shifts, *tensors, mode=mode, **opts)
        return torch_shifts(*tensors, mode=mode, **opts)


def torch_shifts(
    states: torch.Tensor,
    direct: torch.Tensor,
    m: torch.Tensor,
    preact: torch.Tensor | None = None,
    *,
    mode: str = "linearized",
    nonlinearity: str,
    eps: float,
    shift_cap: float | None = None,
) -> torch.Tensor:
    """The pure-torch recursions of the analytic inverse: ``delta_T = dhat_T`` and ``delta_{t-1} = dhat_{t-1} + M u_t``
    with

    - ``linearized``: ``u_t = a'(h_t) * delta_t``,
    - ``difference``: ``u_t = a(h_t + delta_t) - a(h_t)`` (``M u_t = psi_t(v_t) - psi_t(h_t)``: the drive cancels),
    - ``exact``: ``u_t = a(h_t + delta_t) - z_t``, ``z_t = W h_{t-1} + U x_t + b`` the forward pre-activation
      (``M u_t = psi_t(v_t) - h_{t-1}``, since ``I - N = M W``),

    with ``a'(h)``, ``a(h)`` or ``z`` for all steps at once, then one ``addmm`` per step. Capturable in a CUDA graph;
    the fused kernel and the graph are tested against it, and it against the generic loop of
    :meth:`InverseSolver.propagate`.

    Args:
        states: ``h_1 .. h_T`` ``[B, T, H]``; direct: ``dhat`` ``[B, T, H]``; m: ``M`` ``[H, H]``.
        preact: the pre-activations ``z_2 .. z_T`` ``[B, T-1, H]`` of the steps back (exact rule only).
        mode: the rule. nonlinearity, eps: of ``a``; shift_cap: per-step cap ratio or ``None``.

    Returns:
        ``delta`` ``[B, T, H]``.

    Raises:
        ValueError: an unknown ``mode``, or ``preact`` missing for the exact rule.
    """
    # per_step[:, t - 1] belongs to step t (0-based index into states, 1 <= t < T): the first state has no step back
    if mode == "linearized":
        per_step = inverse_activation_grad(states[:, 1:], nonlinearity, eps=eps)  # [B, T-1, H]: a'(h_t)
    elif mode == "difference":
        per_step = inverse_activation(states[:, 1:], nonlinearity, eps=eps)  # [B, T-1, H]: a(h_t)
    elif mode == "exact" and preact is not None:
        per_step = preact  # [B, T-1, H]: z_t
    else:
        raise ValueError(f"torch_shifts runs the linearized, difference and (with preact) exact rules, got {mode!r}")
    m_t = m.T

    def step(t: int, delta: torch.Tensor) -> torch.Tensor:  # dhat_{t-1} + M u_t [B, H]
        if mode == "linearized":
            u = per_step[:, t - 1] * delta  # [B, H]
        else:
            u = inverse_activation(states[:, t] + delta, nonlinearity, eps=eps).sub_(per_step[:, t - 1])  # [B, H]
        return torch.addmm(direct[:, t - 1], u, m_t)

    return backward_recursion(states, direct, step, shift_cap=shift_cap)
