"""Layer-inverse solvers: the regularized inverse ``psi_t`` of a recurrent step, behind one abstract base.

Math core: imports only torch. Device and dtype follow the inputs.

Target propagation through time (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023)
moves a target ``v_t`` of the state ``s_t`` to a target of ``s_{t-1}`` through an (approximate, regularized)
inverse of the step ``s_t = f(s_{t-1}, x_t)``. Every solver implements the contract of :class:`InverseSolver`; names
map to classes in :data:`SOLVERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ._cells import Cell, inverse_activation, inverse_activation_grad
from ._inverse import ElmanInverse
from .kernels import BACKENDS, SINGLE_TILE_MAX, choose_backend

MODES = ("linearized", "difference", "exact")


def fold_stats(stats: dict, **values) -> None:
    """Fold one call's diagnostics into a solver's running ``stats`` in place, on the device (no host sync): keys
    ending in ``_max`` keep the maximum, ``converged`` the logical and, the others the sum."""
    for key, value in values.items():
        if key not in stats:
            stats[key] = value
        elif key.endswith("_max"):
            stats[key] = torch.maximum(torch.as_tensor(stats[key]), torch.as_tensor(value))
        elif key == "converged":
            stats[key] = torch.as_tensor(stats[key]) & value
        else:
            stats[key] = stats[key] + value


def cap_shift(delta: torch.Tensor, h: torch.Tensor, shift_cap: float | None) -> torch.Tensor:
    """Rescale each row so that ``|delta| <= shift_cap * |h|`` (no-op when ``shift_cap`` is ``None``).

    Linearized tanh targets are multiplied by ``a'(h) = 1 / (1 - h^2)`` at every step, so shifts can grow
    geometrically backwards in time; this per-step, per-sample cap relative to the state norm bounds them.

    Args:
        delta: shifts ``[B, S]``; h: states ``[B, S]``; shift_cap: the ratio, or ``None``.
    """
    if shift_cap is None:
        return delta
    norm = delta.norm(dim=-1, keepdim=True)  # [B, 1]
    limit = shift_cap * h.norm(dim=-1, keepdim=True)  # [B, 1]
    scale = torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return delta * scale


def flush_floor(dtype: torch.dtype) -> float:
    """The magnitude below which :func:`flush_tiny` zeroes a shift: ``sqrt(finfo(c).tiny)``, ``c`` the compute dtype
    (``float64`` for float64, else ``float32``: half types compute in float32, and bfloat16 shares its range):
    ``2^-63 ~ 1.1e-19`` in float32, ``2^-511 ~ 1.5e-154`` in float64.

    Shifts that decay geometrically backwards in time (large ``reg``, linearized rule) otherwise go on into subnormal
    floats, which many x86 cores compute far more slowly. At the square root of the smallest normal number, every
    product of two such values and every square in a norm is still a normal number, so nothing downstream (the next
    step's matrix product, CG's inner products, the local update's ``delta * phi'(z) / B``) goes subnormal either;
    and a shift ``2^-63`` is ``2^-40`` of float32's ulp at 1, far below what moves a target ``s + delta`` or adds
    to a gradient built from shifts of ordinary size (see ``docs/results/subnormals.md``).
    """
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny ** 0.5


def flush_tiny(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry of magnitude at most :func:`flush_floor` set to zero (one ``hardshrink``; NaN and
    inf pass through). Deterministic, thread- and device-independent, capturable in a CUDA graph.

    Args:
        delta: shifts ``[..., S]``.

    Returns:
        A new tensor of the same shape and dtype.
    """
    return torch.nn.functional.hardshrink(delta, flush_floor(delta.dtype))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class InverseSolver(ABC):
    """The regularized inverse of a recurrent step, for propagating targets backwards in time.

    Contract. Once per training iteration, :meth:`bind` gives the solver the cell (its current parameters), the
    inputs ``x`` ``[B, T, D]`` and the forward states ``states`` ``[B, T, S]`` (``s_1 .. s_T``; ``s_0 = 0``). Step
    ``t`` (a 0-based index into ``states``, ``1 <= t < T``) maps a target of ``states[:, t]`` to a target of
    ``states[:, t - 1]``:

    - ``invert(t, v)`` ``[B, S] -> [B, S]``: ``psi_t(v)``, an (approximate) minimizer of a regularized inversion
      problem, e.g. ``argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2``, with ``psi_t(s_t) = s_{t-1}``;
    - ``linearized(t, delta)``: the Jacobian of ``psi_t`` at ``s_t`` applied to ``delta`` ``[B, S]``;
    - ``difference(t, delta)``: ``psi_t(s_t + delta) - psi_t(s_t)``;
    - ``propagate(direct, mode=..., shift_cap=...)``: the shifts ``delta = v - s`` ``[B, T, S]`` of the target
      rule ``mode`` from the direct shifts ``direct`` ``[B, T, S]`` (see :func:`seqtp.propagate_targets`).

    ``report()`` returns diagnostics of the last propagation (e.g. iterations, residuals, contraction rates), as
    Python floats. Subclasses implement :meth:`invert` and may override the others with faster or exact forms.

    Args:
        reg: ``r > 0``, the weight of the proximal term.
    """

    def __init__(self, *, reg: float):
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        self.reg = float(reg)
        self._report: dict[str, float] = {}

    def bind(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> InverseSolver:
        """Prepare for one iteration (factorizations, etc.); returns ``self``."""
        if states.shape[-1] != cell.state_size or x.shape[:2] != states.shape[:2]:
            raise ValueError(
                f"shape mismatch: x {tuple(x.shape)}, states {tuple(states.shape)}; expected [B, T, D] and "
                f"[B, T, {cell.state_size}] for a {cell.kind} cell"
            )
        self.cell, self.x, self.states = cell, x, states
        self._prev: torch.Tensor | None = None
        self._report = {}
        return self

    @property
    def prev(self) -> torch.Tensor:
        """The previous states ``s_0 .. s_{T-1}`` ``[B, T, S]`` (``s_0 = 0``), built at the first use after
        :meth:`bind` (the analytic solver's linearized and difference rules never need them)."""
        if self._prev is None:
            states = self.states
            self._prev = torch.cat([self.cell.initial_state(states).unsqueeze(1), states[:, :-1]], dim=1)
        return self._prev

    @abstractmethod
    def invert(self, t: int, v: torch.Tensor) -> torch.Tensor:
        """``psi_t(v)`` ``[B, S]``."""

    def linearized(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``J_psi_t(s_t) delta`` by forward-mode autodiff of :meth:`invert` (override with a cheaper form)."""
        _, jd = torch.func.jvp(lambda v: self.invert(t, v), (self.states[:, t],), (delta,))
        return jd

    def difference(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``psi_t(s_t + delta) - psi_t(s_t)``."""
        h = self.states[:, t]
        return self.invert(t, h + delta) - self.invert(t, h)

    def report(self) -> dict[str, float]:
        return dict(self._report)

    def _check_propagate(self, direct: torch.Tensor, mode: str) -> None:
        check_mode(mode)
        if direct.shape != self.states.shape:
            raise ValueError(f"direct shifts {tuple(direct.shape)} must have the states' shape "
                             f"{tuple(self.states.shape)}")

    def propagate(
        self, direct: torch.Tensor, *, mode: str = "linearized", shift_cap: float | None = None
    ) -> torch.Tensor:
        """Shifts ``delta`` ``[B, T, S]`` of rule ``mode``, from ``delta_T = dhat_T`` backwards (call :meth:`bind`
        first). Each ``delta_t`` is capped by :func:`cap_shift` before it is propagated further."""
        self._check_propagate(direct, mode)
        states = self.states

        def step(t: int, delta: torch.Tensor) -> torch.Tensor:  # delta_{t-1} before the cap [B, S]
            if mode == "linearized":
                back = self.linearized(t, delta)
            elif mode == "difference":
                back = self.difference(t, delta)
            else:  # exact: v_{t-1} = psi_t(v_t) + dhat_{t-1}
                back = self.invert(t, states[:, t] + delta) - states[:, t - 1]
            return direct[:, t - 1] + back

        return backward_recursion(states, direct, step, shift_cap=shift_cap)


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
            The two fast paths run the exact rule as the difference rule (:meth:`exact_as_difference`).
        fuse_local_update: where the kernel runs with ``H <= 128``, let :meth:`propagate_local_update` accumulate
            the local update's gradients inside the kernel instead of writing the shifts (used by
            :class:`seqtp.TargetProp` with ``update="local"``). Off by default (no GPU measurement).

    Raises:
        TypeError (at :meth:`bind`): the cell is not an Elman cell.
        seqtp.FactorizationError (at :meth:`bind`): ``W^T W + r I`` cannot be factorized.
    """

    def __init__(self, *, reg: float, eps: float = 1e-3, backend: str = "auto", fuse_local_update: bool = False):
        super().__init__(reg=reg)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.eps, self.backend, self.fuse_local_update = eps, backend, bool(fuse_local_update)

    def bind(self, cell, x, states):
        if cell.output_nonlinearity is None:
            raise TypeError(f"the analytic inverse needs an Elman cell, got a {cell.kind} cell")
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
        self._check_propagate(direct, mode)
        backend = choose_backend(self.backend, self.states)
        if not (self.fuse_local_update and backend == "triton" and self.states.shape[-1] <= SINGLE_TILE_MAX):
            return None
        from .kernels._triton import fused_local_grads

        if mode == "exact":
            direct, mode = self.exact_as_difference(direct), "difference"
        return fused_local_grads(self.states, direct, self.inverse.M, self.x, mode=mode,
                                 nonlinearity=self.inverse.params.nonlinearity, eps=self.eps, shift_cap=shift_cap,
                                 grad_scale=-1.0 / self.states.shape[0])

    def propagate(self, direct, *, mode="linearized", shift_cap=None):
        """As :meth:`InverseSolver.propagate`, by the backend: ``torch`` runs :func:`torch_shifts` (the generic loop
        over :meth:`invert` stays the reference in the tests), ``cuda_graph`` replays it, ``triton`` runs the exact
        rule as the difference rule on corrected direct shifts (:meth:`exact_as_difference`)."""
        self._check_propagate(direct, mode)
        backend = choose_backend(self.backend, self.states)
        opts = dict(nonlinearity=self.inverse.params.nonlinearity, eps=self.eps, shift_cap=shift_cap)
        if backend == "triton":
            from .kernels._triton import fused_shifts

            if mode == "exact":
                direct, mode = self.exact_as_difference(direct), "difference"
            return fused_shifts(self.states, direct, self.inverse.M, mode=mode, **opts)
        tensors = (self.states, direct, self.inverse.M)
        if mode == "exact":  # + the pre-activations z_t [B, T-1, H] of the steps back
            tensors += (self.cell.preactivation(self.states[:, :-1], self.x[:, 1:]),)
        if backend == "cuda_graph":
            from .kernels._graphs import graphed

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


def backward_recursion(
    states: torch.Tensor,
    direct: torch.Tensor,
    step: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    shift_cap: float | None = None,
) -> torch.Tensor:
    """The backward sweep shared by every target rule: ``delta_T = flush(cap(dhat_T))``, then for ``t = T-1 .. 1``
    (0-based indices into ``states``) ``delta_{t-1} = flush(cap(step(t, delta_t)))``, each capped by
    :func:`cap_shift` against ``s_{t-1}`` and flushed by :func:`flush_tiny` (entries below ``sqrt`` of the smallest
    normal float are zeroed, so decaying shifts never reach subnormal floats) before it is propagated further.

    Args:
        states: ``[B, T, S]``; direct: ``dhat`` ``[B, T, S]``; step: ``(t, delta_t [B, S]) -> delta_{t-1}`` before the
            cap ``[B, S]``; shift_cap: the cap ratio or ``None``.

    Returns:
        ``delta`` ``[B, T, S]``.
    """
    deltas = torch.empty_like(states)  # [B, T, S]
    delta = flush_tiny(cap_shift(direct[:, -1], states[:, -1], shift_cap))  # [B, S]
    deltas[:, -1] = delta
    for t in range(states.shape[1] - 1, 0, -1):
        delta = flush_tiny(cap_shift(step(t, delta), states[:, t - 1], shift_cap))  # [B, S]
        deltas[:, t - 1] = delta
    return deltas
