"""Iterated approximate inverses: refine any approximate inverse of the step into an exact one.

Math core: imports only torch. Device and dtype follow the states.

Bengio, "Deriving Differential Target Propagation from Iterating Approximate Inverses" (arXiv:2007.15139, 2020):
given an approximate inverse ``g`` of the step ``f(., x_t)`` (here any :class:`~seqtp.inverses.InverseSolver`'s
``psi_t``), the fixed-point iteration::

    u_0 = s_{t-1},    u_{k+1} = u_k + g(v) - g(f(u_k, x_t))

has the fixed points ``g(f(u)) = g(v)``, i.e. ``f(u) = v`` when ``g`` is injective, and converges to one
geometrically, at rate ``Lip(g o f - I) < 1`` (Banach), when ``g o f`` is close to the identity. One step is the
difference-target rule of DTP: ``u_1 = s_{t-1} + g(v) - g(s_t)`` since ``f(s_{t-1}, x_t) = s_t``.
"""

from __future__ import annotations

import math

import torch

from .analytic import AnalyticInverse
from .base import InverseSolver


def _relative(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class IteratedInverse(InverseSolver):
    """``psi_t(v)`` by iterating an approximate inverse ``g`` (Bengio 2020, arXiv:2007.15139).

    ``u_0 = s_{t-1}``, ``u_{k+1} = u_k + g(v) - g(f(u_k, x_t))`` with ``g = base.invert(t, .)``, for ``steps``
    iterations or until ``max_b |u_{k+1} - u_k| / |u_k| <= tol`` (the worst batch row; checking it costs one host
    sync per iteration, so only when ``tol > 0``). The first iteration uses ``f(s_{t-1}, x_t) = s_t`` and the base's
    difference rule, so ``steps=1`` is exactly the difference target ``s_{t-1} + base.difference(t, v - s_t)`` and
    ``psi_t(s_t) = s_{t-1}`` (up to rounding) for any base, learned ones included.

    Convergence: the error ``e_k = u_k - u*`` obeys ``e_{k+1} = (I - G A) e_k + o(|e_k|)`` with ``A = J_f``,
    ``G = J_g``, so it shrinks geometrically when ``|I - G A| < 1``. For the analytic Elman inverse (with an
    unsaturated tanh or the identity), ``G A = M W = (W^T W + r I)^{-1} W^T W``, so ``I - G A = r (W^T W + r I)^{-1}``
    and the rate is ``r / (sigma_min(W)^2 + r)``: fast for a small ``reg``, slow (-> 1) for a large one.

    Rules: ``linearized`` iterates the linearization at the fixed point ``u = s_{t-1}``,
    ``d_{k+1} = d_k + J_g (delta - J_f d_k)``, ``d_1 = J_g delta`` (one base ``linearized`` and one forward-mode
    ``jvp`` of ``cell.step`` per iteration); ``difference`` is ``psi_t(s_t + delta) - s_{t-1}``, the same as ``exact``
    here since ``psi_t(s_t) = s_{t-1}``.

    The abilities are the base's: a ``trainable`` base (:class:`~seqtp.inverses.LearnedInverse`) is trained through
    this solver's :meth:`fit`, and :meth:`state_dict` / :meth:`load_state_dict` delegate to the base.

    Args:
        reg: ``r > 0`` of the default base (:class:`~seqtp.inverses.AnalyticInverse`); unused with ``base``.
        base: the approximate inverse ``g`` (any ``InverseSolver``; default: ``AnalyticInverse(reg=reg, eps=eps)``,
            Elman cells only). :meth:`bind` binds it too.
        steps: the most iterations ``K >= 1``.
        tol: stop early when the relative step of every batch row is ``<= tol`` (0: always ``steps``).
        guard: freeze a row (keep its ``u_k``) from the first iteration whose step is longer than the previous one,
            i.e. where the iteration stops contracting (e.g. an untrained learned base, whose ``g o f`` is far from
            the identity). Off by default: it makes ``psi_t`` non-smooth.
        eps: clamp margin of ``atanh`` of the default base.

    Raises:
        ValueError: ``steps < 1``, ``tol < 0`` or ``reg <= 0``. TypeError: ``base`` is not an ``InverseSolver``.
        TypeError (at :meth:`bind`): the default base with a non-Elman cell (pass ``base=``).

    Report (over all calls since the last :meth:`bind`, as floats):
        ``iterations``: mean iterations per call. ``contraction_rate``: the observed geometric rate, the median
        over iterations ``k >= 1`` of ``max_b |u_{k+1} - u_k| / |u_k - u_{k-1}|`` (the worst batch row; rows whose
        previous step is at rounding level, ``<= 1e3 * eps_dtype * |u_k|``, are left out; ``nan`` when no ratio is
        measurable, e.g. ``steps=1``). Above 1: the iteration diverges. ``final_step_norm``: the largest relative
        last step ``max |u_K - u_{K-1}| / |u_{K-1}|`` over rows and calls (what ``tol`` is compared with).
        ``calls``: the number of ``invert``/``linearized`` calls. With ``guard``: ``guarded``, the fraction of
        (call, row) pairs frozen. The base's report, keys prefixed ``base_``.
    """

    config_options = ("steps", "tol")

    def __init__(self, *, reg: float = 1.0, base: InverseSolver | None = None, steps: int = 5, tol: float = 0.0,
                 guard: bool = False, eps: float = 1e-3):
        super().__init__(reg=reg)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if base is not None and not isinstance(base, InverseSolver):
            raise TypeError(f"base must be an InverseSolver, got {type(base).__name__}")
        self.default_base = base is None
        self.base = AnalyticInverse(reg=reg, eps=eps) if base is None else base
        self.cells = self.base.cells  # [the base's cell kinds]
        self.steps, self.tol, self.guard, self.eps = int(steps), float(tol), bool(guard), eps
        self._records: list[torch.Tensor] = []  # [2, K, B] per call: step norms, iterate norms
        self._frozen: list[torch.Tensor] = []  # [B] per call (guard): 1 where the row was frozen

    def bind(self, cell, x, states):
        if self.default_base and cell.output_nonlinearity is None:
            raise TypeError(f"the default base (analytic inverse) needs an Elman cell, got a {cell.kind} cell: pass "
                            "base= (e.g. a LearnedInverse or a Gauss-Newton inverse)")
        super().bind(cell, x, states)
        self.base.bind(cell, x, states)
        self._records, self._frozen = [], []
        return self

    def _step_jvp(self, t: int, d: torch.Tensor) -> torch.Tensor:
        """``J_f(s_{t-1}) d`` ``[B, S]`` by forward-mode autodiff of ``cell.step``."""
        x_t = self.x[:, t]  # [B, D]
        _, out = torch.func.jvp(lambda u: self.cell.step(u, x_t), (self.prev[:, t],), (d,))
        return out

    def _record(self, steps: list[torch.Tensor], norms: list[torch.Tensor]) -> None:
        """Keep ``[2, K, B]`` (step norms, iterate norms), padded with nan to ``self.steps`` iterations."""
        rec = torch.stack([torch.stack(steps), torch.stack(norms)])  # [2, k, B]
        pad = self.steps - rec.shape[1]
        if pad:
            rec = torch.cat([rec, rec.new_full((2, pad, rec.shape[2]), math.nan)], dim=1)
        self._records.append(rec)

    def _iterate(self, start: torch.Tensor, step_fn) -> torch.Tensor:
        """``u_{k+1} = u_k + step_fn(k, u_k)`` from ``start`` ``[B, S]``: ``steps`` iterations, the ``tol`` stop, the
        ``guard``, and the records for :meth:`report`."""
        u = start
        steps, norms = [], []
        active, last = None, None  # [B] rows still iterating (guard); the previous accepted step norms
        for k in range(self.steps):
            step = step_fn(k, u)  # [B, S]
            step_norm, u_norm = step.norm(dim=-1), u.norm(dim=-1)  # [B] each
            steps.append(step_norm)
            norms.append(u_norm)
            if self.guard and last is not None:
                keep = step_norm <= last  # a growing (or non-finite) step: freeze the row at u_k
                active = keep if active is None else active & keep
                step = torch.where(active.unsqueeze(-1), step, 0.0)
                step_norm = torch.where(active, step_norm, 0.0)
            last = step_norm
            u = u + step
            if self.tol > 0 and bool((_relative(step_norm, u_norm) <= self.tol).all()):  # one host sync
                break
        self._record(steps, norms)
        if self.guard:
            self._frozen.append(torch.zeros_like(u_norm) if active is None else (~active).to(u_norm.dtype))
        return u

    def invert(self, t, v):
        """``u_K`` ``[B, S]`` from ``u_0 = s_{t-1}``: ``u_{k+1} = u_k + g(v) - g(f(u_k, x_t))``."""
        g_v = []

        def step(k, u):
            if k == 0:  # g(v) - g(f(u_0)) with f(u_0) = s_t: the base's difference rule
                return self.base.difference(t, v - self.states[:, t])
            if not g_v:
                g_v.append(self.base.invert(t, v))  # [B, S]
            return g_v[0] - self.base.invert(t, self.cell.step(u, self.x[:, t]))

        return self._iterate(self.prev[:, t], step)

    def linearized(self, t, delta):
        """``J_psi_t(s_t) delta`` ``[B, S]``: ``d_1 = J_g delta``, ``d_{k+1} = d_k + J_g (delta - J_f d_k)``."""

        def step(k, d):
            return self.base.linearized(t, delta if k == 0 else delta - self._step_jvp(t, d))

        return self._iterate(torch.zeros_like(delta), step)

    def difference(self, t, delta):
        """``psi_t(s_t + delta) - s_{t-1}`` ``[B, S]`` (``psi_t(s_t) = s_{t-1}`` by construction)."""
        return self.invert(t, self.states[:, t] + delta) - self.prev[:, t]

    def report(self):
        out = dict(self._report)
        if self._records:
            rec = torch.stack(self._records)  # [N, 2, K, B]
            step, size = rec[:, 0], rec[:, 1]  # [N, K, B] each
            done = ~torch.isnan(step[:, :, 0])  # [N, K]: iterations run
            iterations = done.sum(dim=1)  # [N]
            floor = 1e3 * torch.finfo(rec.dtype).eps * size[:, :-1]  # [N, K-1, B]
            valid = step[:, :-1] > floor.clamp_min(torch.finfo(rec.dtype).tiny)  # nan compares False
            ratio = torch.where(valid, _relative(step[:, 1:], step[:, :-1]), -math.inf).amax(dim=-1)  # [N, K-1]
            ratio = ratio[(ratio > -math.inf) & ~torch.isnan(ratio)]
            last = step.gather(1, (iterations - 1)[:, None, None].expand(-1, 1, step.shape[2]))  # [N, 1, B]
            last_size = size.gather(1, (iterations - 1)[:, None, None].expand(-1, 1, size.shape[2]))
            values = torch.stack([
                iterations.to(rec.dtype).mean(),
                ratio.median() if ratio.numel() else rec.new_tensor(math.nan),
                _relative(last, last_size).max(),
            ]).tolist()  # one host sync
            out.update(iterations=values[0], contraction_rate=values[1], final_step_norm=values[2],
                       calls=float(len(self._records)))
            if self._frozen:
                out["guarded"] = float(torch.stack(self._frozen).mean())
        out.update({f"base_{k}": v for k, v in self.base.report().items()})
        return out

    @property
    def trainable(self) -> bool:  # the base's ability
        return self.base.trainable

    @property
    def stateful(self) -> bool:  # the base's ability
        return self.base.stateful

    def fit(self, cell, x, states):
        """Train the base (e.g. a learned inverse) through this solver."""
        return self.base.fit(cell, x, states)

    def state_dict(self) -> dict:
        """The base's state (e.g. a learned inverse's weights), or ``{}``."""
        return {"base": self.base.state_dict()} if self.base.stateful else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if state and self.base.stateful:
            self.base.load_state_dict(state["base"])
