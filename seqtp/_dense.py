"""The regularized inverse of a GRU, LSTM or Elman step with dense per-row Jacobians and batched Cholesky.

Math core: imports only torch. Device and dtype follow the inputs.

Target propagation through time (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023)
maps a target ``v`` of ``s_t`` to a target of ``s_{t-1}`` through the regularized inverse of the step
``s_t = f(s_{t-1}, x_t)``, here in the output space (the objective of :class:`seqtp.GaussNewtonInverse` with
``space="output"``)::

    psi_t(v) = argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2.

Its linearization at ``v = s_t`` is ``(J_t^T J_t + r I)^{-1} J_t^T delta`` with ``J_t = df/ds (s_{t-1}, x_t)``
``[S, S]`` per batch row. The forward states are known, so every ``J_t`` and the Cholesky factor of every
``J_t^T J_t + r I`` are built for all steps (and rows) at once, before the sequential recursion, which is then one
batched triangular solve per step.

The Jacobians use the structure of the cells of :data:`seqtp.CELLS`: the state enters the step ``f(s, g)`` directly
and through the recurrent gate pre-activations ``g = W_hh h + b_hh`` (``h`` the first ``H`` entries of ``s``), and
apart from ``W_hh`` the step couples no two units: output unit ``i`` of each output block (``h``; LSTM also ``c``)
depends only on entry ``i`` of each state block and of each gate block. Then
``J = D_s + D_g W_hh E_h`` with ``D_s``, ``D_g`` diagonal per pair of blocks, and all those diagonals come from
``nb + G`` forward-mode products (``torch.func.jvp``, one per state block and gate block, batched with
``torch.func.vmap``) of the whole ``[B*T]`` batch: ``O(B T S (nb + G))`` work instead of the ``S`` Jacobian-vector
products per row of ``torch.func.jacfwd``. The tests check ``J`` against ``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from ._cells import Cell
from ._inverse import FactorizationError
from ._solvers import InverseSolver


class Linearization(NamedTuple):
    """``J = df/ds`` ``[N, S, S]`` at ``N`` rows in the block form ``J = [J_h | J_c]`` of the cells of
    :data:`seqtp.CELLS`: ``J_h`` ``[N, S, H]`` the columns of ``h`` (dense), ``J_c`` the columns of the LSTM cell state
    ``c``, diagonal per output block, ``J_c[n, o*H + i, j] = [i = j] c_diag[n, o*H + i]`` (``c_diag`` ``[N, S]``;
    ``None`` when ``S = H``)."""

    jac_h: torch.Tensor
    c_diag: torch.Tensor | None

    def dense(self) -> torch.Tensor:
        """``J`` ``[N, S, S]``."""
        if self.c_diag is None:
            return self.jac_h
        n_rows, size, hidden = self.jac_h.shape
        cols_c = torch.diag_embed(self.c_diag.view(n_rows, size // hidden, hidden))  # [N, nb(out), H, H]
        return torch.cat([self.jac_h, cols_c.reshape(n_rows, size, hidden)], dim=-1)  # [N, S, S]

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """``J^T v`` ``[N, S]`` for ``v`` ``[N, S]``."""
        out = torch.matmul(v.unsqueeze(-2), self.jac_h).squeeze(-2)  # [N, H]
        if self.c_diag is None:
            return out
        return torch.cat([out, self._c_t(v)], dim=-1)  # [N, S]

    def _c_t(self, v: torch.Tensor) -> torch.Tensor:  # J_c^T v [N, H]
        n_rows, size, hidden = self.jac_h.shape
        return (self.c_diag * v).view(n_rows, size // hidden, hidden).sum(1)

    def _c(self, w: torch.Tensor) -> torch.Tensor:  # J_c w [N, S] for w [N, H]
        n_rows, size, hidden = self.jac_h.shape
        return (self.c_diag.view(n_rows, size // hidden, hidden) * w.unsqueeze(1)).reshape(n_rows, size)


def step_jacobian(cell: Cell, state: torch.Tensor, x: torch.Tensor) -> Linearization:
    """``J = d f(s, x) / d s`` at each row of ``state`` ``[N, S]``, ``x`` ``[N, D]`` (rows independent), in block form.

    ``J[n, o*H + i, k*H + j] = [i = j] ds[n, k, o, i] + [k = 0] sum_g dg[n, g, o, i] W_hh[g*H + i, j]`` where
    ``ds[n, k] = d f / d s`` along the all-ones tangent of state block ``k`` (``g`` held fixed) and ``dg[n, g]`` along
    the all-ones tangent of gate block ``g``: exact for the unit-wise cells described in the module docstring.

    Args:
        cell: an Elman, GRU or LSTM :class:`~seqtp._cells.Cell`. state: ``[N, S]``. x: ``[N, D]``.

    Returns:
        The :class:`Linearization` (``.dense()`` is ``J`` ``[N, S, S]``).

    Raises:
        ValueError: a state of more than two blocks of ``H`` (no such cell in :data:`seqtp.CELLS`).
    """
    p = cell.params
    n_rows, size = state.shape
    hidden = cell.hidden_size
    n_blocks = size // hidden
    if n_blocks > 2 or n_blocks * hidden != size:
        raise ValueError(f"the dense inverse needs a state of H or 2H entries, got S={size} with H={hidden}")
    w_hh = p["weight_hh_l0"].to(state.dtype)  # [G*H, H]
    n_gates = w_hh.shape[0] // hidden
    gi = x @ p["weight_ih_l0"].T.to(state.dtype) + p["bias_ih_l0"].to(state.dtype)  # [N, G*H]
    gh = state[:, :hidden] @ w_hh.T + p["bias_hh_l0"].to(state.dtype)  # [N, G*H]
    proxy = copy.copy(cell)

    def step(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # f(s, g) [N, S] with the gates g given
        proxy._gates = lambda _state, _x: (gi, g)
        return proxy.step(s, x)

    eye_s = torch.eye(n_blocks, dtype=state.dtype, device=state.device).repeat_interleave(hidden, dim=1)  # [nb, S]
    eye_g = torch.eye(n_gates, dtype=state.dtype, device=state.device).repeat_interleave(hidden, dim=1)  # [G, G*H]
    tangents_s = torch.cat([eye_s, eye_s.new_zeros(n_gates, size)])  # [nb + G, S]
    tangents_g = torch.cat([eye_g.new_zeros(n_blocks, n_gates * hidden), eye_g])  # [nb + G, G*H]

    def directional(ts: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:  # [S], [G*H] -> [N, S]
        return torch.func.jvp(step, (state, gh), (ts.expand(n_rows, -1), tg.expand(n_rows, -1)))[1]

    dirs = torch.func.vmap(directional)(tangents_s, tangents_g)  # [nb + G, N, S]
    dg = dirs[n_blocks:].reshape(n_gates, n_rows, n_blocks, hidden)  # [G, N, nb(out), H]
    w_units = w_hh.reshape(n_gates, hidden, hidden)  # [G, H(i), H(j)]
    # the columns of h: sum_g dg[g, n, o, i] W_g[i, j] + [i = j] ds[0, n, o, i], by broadcast products (a batched
    # matmul over units with an inner size G is far slower on the CPU)
    jac_h = dg[0, ..., None] * w_units[0]  # [N, nb(out), H(i), H(j)]
    for g in range(1, n_gates):
        jac_h.addcmul_(dg[g, ..., None], w_units[g])
    jac_h.diagonal(dim1=-2, dim2=-1).add_(dirs[0].view(n_rows, n_blocks, hidden))
    c_diag = dirs[1] if n_blocks == 2 else None  # [N, S]: d f / d c along the ones of the c block
    return Linearization(jac_h.reshape(n_rows, size, hidden), c_diag)


class Factor(NamedTuple):
    """The factorized ``A = J^T J + r I`` of a :class:`Linearization`: with ``J_c`` (LSTM) the cell-state block is
    eliminated, ``q = diag(J_c^T J_c) + r`` ``[N, H]`` (diagonal) and ``chol`` ``[N, H, H]`` is the lower Cholesky
    factor of the Schur complement ``J_h^T P J_h + r I``, ``P = I - J_c diag(1/q) J_c^T``; without it ``chol`` is the
    factor of ``J_h^T J_h + r I`` and ``q`` is ``None``."""

    lin: Linearization
    chol: torch.Tensor
    q: torch.Tensor | None

    def _chol_solve(self, b: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H], two triangular solves
        y = torch.linalg.solve_triangular(self.chol, b.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(self.chol.mT, y, upper=True).squeeze(-1)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``A^{-1} b`` ``[N, S]`` for ``b`` ``[N, S]`` (block elimination of ``c``)."""
        lin = self.lin
        if self.q is None:
            return self._chol_solve(b)
        hidden = lin.jac_h.shape[-1]
        b_h, b_c = b[:, :hidden], b[:, hidden:]  # [N, H] each
        y = b_c / self.q  # [N, H]
        x_h = self._chol_solve(b_h - torch.matmul(lin._c(y).unsqueeze(-2), lin.jac_h).squeeze(-2))  # [N, H]
        x_c = (b_c - lin._c_t(torch.matmul(lin.jac_h, x_h.unsqueeze(-1)).squeeze(-1))) / self.q  # [N, H]
        return torch.cat([x_h, x_c], dim=-1)

    def linearized(self, delta: torch.Tensor) -> torch.Tensor:
        """``A^{-1} J^T delta`` ``[N, S]`` for ``delta`` ``[N, S]``."""
        lin = self.lin
        if self.q is None:
            return self._chol_solve(torch.matmul(delta.unsqueeze(-2), lin.jac_h).squeeze(-2))
        p_delta = delta - lin._c(lin._c_t(delta) / self.q)  # [N, S]: P delta
        x_h = self._chol_solve(torch.matmul(p_delta.unsqueeze(-2), lin.jac_h).squeeze(-2))  # [N, H]
        x_c = lin._c_t(delta - torch.matmul(lin.jac_h, x_h.unsqueeze(-1)).squeeze(-1)) / self.q  # [N, H]
        return torch.cat([x_h, x_c], dim=-1)


