"""The regularized inverse of any differentiable recurrent step by Gauss-Newton and conjugate gradient.

Math core: imports only torch. Device and dtype follow the inputs.

Target propagation through time (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023)
maps a target ``v`` of ``s_t`` to a target of ``s_{t-1}`` through the regularized inverse of the step
``s_t = f(s_{t-1}, x_t)``::

    psi_t(v) = argmin_u  |R(u) - target(v)|^2 + r |u - s_{t-1}|^2.

The paper's closed-form Elman inverse (:class:`~seqtp.inverses.AnalyticInverse`) fits in the pre-activation space,
``R(u) = W u + U x_t + b``, ``target(v) = a(v)`` (``a = phi^{-1}``): a linear least-squares problem. For a GRU or an
LSTM there is no such closed form, so :class:`GaussNewtonInverse` solves the problem iteratively, by default in the
output space, ``R(u) = f(u, x_t)``, ``target(v) = v`` (for Elman a different objective from the paper's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._cells import Cell, inverse_activation, inverse_activation_grad
from .base import InverseSolver, fold_stats

SPACES = ("output", "preactivation")

Map = Callable[[torch.Tensor], torch.Tensor]


def _transpose_vjp(fn: Map, u: torch.Tensor, like: torch.Tensor) -> Map:
    """``p -> J p`` with ``J = d fn / du`` at ``u``, as the vjp of the (linear) map ``w -> J^T w``.

    One double-vjp graph per linearization point, then each product is one backward pass through it: about five
    times cheaper than ``torch.func.jvp`` per product for the small cells here (forward-mode AD recomputes the
    step each time and has a large per-op overhead), and ``torch.func.linearize`` costs a ``make_fx`` trace per
    point. ``like`` ``[B, S']``: any tensor with the shape of ``fn(u)``.
    """

    def jt(w: torch.Tensor) -> torch.Tensor:  # [B, S'] -> [B, S]
        return torch.func.vjp(fn, u)[1](w)[0]

    _, jt_transposed = torch.func.vjp(jt, torch.zeros_like(like))
    return lambda p: jt_transposed(p)[0]  # [B, S] -> [B, S']


class GaussNewtonInverse(InverseSolver):
    """The regularized inverse of any differentiable cell, by Gauss-Newton with batched conjugate gradient.

    ``psi_t(v) = argmin_u |R(u) - target(v)|^2 + r |u - s_{t-1}|^2``, in the residual space ``space``:

    - ``"output"`` (default): ``R(u) = f(u, x_t)``, ``target(v) = v``; any cell (Elman, GRU, LSTM);
    - ``"preactivation"``: ``R(u) = pre(u, x_t)``, ``target(v) = a(v)`` with ``a = phi^{-1}`` clamped by ``eps``
      (:func:`seqtp._cells.inverse_activation`); only for cells with an ``output_nonlinearity`` (Elman). This is the
      objective of the paper's Elman inverse (Roulet & Harchaoui, TMLR 2023, Sec. 3): linear least squares, so
      Gauss-Newton is exact after one iteration and ``psi_t`` agrees with :class:`~seqtp.inverses.AnalyticInverse`.
      The output space gives another objective (the fit is weighted by ``phi'``), hence other targets for tanh.

    Gauss-Newton (on the stacked residual ``[R(u) - target; sqrt(r) (u - s_{t-1})]``) from ``u_0 = s_{t-1}``::

        u_{k+1} = u_k - alpha_k (J_k^T J_k + r I)^{-1} (J_k^T (R(u_k) - target) + r (u_k - s_{t-1})),
        J_k = dR/du (u_k),

    with ``alpha_k = 1`` (pure Gauss-Newton) unless ``line_search``: then the first of ``1, 1/2, 1/4, ...`` that
    satisfies Armijo's condition on the objective, per row (the full step is taken near the solution, so the local
    rate is Gauss-Newton's; far from it, e.g. with a large target shift and a small ``r``, pure Gauss-Newton can
    oscillate or diverge while the damped one decreases the objective monotonically). Each system is solved by
    conjugate gradient, batched over the rows (each row its own scalars ``alpha``, ``beta``), with the operator
    ``p -> J^T (J p) + r p`` by autodiff, never a dense Jacobian: ``J^T`` by ``torch.func.vjp``, ``J`` as the vjp
    of that linear map (see :func:`_transpose_vjp`). A row stops, and is frozen, once its convergence measure
    ``min(|g_k| / |g_0|, |du_{k-1}| / max(|u_k|, 1))`` (``g`` the gradient of the objective, over 2; ``du`` the
    last full Gauss-Newton step) is at most ``tol``, or after ``max_iter`` iterations; the step test takes over
    where the gradient is at the dtype's resolution. CG stops a row at relative residual ``cg_tol`` or after
    ``cg_max_iter`` iterations. Rows do not interact, so a row's result does not depend on the rest of the batch.
    At ``v = s_t`` (output space) the gradient at ``u_0`` vanishes and ``psi_t(s_t) = s_{t-1}`` with no iteration.

    The linearized rule is the Jacobian of ``psi_t`` at ``v = s_t``, where the residual vanishes (output space, and
    pre-activation space up to the clamp), so the second-order terms drop: ``J_psi delta = (J^T J + r I)^{-1} J^T d``
    with ``J`` at ``s_{t-1}`` and ``d = delta`` (output) or ``d = a'(s_t) * delta`` (pre-activation), one CG solve.

    Results are constants (computed under ``torch.no_grad``; the ``torch.func`` transforms inside still work).
    Host syncs, all convergence checks: one per CG iteration (are rows still active?), one per Gauss-Newton
    iteration (are all rows finished?) and one per line-search trial; the diagnostics stay on the device until
    :meth:`report`.

    Args:
        reg: ``r > 0``, the weight of the proximal term.
        space: ``"output"`` or ``"preactivation"`` (see above).
        eps: clamp margin of ``a`` for tanh (pre-activation space only), in ``(0, 1)``.
        tol: Gauss-Newton tolerance ``>= 0`` on the convergence measure; ``0`` runs ``max_iter`` iterations unless
            the gradient is exactly zero.
        max_iter: the maximal number of Gauss-Newton iterations, ``>= 1``.
        cg_tol: CG tolerance ``>= 0`` on the relative residual ``|b - A x| / |b|`` (as CG updates it).
        cg_max_iter: the maximal number of CG iterations per solve, ``>= 1``; default: the state size S (exact in
            exact arithmetic).
        line_search: Armijo backtracking on the objective (default) or pure Gauss-Newton steps.
        max_backtracks: halvings per line search, ``>= 0``; a row that finds no decrease takes no step and stops,
            not converged.

    Raises:
        ValueError: ``reg <= 0``, an unknown ``space``, or an option out of range.
        TypeError (at :meth:`bind`): ``space="preactivation"`` with a cell that has no ``output_nonlinearity``.

    :meth:`report` (after :meth:`propagate`; reset at :meth:`bind`), as floats:
        ``gn_iterations_max``, ``gn_iterations_mean``: Gauss-Newton steps per row of each :meth:`invert` call
        (0 when there was none, e.g. the linearized rule). ``cg_iterations_max``, ``cg_iterations_mean``: per CG
        solve and row with a nonzero right-hand side. ``final_relative_residual_max``: the largest final
        convergence measure of :meth:`invert` (compared with ``tol``) and relative residual ``|b - A x| / |b|`` of
        :meth:`linearized` (compared with ``cg_tol``). ``final_gradient_norm_max``: the largest final ``|g|`` of
        :meth:`invert`. ``converged``: 1.0 if every row of every :meth:`invert` call met ``tol`` and every
        :meth:`linearized` solve met ``cg_tol``, else 0.0. ``line_search_backtracks_max``: the most halvings in
        one line search. ``invert_calls``, ``linearized_calls``: the number of calls.

    Reference: Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023 (the regularized
    inverse and the three target rules; their Elman inverse regularizes in the pre-activation space).
    """

    config_options = ("space", "tol", "max_iter")

    def __init__(
        self,
        *,
        reg: float,
        space: str = "output",
        eps: float = 1e-3,
        tol: float = 1e-6,
        max_iter: int = 20,
        cg_tol: float = 1e-8,
        cg_max_iter: int | None = None,
        line_search: bool = True,
        max_backtracks: int = 30,
    ):
        super().__init__(reg=reg)
        if space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if not cg_tol >= 0:
            raise ValueError(f"cg_tol must be >= 0, got {cg_tol}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
        if cg_max_iter is not None and (int(cg_max_iter) != cg_max_iter or cg_max_iter < 1):
            raise ValueError(f"cg_max_iter must be an integer >= 1 or None, got {cg_max_iter}")
        if int(max_backtracks) != max_backtracks or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be an integer >= 0, got {max_backtracks}")
        self.space, self.eps, self.tol, self.max_iter = space, float(eps), float(tol), int(max_iter)
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = None if cg_max_iter is None else int(cg_max_iter)
        self.line_search, self.max_backtracks = bool(line_search), int(max_backtracks)
        self._stats: dict[str, torch.Tensor | int] = {}

    def bind(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> GaussNewtonInverse:
        """Take the cell, inputs ``[B, T, D]`` and states ``[B, T, S]`` of this iteration; resets :meth:`report`."""
        if self.space == "preactivation" and cell.output_nonlinearity is None:
            raise TypeError(
                f"space='preactivation' needs a cell with an output nonlinearity (Elman), got a {cell.kind} cell; "
                f"use space='output'"
            )
        super().bind(cell, x, states)
        self._cg_iters = self.cg_max_iter or cell.state_size
        self._stats = {}
        return self

    # -- the residual map ----------------------------------------------------------------------------------------

    def _residual_fn(self, t: int) -> Map:
        """``u [B, S] -> R(u) [B, S']`` of step ``t`` (``S' = S``: the state, or the Elman pre-activation)."""
        x_t = self.x[:, t]  # [B, D]
        if self.space == "preactivation":
            return lambda u: self.cell.preactivation(u, x_t)
        return lambda u: self.cell.step(u, x_t)

    def _target(self, v: torch.Tensor) -> torch.Tensor:
        if self.space == "preactivation":
            return inverse_activation(v, self.cell.output_nonlinearity, eps=self.eps)  # [B, S']
        return v

    # -- batched conjugate gradient ------------------------------------------------------------------------------

    def _cg(self, matvec: Map, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``A x = b`` row by row (``A`` symmetric positive definite, applied by ``matvec`` ``[B, S] ->
        [B, S]``) from ``x = 0``; returns ``x`` ``[B, S]`` and the relative residuals ``[B]`` (0 where ``b = 0``).

        A row is active until ``|r_k| <= cg_tol |b|``; inactive rows get ``alpha = beta = 0`` and stay put. Each row
        is solved for ``b / max|b|`` and scaled back, so that ``|r|^2`` neither underflows nor overflows (float32
        shifts shrink or grow geometrically along the sequence)."""
        tiny = torch.finfo(b.dtype).tiny
        b_scale = b.abs().amax(dim=-1, keepdim=True)  # [B, 1]
        b = b / b_scale.clamp_min(tiny)  # [B, S]: entries in [-1, 1]
        x = torch.zeros_like(b)  # [B, S]
        res = b.clone()  # [B, S]: r_0 = b - A 0
        p = res.clone()  # [B, S]
        rs = (res * res).sum(-1)  # [B]
        b2 = rs.clone()  # [B]: |b|^2
        threshold = self.cg_tol**2 * b2  # [B]
        active = rs > threshold  # [B]: rows with b = 0 are solved by x = 0
        nontrivial = b2 > 0  # [B]
        iters = torch.zeros_like(rs)  # [B]
        for _ in range(self._cg_iters):
            if not bool(active.any()):  # host sync: one per CG iteration
                break
            ap = matvec(p)  # [B, S]
            pap = (p * ap).sum(-1)  # [B]
            alpha = torch.where(active, rs / torch.where(active, pap, 1.0).clamp_min(tiny), 0.0)  # [B]
            x = x + alpha[:, None] * p
            res = res - alpha[:, None] * ap
            rs_new = (res * res).sum(-1)  # [B]
            beta = torch.where(active, rs_new / rs.clamp_min(tiny), 0.0)  # [B]
            p = torch.where(active[:, None], res + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
            iters = iters + active.to(iters.dtype)
            active = active & (rs > threshold)
        rel = torch.where(nontrivial, (rs / b2.clamp_min(tiny)).sqrt(), 0.0)  # [B]
        fold_stats(self._stats, cg_sum=(iters * nontrivial).sum(), cg_rows=nontrivial.sum(), cg_max=iters.max())
        return x * b_scale, rel

    def _normal_operator(self, fn: Map, u: torch.Tensor, value: torch.Tensor, jt: Map) -> Map:
        """``p -> J^T (J p) + r p`` ``[B, S] -> [B, S]`` with ``J = dR/du`` at ``u``; ``jt`` is ``J^T``."""
        j = _transpose_vjp(fn, u, value)
        return lambda p: jt(j(p)) + self.reg * p

    # -- the contract --------------------------------------------------------------------------------------------

    def invert(self, t: int, v: torch.Tensor) -> torch.Tensor:
        """``psi_t(v)`` ``[B, S]`` by Gauss-Newton from ``s_{t-1}``."""
        with torch.no_grad():
            fn = self._residual_fn(t)
            prev = self.prev[:, t]  # [B, S]: s_{t-1}
            target = self._target(v)  # [B, S']
            tiny = torch.finfo(prev.dtype).tiny
            u = prev  # [B, S]
            rows = prev.shape[0]
            met = torch.zeros(rows, dtype=torch.bool, device=prev.device)  # [B]: met tol
            stalled = torch.zeros_like(met)  # [B]: line search failed (no step taken)
            steps = torch.zeros(rows, dtype=prev.dtype, device=prev.device)  # [B]: Gauss-Newton steps taken
            step_rel = torch.full_like(steps, torch.inf)  # [B]: |du| / max(|u|, 1) of the last full GN step
            for k in range(self.max_iter + 1):
                value, vjp_fn = torch.func.vjp(fn, u)  # R(u_k) [B, S'], and J_k^T

                def jt(w, vjp_fn=vjp_fn):
                    return vjp_fn(w)[0]  # [B, S'] -> [B, S]

                fit = value - target  # [B, S']
                grad = jt(fit) + self.reg * (u - prev)  # [B, S]: half the objective's gradient
                gnorm = grad.norm(dim=-1)  # [B]
                if k == 0:
                    g0 = gnorm  # [B]
                grad_rel = torch.where(gnorm > 0, gnorm / g0.clamp_min(tiny), 0.0)  # [B]
                measure = torch.minimum(grad_rel, step_rel)  # [B]: the convergence measure
                met = met | (measure <= self.tol)
                done = met | stalled  # [B]
                if k == self.max_iter or bool(done.all()):  # host sync: one per Gauss-Newton iteration
                    break
                rhs = torch.where(done[:, None], 0.0, -grad)  # [B, S]: finished rows take no step (x = 0)
                du, _ = self._cg(self._normal_operator(fn, u, value, jt), rhs)  # [B, S]: the full GN step
                du_rel = du.norm(dim=-1) / u.norm(dim=-1).clamp_min(1.0)  # [B]
                if self.line_search:
                    alpha = self._line_search(fn, target, prev, u, du, grad, fit, skip=done | (du_rel <= self.tol))
                    stalled = stalled | (alpha == 0)
                    du = alpha[:, None] * du
                moving = ~done & ~stalled  # [B]
                u = u + du
                steps = steps + moving.to(steps.dtype)
                step_rel = torch.where(moving, du_rel, step_rel)
            fold_stats(
                self._stats, invert_calls=1, gn_sum=steps.sum(), gn_rows=rows, gn_max=steps.max(),
                rel_max=measure.max(), grad_max=gnorm.max(), converged=(met & ~stalled).all(),
            )
            return u

    def _line_search(
        self,
        fn: Map,
        target: torch.Tensor,
        prev: torch.Tensor,
        u: torch.Tensor,
        du: torch.Tensor,
        grad: torch.Tensor,
        fit: torch.Tensor,
        *,
        skip: torch.Tensor,
    ) -> torch.Tensor:
        """Armijo backtracking per row: the step ``alpha`` ``[B]`` (1, 1/2, 1/4, ...; 0 if none of
        ``max_backtracks`` halvings decreases the objective) for the direction ``du`` ``[B, S]`` from ``u``.

        ``phi(u) = |R(u) - target|^2 + r |u - s_{t-1}|^2`` must satisfy ``phi(u + alpha du) <= phi(u) + c alpha
        phi'(u; du) + roundoff`` (``c = 1e-4``, ``phi'(u; du) = 2 g . du < 0``); rows in ``skip`` (finished, or a step
        already below ``tol``) take ``alpha = 1``. Near the solution the full Gauss-Newton step passes at once."""
        eps = torch.finfo(u.dtype).eps
        prox = u - prev  # [B, S]
        phi = fit.square().sum(-1) + self.reg * prox.square().sum(-1)  # [B]
        # roundoff of phi: the sums of squares, and the cancellations in R(u) - target and u - s_{t-1}
        scale = fit.norm(dim=-1) + target.norm(dim=-1) + self.reg**0.5 * (u.norm(dim=-1) + prev.norm(dim=-1))  # [B]
        allowance = 8 * eps * (phi + phi.sqrt() * scale)  # [B]
        slope = 2 * (grad * du).sum(-1)  # [B]: d/d alpha phi(u + alpha du) at 0
        alpha = torch.ones_like(phi)  # [B]
        ok = skip  # [B]
        for _ in range(self.max_backtracks + 1):
            trial = u + alpha[:, None] * du  # [B, S]
            phi_trial = (fn(trial) - target).square().sum(-1) + self.reg * (trial - prev).square().sum(-1)  # [B]
            ok = ok | (phi_trial <= phi + 1e-4 * alpha * slope + allowance)
            if bool(ok.all()):  # host sync: one per trial step
                break
            alpha = torch.where(ok, alpha, alpha / 2)
        fold_stats(self._stats, backtracks_max=torch.log2(1 / alpha).max().round())
        return torch.where(ok, alpha, 0.0)

    def linearized(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``J_psi_t(s_t) delta = (J^T J + r I)^{-1} J^T d`` ``[B, S]``, ``J = dR/du`` at ``s_{t-1}``, one CG solve."""
        with torch.no_grad():
            fn = self._residual_fn(t)
            prev = self.prev[:, t]  # [B, S]
            if self.space == "preactivation":
                d = inverse_activation_grad(self.states[:, t], self.cell.output_nonlinearity, eps=self.eps) * delta
            else:
                d = delta  # [B, S']
            value, vjp_fn = torch.func.vjp(fn, prev)  # R(s_{t-1}) [B, S'], and J^T

            def jt(w):
                return vjp_fn(w)[0]  # [B, S'] -> [B, S]

            out, rel = self._cg(self._normal_operator(fn, prev, value, jt), jt(d))  # [B, S], [B]
            fold_stats(self._stats, linearized_calls=1, rel_max=rel.max(), converged=(rel <= self.cg_tol).all())
            return out

    # -- diagnostics ---------------------------------------------------------------------------------------------

    def report(self) -> dict[str, float]:
        """The diagnostics since :meth:`bind` (keys in the class docstring), as Python floats."""
        s = {k: float(v) for k, v in self._stats.items()}  # host syncs, once per report
        return {
            "gn_iterations_max": s.get("gn_max", 0.0),
            "gn_iterations_mean": s.get("gn_sum", 0.0) / max(s.get("gn_rows", 0.0), 1.0),
            "cg_iterations_max": s.get("cg_max", 0.0),
            "cg_iterations_mean": s.get("cg_sum", 0.0) / max(s.get("cg_rows", 0.0), 1.0),
            "final_relative_residual_max": s.get("rel_max", 0.0),
            "final_gradient_norm_max": s.get("grad_max", 0.0),
            "converged": s.get("converged", 1.0),
            "line_search_backtracks_max": s.get("backtracks_max", 0.0),
            "invert_calls": s.get("invert_calls", 0.0),
            "linearized_calls": s.get("linearized_calls", 0.0),
        }