def factorize(lin: Linearization, reg: float) -> Factor:
    """The :class:`Factor` of ``J^T J + r I``.

    Raises:
        seqtp.FactorizationError: on the CPU, if a factorization fails (non-finite Jacobians); on CUDA the failed
            factors are filled with NaN instead (no host sync), so the targets and the loss check see NaN.
    """
    jac_h, c_diag = lin
    n_rows, size, hidden = jac_h.shape
    q = None
    if c_diag is None:
        weighted = jac_h  # [N, S, H]
    else:
        c3 = c_diag.view(n_rows, size // hidden, hidden, 1)  # [N, nb(out), H, 1]
        q = c3.square().sum(1).squeeze(-1) + reg  # [N, H]
        cross = (c3 * jac_h.view(n_rows, size // hidden, hidden, hidden)).sum(1)  # [N, H, H]: J_c^T J_h
        weighted = jac_h - (c3 * (cross / q.unsqueeze(-1)).unsqueeze(1)).reshape(n_rows, size, hidden)  # P J_h
    gram = torch.matmul(jac_h.mT, weighted)  # [N, H, H]
    gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    chol, info = torch.linalg.cholesky_ex(gram)  # [N, H, H], [N]
    if chol.is_cuda:
        chol = chol.masked_fill((info != 0)[:, None, None], float("nan"))
    elif bool((info != 0).any()):
        raise FactorizationError(f"Cholesky factorization of J^T J + reg*I failed (reg={reg}, finite Jacobians: "
                                 f"{bool(torch.isfinite(jac_h).all())})")
    return Factor(lin, chol, q)


class DenseInverse(InverseSolver):
    """The output-space regularized inverse by dense per-row Jacobians and one batched Cholesky per iteration.

    ``psi_t(v) = argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2`` (Roulet & Harchaoui, TMLR 2023; the objective of
    :class:`seqtp.GaussNewtonInverse` with ``space="output"``), for the cells of :data:`seqtp.CELLS` (Elman, GRU,
    LSTM with ``s = [h, c]``):

    - ``linearized``: ``J_psi_t(s_t) delta = (J_t^T J_t + r I)^{-1} J_t^T delta``, ``J_t = df/ds (s_{t-1}, x_t)``.
      The Jacobians (:func:`step_jacobian`) and the Cholesky factors of ``J_t^T J_t + r I`` are built for all rows
      and steps at once (in chunks of steps of at most ``chunk_bytes`` per tensor, latest steps first, so that the
      backward recursion finds them ready), then each step is a mat-vec and a batched ``cholesky_solve``.
    - ``invert`` (so the ``difference`` and ``exact`` rules): damped Gauss-Newton from ``u_0 = s_{t-1}``,
      ``u_{k+1} = u_k - alpha_k (J_k^T J_k + r I)^{-1} (J_k^T (f(u_k) - v) + r (u_k - s_{t-1}))`` with dense
      ``J_k`` at ``u_k`` (the first from the precomputed factor), Armijo backtracking on the objective per row
      (``alpha = 1, 1/2, ...``), and the stopping rule of :class:`seqtp.GaussNewtonInverse`: a row stops once
      ``min(|g_k| / |g_0|, |du_{k-1}| / max(|u_k|, 1)) <= tol`` or after ``max_iter`` steps. It is the same
      iteration as Gauss-Newton-CG with each linear system solved exactly, so both reach the same minimizer.

    Memory: ``J`` and its factor take ``2 B T S^2`` numbers (in chunks of steps of ``chunk_bytes`` each); the
    Gauss-Newton-CG solver needs none, which is why ``solver="auto"`` picks this one only for moderate ``S``.

    Args:
        reg: ``r > 0``. tol: Gauss-Newton tolerance ``>= 0`` of :meth:`invert`. max_iter: Gauss-Newton steps of
            :meth:`invert`, ``>= 1``. max_backtracks: halvings per line search, ``>= 0`` (a row that finds no
            decrease stops). chunk_bytes: the largest Jacobian chunk ``[B, steps, S, S]``, in bytes (at least one
            step is taken).

    Raises:
        ValueError: ``reg <= 0`` or an option out of range.
        seqtp.FactorizationError (CPU): a Cholesky factorization failed (non-finite states or weights).

    :meth:`report` (after :meth:`propagate`; reset at :meth:`bind`): ``factorized_steps`` (steps whose Jacobians
    were built and factorized), ``gn_iterations_max``, ``gn_iterations_mean`` (per row of each :meth:`invert`
    call), ``final_relative_residual_max`` (the largest final convergence measure of :meth:`invert`),
    ``converged`` (1.0 if every row met ``tol``), ``invert_calls``, ``linearized_calls``.
    """

    def __init__(self, *, reg: float, tol: float = 1e-6, max_iter: int = 20, max_backtracks: int = 30,
                 chunk_bytes: int = 2**28):
        super().__init__(reg=reg)
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
        if int(max_backtracks) != max_backtracks or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be an integer >= 0, got {max_backtracks}")
        if int(chunk_bytes) != chunk_bytes or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be an integer >= 1, got {chunk_bytes}")
        self.tol, self.max_iter, self.max_backtracks = float(tol), int(max_iter), int(max_backtracks)
        self.chunk_bytes = int(chunk_bytes)

    def bind(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> DenseInverse:
        """Take the cell, inputs ``[B, T, D]`` and states ``[B, T, S]``; the factors are built at the first use."""
        super().bind(cell, x, states)
        self._chunk: tuple[int, int, int, Factor] | None = None  # (first step, end, B, factor)
        self._stats: dict[str, float | torch.Tensor] = {}
        return self

    # -- the factors of the linearization at s_{t-1} -------------------------------------------------------------

    def _steps_per_chunk(self) -> int:
        batch, _, size = self.states.shape
        return max(1, self.chunk_bytes // (batch * size * size * self.states.element_size()))

    def factors(self, t: int) -> Factor:
        """The :class:`Factor` ``[B]`` of ``J_t^T J_t + r I``, ``J_t`` at ``(s_{t-1}, x_t)``, from the chunk of steps
        ending at ``t`` (built, for all its steps and rows at once, when ``t`` is outside the current chunk)."""
        chunk = self._chunk
        if chunk is None or not chunk[0] <= t < chunk[1]:
            first = max(1, t + 1 - self._steps_per_chunk())
            prev = self.prev[:, first : t + 1].transpose(0, 1)  # [C, B, S]: step-major, so a step is contiguous
            steps, batch, size = prev.shape
            with torch.no_grad():
                lin = step_jacobian(self.cell, prev.reshape(steps * batch, size),
                                    self.x[:, first : t + 1].transpose(0, 1).reshape(steps * batch, -1))  # [C*B]
                factor = factorize(lin, self.reg)  # rows [C*B]
            chunk = self._chunk = (first, t + 1, batch, factor)
            self._add(factorized_steps=float(steps))
        first, _, batch, factor = chunk
        rows = slice((t - first) * batch, (t - first + 1) * batch)
        lin = factor.lin
        c_diag = None if lin.c_diag is None else lin.c_diag[rows]
        q = None if factor.q is None else factor.q[rows]
        return Factor(Linearization(lin.jac_h[rows], c_diag), factor.chol[rows], q)

    def linearized(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``(J_t^T J_t + r I)^{-1} J_t^T delta`` ``[B, S]`` with the precomputed factor."""
        self._add(linearized_calls=1.0)
        with torch.no_grad():
            return self.factors(t).linearized(delta)

    # -- the nonlinear inverse -----------------------------------------------------------------------------------

    def _objective(self, u: torch.Tensor, v: torch.Tensor, prev: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return (self.cell.step(u, x_t) - v).square().sum(-1) + self.reg * (u - prev).square().sum(-1)  # [B]

    def invert(self, t: int, v: torch.Tensor) -> torch.Tensor:
        """``psi_t(v)`` ``[B, S]`` by damped Gauss-Newton with dense Jacobians from ``u_0 = s_{t-1}``."""
        with torch.no_grad():
            prev, x_t = self.prev[:, t], self.x[:, t]  # [B, S], [B, D]
            tiny = torch.finfo(prev.dtype).tiny
            u = prev
            rows = prev.shape[0]
            met = torch.zeros(rows, dtype=torch.bool, device=prev.device)  # [B]
            stalled = torch.zeros_like(met)  # [B]: the line search found no decrease
            steps = torch.zeros(rows, dtype=prev.dtype, device=prev.device)  # [B]
            step_rel = torch.full_like(steps, torch.inf)  # [B]
            for k in range(self.max_iter + 1):
                factor = self.factors(t) if k == 0 else None  # at u_0 = s_{t-1}
                lin = factor.lin if k == 0 else step_jacobian(self.cell, u, x_t)  # [B] rows
                fit = self.cell.step(u, x_t) - v  # [B, S]
                grad = lin.apply_t(fit) + self.reg * (u - prev)  # [B, S]
                gnorm = grad.norm(dim=-1)  # [B]
                if k == 0:
                    g0 = gnorm
                grad_rel = torch.where(gnorm > 0, gnorm / g0.clamp_min(tiny), 0.0)  # [B]
                measure = torch.minimum(grad_rel, step_rel)  # [B]
                met = met | (measure <= self.tol)
                done = met | stalled  # [B]
                if k == self.max_iter or bool(done.all()):  # host sync: one per Gauss-Newton iteration
                    break
                if factor is None:
                    factor = factorize(lin, self.reg)
                du = -factor.solve(grad)  # [B, S]: the full GN step
                du = torch.where(done[:, None], 0.0, du)
                du_rel = du.norm(dim=-1) / u.norm(dim=-1).clamp_min(1.0)  # [B]
                alpha = self._line_search(u, du, grad, v, prev, x_t, skip=done | (du_rel <= self.tol))  # [B]
                stalled = stalled | (alpha == 0)
                moving = ~done & ~stalled  # [B]
                u = u + alpha[:, None] * du
                steps = steps + moving.to(steps.dtype)
                step_rel = torch.where(moving, du_rel, step_rel)
            self._add(invert_calls=1.0, gn_sum=steps.sum(), gn_rows=float(rows), gn_max=steps.max(),
                      rel_max=measure.max(), converged=(met & ~stalled).all())
            return u

    def _line_search(self, u, du, grad, v, prev, x_t, *, skip):
        """Armijo backtracking per row on ``|f(u) - v|^2 + r |u - s_{t-1}|^2`` (``c = 1e-4``, with a roundoff
        allowance): the step ``[B]`` in ``1, 1/2, ...``, 0 where no halving decreases it; ``skip`` rows take 1."""
        eps = torch.finfo(u.dtype).eps
        phi = self._objective(u, v, prev, x_t)  # [B]
        allowance = 8 * eps * (phi + phi.sqrt() * (v.norm(dim=-1) + self.reg**0.5 * (u.norm(dim=-1) + prev.norm(
            dim=-1))))  # [B]
        slope = 2 * (grad * du).sum(-1)  # [B]
        alpha = torch.ones_like(phi)
        ok = skip
        for _ in range(self.max_backtracks + 1):
            trial = self._objective(u + alpha[:, None] * du, v, prev, x_t)  # [B]
            ok = ok | (trial <= phi + 1e-4 * alpha * slope + allowance)
            if bool(ok.all()):  # host sync: one per trial
                break
            alpha = torch.where(ok, alpha, alpha / 2)
        return torch.where(ok, alpha, 0.0)

    # -- diagnostics ---------------------------------------------------------------------------------------------

    def _add(self, **values) -> None:
        s = self._stats
        for key, value in values.items():
            if key not in s:
                s[key] = value
            elif key.endswith("_max"):
                s[key] = torch.maximum(torch.as_tensor(s[key]), torch.as_tensor(value))
            elif key == "converged":
                s[key] = torch.as_tensor(s[key]) & value
            else:
                s[key] = s[key] + value

    def report(self) -> dict[str, float]:
        """The diagnostics since :meth:`bind` (keys in the class docstring), as Python floats."""
        s = {k: float(v) for k, v in self._stats.items()}
        return {
            "factorized_steps": s.get("factorized_steps", 0.0),
            "gn_iterations_max": s.get("gn_max", 0.0),
            "gn_iterations_mean": s.get("gn_sum", 0.0) / max(s.get("gn_rows", 0.0), 1.0),
            "final_relative_residual_max": s.get("rel_max", 0.0),
            "converged": s.get("converged", 1.0),
            "invert_calls": s.get("invert_calls", 0.0),
            "linearized_calls": s.get("linearized_calls", 0.0),
        }
