"""The regularized inverse of a GRU, LSTM or Elman step with exact per-row Jacobians: CG or batched Cholesky.

Math core: imports only torch. Device and dtype follow the inputs.

Target propagation through time (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023)
maps a target ``v`` of ``s_t`` to a target of ``s_{t-1}`` through the regularized inverse of the step
``s_t = f(s_{t-1}, x_t)``, here in the output space (the objective of :class:`seqtp.GaussNewtonInverse` with
``space="output"``)::

    psi_t(v) = argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2.

Its linearization at ``v = s_t`` is ``(J_t^T J_t + r I)^{-1} J_t^T delta`` with ``J_t = df/ds (s_{t-1}, x_t)``
``[S, S]`` per batch row. The forward states are known, so every ``J_t`` is built for all steps (and rows) at once,
before the sequential recursion. By default (``linear_solver="cg"``) ``J_t`` stays matrix-free (its diagonals,
:class:`StepOperator`) and each step of the recursion is a few batched CGLS iterations (:func:`cgls`) to a relative
residual ``cg_tol``; with ``"cholesky"`` the Cholesky factors of every ``J_t^T J_t + r I`` are also built at once and
each step is a batched pair of triangular solves.

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

from .._cells import Cell
from .analytic import FactorizationError
from .base import InverseSolver, fold_stats

LINEAR_SOLVERS = ("cg", "cholesky")
"""The solvers of the linearized rule of :class:`DenseInverse`."""


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


class StepOperator(NamedTuple):
    """``J = df/ds`` ``[N, S, S]`` at ``N`` rows as the operator ``J = D_s + D_g W_hh E_h`` of the cells of
    :data:`seqtp.CELLS` (module docstring), never formed: ``ds`` ``[N, nb(in), nb(out), H]`` the diagonals of
    ``d f / d s`` with the gates held fixed, ``dg`` ``[N, G, nb(out), H]`` the diagonals of ``d f / d g``, and
    ``w_hh`` ``[G*H, H]``, so that ``J[n, o*H + i, k*H + j] = [i = j] ds[n, k, o, i] + [k = 0] sum_g dg[n, g, o, i]
    W_hh[g*H + i, j]``. Each product costs ``O(S (nb + G))`` per row and one ``[N, G*H] x [G*H, H]`` matmul.
    ``diag_t`` ``[N, nb(out), nb + G, H]``, optional, holds both, ``diag_t[n, o, k] = ds[n, k, o]`` for ``k < nb``
    and ``dg[n, k - nb, o]`` after (:func:`step_operator` makes ``ds`` and ``dg`` views of it; :func:`cgls` builds it
    when absent)."""

    ds: torch.Tensor
    dg: torch.Tensor
    w_hh: torch.Tensor
    diag_t: torch.Tensor | None = None

    def rows(self, index: slice) -> StepOperator:
        """The operator of the rows ``index``."""
        diag_t = None if self.diag_t is None else self.diag_t[index]
        return StepOperator(self.ds[index], self.dg[index], self.w_hh, diag_t)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` ``[N, S]`` for ``v`` ``[N, S]``."""
        n_rows, n_blocks, _, hidden = self.ds.shape
        v3 = v.view(n_rows, n_blocks, 1, hidden)  # [N, nb(in), 1, H]
        gates = (v[:, :hidden] @ self.w_hh.T).view(n_rows, -1, 1, hidden)  # [N, G, 1, H]: W_g v_h
        out = self.ds[:, 0] * v3[:, 0]  # [N, nb(out), H]
        for k in range(1, n_blocks):
            out.addcmul_(self.ds[:, k], v3[:, k])
        for g in range(gates.shape[1]):
            out.addcmul_(self.dg[:, g], gates[:, g])
        return out.view(n_rows, n_blocks * hidden)

    def apply_t(self, w: torch.Tensor) -> torch.Tensor:
        """``J^T w`` ``[N, S]`` for ``w`` ``[N, S]``."""
        n_rows, n_blocks, _, hidden = self.ds.shape
        w3 = w.view(n_rows, 1, n_blocks, hidden)  # [N, 1, nb(out), H]
        out = self.ds[:, :, 0] * w3[:, :, 0]  # [N, nb(in), H]
        gates = self.dg[:, :, 0] * w3[:, :, 0]  # [N, G, H]: sum_o dg[n, g, o, i] w[n, o, i]
        for o in range(1, n_blocks):
            out.addcmul_(self.ds[:, :, o], w3[:, :, o])
            gates.addcmul_(self.dg[:, :, o], w3[:, :, o])
        out_h = torch.addmm(out[:, 0], gates.view(n_rows, -1), self.w_hh)  # [N, H]: + sum_{g, i} W_g[i, j] (...)
        if n_blocks == 1:
            return out_h
        return torch.cat([out_h, out[:, 1:].reshape(n_rows, -1)], dim=-1)  # [N, S]


def step_operator(cell: Cell, state: torch.Tensor, x: torch.Tensor) -> StepOperator:
    """``J = d f(s, x) / d s`` at each row of ``state`` ``[N, S]``, ``x`` ``[N, D]`` (rows independent), as the
    matrix-free :class:`StepOperator`.

    ``ds[n, k] = d f / d s`` along the all-ones tangent of state block ``k`` (``g`` held fixed) and ``dg[n, g]``
    along the all-ones tangent of gate block ``g``, from ``nb + G`` forward-mode products (``torch.func.jvp``
    batched with ``torch.func.vmap``) of the whole batch: exact for the unit-wise cells described in the module
    docstring.

    Args:
        cell: an Elman, GRU or LSTM :class:`~seqtp._cells.Cell`. state: ``[N, S]``. x: ``[N, D]``.

    Returns:
        The :class:`StepOperator` of the ``N`` rows.

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
    diag_t = dirs.view(n_blocks + n_gates, n_rows, n_blocks, hidden).permute(1, 2, 0, 3).contiguous()
    diag = diag_t.transpose(1, 2)  # [N, nb + G, nb(out), H] (a view of diag_t [N, nb(out), nb + G, H])
    return StepOperator(diag[:, :n_blocks], diag[:, n_blocks:], w_hh, diag_t)


def step_jacobian(cell: Cell, state: torch.Tensor, x: torch.Tensor) -> Linearization:
    """``J = d f(s, x) / d s`` at each row of ``state`` ``[N, S]``, ``x`` ``[N, D]`` (rows independent), in block form.

    ``J[n, o*H + i, k*H + j] = [i = j] ds[n, k, o, i] + [k = 0] sum_g dg[n, g, o, i] W_hh[g*H + i, j]`` with the
    diagonals of :func:`step_operator`.

    Args:
        cell: an Elman, GRU or LSTM :class:`~seqtp._cells.Cell`. state: ``[N, S]``. x: ``[N, D]``.

    Returns:
        The :class:`Linearization` (``.dense()`` is ``J`` ``[N, S, S]``).

    Raises:
        ValueError: a state of more than two blocks of ``H`` (no such cell in :data:`seqtp.CELLS`).
    """
    ds, dg, w_hh, _ = step_operator(cell, state, x)
    n_rows, n_blocks, _, hidden = ds.shape
    w_units = w_hh.reshape(-1, hidden, hidden)  # [G, H(i), H(j)]
    # the columns of h: sum_g dg[n, g, o, i] W_g[i, j] + [i = j] ds[n, 0, o, i], by broadcast products (a batched
    # matmul over units with an inner size G is far slower on the CPU)
    jac_h = dg[:, 0, ..., None] * w_units[0]  # [N, nb(out), H(i), H(j)]
    for g in range(1, w_units.shape[0]):
        jac_h.addcmul_(dg[:, g, ..., None], w_units[g])
    jac_h.diagonal(dim1=-2, dim2=-1).add_(ds[:, 0])
    c_diag = ds[:, 1].reshape(n_rows, n_blocks * hidden) if n_blocks == 2 else None  # [N, S]: d f / d c
    return Linearization(jac_h.reshape(n_rows, n_blocks * hidden, hidden), c_diag)


def cgls(op: StepOperator, delta: torch.Tensor, reg: float, *, tol: float, max_iter: int,
         check_every: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(J^T J + r I)^{-1} J^T delta`` ``[N, S]`` by conjugate gradient on the regularized least-squares problem
    ``min_u |J u - delta|^2 + r |u|^2`` (CGLS, Hestenes-Stiefel; Bjorck, "Numerical Methods for Least Squares
    Problems", 1996, Sec. 7.4), rows independent, from ``u_0 = 0``::

        q_k = J p_k, alpha_k = |s_k|^2 / (|q_k|^2 + r |p_k|^2), u_{k+1} = u_k + alpha_k p_k,
        z_{k+1} = z_k - alpha_k q_k, s_{k+1} = J^T z_{k+1} - r u_{k+1}, p_{k+1} = s_{k+1} + |s_{k+1}|^2 / |s_k|^2 p_k

    with ``z_0 = delta``, ``s_0 = p_0 = J^T delta`` (``s_k`` the residual of the normal equations). Two operator
    products per iteration. The error obeys ``|u_k - u*| <= |s_k| / r`` and ``|u*| >= |s_0| / (|J|^2 + r)``, so
    ``|u_k - u*| / |u*| <= (|J|^2 + r) / r * |s_k| / |s_0|``. Iterating far past the roundoff level of ``|s_k|``
    (``tol`` below a few ``eps``) loses the conjugacy and the accuracy.

    Args:
        op: the :class:`StepOperator` ``[N]``. delta: ``[N, S]``. reg: ``r > 0``. tol: stop once every row has
            ``|s_k| <= tol |s_0|`` (rows with ``s_0 = 0`` at once; a row that meets it keeps its ``u_k``), checked
            every ``check_every`` iterations (one host sync per check). max_iter: the most iterations.

    Returns:
        ``(u, relative_residual, iterations)``: ``u`` ``[N, S]``, ``|s_k| / |s_0|`` ``[N]`` (0 where ``s_0 = 0``) and
        the iterations run.
    """
    # J v = sum_k diag[:, k] * lift(v)_k with lift(v) = (v_1..v_nb, W_hh v_h) [N, K, H], K = nb + G, and
    # J^T w = t_s + [h] t_g W_hh with t = sum_o diag[:, :, o] * w_o [N, K, H]; every buffer and view is made once
    n_rows, n_blocks, _, hidden = op.ds.shape
    size = n_blocks * hidden
    diag_t = op.diag_t  # [N, nb(out), K, H]
    if diag_t is None:
        diag_t = torch.cat([op.ds, op.dg], dim=1).transpose(1, 2).contiguous()
    n_terms = diag_t.shape[2]
    diag_o = diag_t.unbind(1)  # nb x [N, K, H]
    w_t = op.w_hh.T  # [H, G*H]
    lifted = delta.new_empty(n_rows, n_terms, hidden)  # [N, K, H]: lift(p), or the terms t of J^T z
    lifted_2d = lifted.view(n_rows, n_terms * hidden)  # [N, K*H]
    lifted_s, lifted_g, lifted_h = lifted_2d[:, :size], lifted_2d[:, size:], lifted[:, 0]  # [N, S], [N, G*H], [N, H]
    lifted_b = lifted.unsqueeze(1)  # [N, 1, K, H]
    terms = delta.new_empty(n_rows, n_blocks, n_terms, hidden)  # [N, nb(out), K, H]
    q = delta.new_empty(n_rows, size)  # [N, S]: J p
    q_3 = q.view(n_rows, n_blocks, hidden)  # [N, nb(out), H]
    s = delta.new_empty(n_rows, size)  # [N, S]: J^T z - r u
    s_h, s_c, lifted_c = s[:, :hidden], s[:, hidden:], lifted_2d[:, hidden:size]  # [N, H], [N, S - H], [N, S - H]
    z = delta.clone()  # [N, S]
    z_o = [z[:, o * hidden : (o + 1) * hidden].unsqueeze(1) for o in range(n_blocks)]  # nb x [N, 1, H]
    p = torch.empty_like(delta)  # [N, S]
    p_h = p[:, :hidden]  # [N, H]

    def apply_t() -> None:  # s = J^T z
        torch.mul(diag_o[0], z_o[0], out=lifted)  # [N, K, H]
        for o in range(1, n_blocks):
            lifted.addcmul_(diag_o[o], z_o[o])
        if n_blocks > 1:
            s_c.copy_(lifted_c)
        torch.addmm(lifted_h, lifted_g, op.w_hh, out=s_h)  # [N, H]

    apply_t()  # J^T delta
    norm0 = torch.linalg.vector_norm(s, dim=-1, keepdim=True)  # [N, 1]
    scale = torch.where(norm0 > 0, norm0, 1.0)  # [N, 1]: each row solved for delta / |J^T delta| (no underflow)
    z.div_(scale)
    s.div_(scale)
    p.copy_(s)
    u = torch.zeros_like(delta)
    gamma = torch.linalg.vecdot(s, s).unsqueeze(-1)  # [N, 1]: 1, or 0 where J^T delta = 0
    threshold = tol * tol
    tiny = torch.finfo(delta.dtype).tiny
    denom = delta.new_empty(n_rows)  # [N]
    alpha = delta.new_empty(n_rows, 1)  # [N, 1]
    denom_1 = denom.unsqueeze(-1)  # [N, 1]
    k = 0
    while k < max_iter:
        gamma_on = torch.where(gamma > threshold, gamma, 0.0)  # [N, 1]: 0 on the met rows (which keep their u)
        if k % check_every == 0 and not (n_rows and gamma_on.max().item() > 0):  # host sync per check_every steps
            break
        lifted_s.copy_(p)  # q = J p
        torch.mm(p_h, w_t, out=lifted_g)  # [N, G*H]
        torch.mul(diag_t, lifted_b, out=terms)  # [N, nb(out), K, H]
        torch.sum(terms, dim=2, out=q_3)
        torch.linalg.vecdot(q, q, out=denom)
        denom.add_(torch.linalg.vecdot(p, p), alpha=reg).clamp_min_(tiny)  # |q|^2 + r |p|^2
        torch.div(gamma_on, denom_1, out=alpha)  # [N, 1]
        u.addcmul_(alpha, p)
        z.addcmul_(alpha, q, value=-1)
        apply_t()
        s.sub_(u, alpha=reg)
        gamma_next = torch.linalg.vecdot(s, s).unsqueeze(-1)  # [N, 1]
        torch.addcmul(s, gamma_next / gamma.clamp_min_(tiny), p, out=p)  # p = s + |s_{k+1}|^2 / |s_k|^2 p
        gamma = gamma_next
        k += 1
    return u.mul_(scale), gamma.squeeze(-1).sqrt(), k


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
    """The output-space regularized inverse with exact per-row Jacobians: CG or batched Cholesky solves.

    ``psi_t(v) = argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2`` (Roulet & Harchaoui, TMLR 2023; the objective of
    :class:`seqtp.GaussNewtonInverse` with ``space="output"``), for the cells of :data:`seqtp.CELLS` (Elman, GRU,
    LSTM with ``s = [h, c]``):

    - ``linearized``: ``J_psi_t(s_t) delta = (J_t^T J_t + r I)^{-1} J_t^T delta``, ``J_t = df/ds (s_{t-1}, x_t)``.
      ``linear_solver="cg"``: the diagonals of the matrix-free ``J_t`` (:func:`step_operator`) are built for all
      rows and steps at once, then each step runs :func:`cgls` (two products with ``J_t`` per iteration) until
      ``|s_k| <= cg_tol |s_0|`` per row (normal-equation residual ``s_k``; relative error at most
      ``(|J_t|^2 + r) / r`` times that). ``"cholesky"``: the Jacobians (:func:`step_jacobian`) and the Cholesky
      factors of ``J_t^T J_t + r I`` are built for all rows and steps at once, then each step is a mat-vec and two
      batched triangular solves. Both build in chunks of steps of at most ``chunk_bytes`` per tensor, latest steps
      first, so that the backward recursion finds them ready.
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
            decrease stops). chunk_bytes: the largest Jacobian chunk ``[B, steps, S, S]`` (CG: its diagonals), in
            bytes (at least one step is taken). linear_solver: ``"cg"`` or ``"cholesky"`` (:data:`LINEAR_SOLVERS`),
            for the linearized rule (:meth:`invert` always factorizes). cg_tol: the relative normal-equation residual
            of CG, ``>= 0``; ``None``: ``16 eps`` of the dtype. cg_max_iter: CG iterations at most, ``>= 1``.
            cg_check_every: CG iterations between convergence checks (host syncs); ``None``: 1 on the CPU, 4 else.

    Raises:
        ValueError: ``reg <= 0`` or an option out of range.
        seqtp.FactorizationError (CPU): a Cholesky factorization failed or (CG) a Jacobian is non-finite.

    :meth:`report` (after :meth:`propagate`; reset at :meth:`bind`): ``factorized_steps`` (steps whose Jacobians
    were built, and factorized for Cholesky), ``cg_iterations_max``, ``cg_iterations_mean`` (per linearized call),
    ``cg_relative_residual_max`` (the largest final ``|s_k| / |s_0|``), ``gn_iterations_max``,
    ``gn_iterations_mean`` (per row of each :meth:`invert` call), ``final_relative_residual_max`` (the largest
    final convergence measure of :meth:`invert`),
    ``converged`` (1.0 if every row met ``tol``), ``invert_calls``, ``linearized_calls``.
    """

    config_options = ("tol", "max_iter")

    def __init__(self, *, reg: float, tol: float = 1e-6, max_iter: int = 20, max_backtracks: int = 30,
                 chunk_bytes: int = 2**28, linear_solver: str = "cg", cg_tol: float | None = None,
                 cg_max_iter: int = 200, cg_check_every: int | None = None):
        super().__init__(reg=reg)
        if linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
        if cg_tol is not None and not cg_tol >= 0:
            raise ValueError(f"cg_tol must be >= 0 or None, got {cg_tol}")
        checked = (("cg_max_iter", cg_max_iter), ("cg_check_every", 1 if cg_check_every is None else cg_check_every))
        for key, value in checked:
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value}")
        self.linear_solver, self.cg_tol = linear_solver, None if cg_tol is None else float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        self.cg_check_every = None if cg_check_every is None else int(cg_check_every)
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
        self._op_chunk: tuple[int, int, int, StepOperator] | None = None  # (first step, end, B, operator)
        self._stats: dict[str, float | torch.Tensor] = {}
        return self

    # -- the factors of the linearization at s_{t-1} -------------------------------------------------------------

    def _steps_per_chunk(self, row_numbers: int | None = None) -> int:  # row_numbers: per row and step, S^2 if None
        batch, _, size = self.states.shape
        row_numbers = size * size if row_numbers is None else row_numbers
        return max(1, self.chunk_bytes // (batch * row_numbers * self.states.element_size()))

    def operators(self, t: int) -> StepOperator:
        """The :class:`StepOperator` ``[B]`` of ``J_t`` at ``(s_{t-1}, x_t)``, from the chunk of steps ending at ``t``
        (built for all its steps and rows at once when ``t`` is outside the current chunk).

        Raises:
            seqtp.FactorizationError: on the CPU, non-finite Jacobians (one host sync per chunk).
        """
        chunk = self._op_chunk
        if chunk is None or not chunk[0] <= t < chunk[1]:
            size, hidden = self.states.shape[-1], self.cell.hidden_size
            n_gates = self.cell.params["weight_hh_l0"].shape[0] // hidden
            first = max(1, t + 1 - self._steps_per_chunk((size // hidden + n_gates) * size))
            prev = self.prev[:, first : t + 1].transpose(0, 1)  # [C, B, S]: step-major, so a step is contiguous
            steps, batch, size = prev.shape
            with torch.no_grad():
                op = step_operator(self.cell, prev.reshape(steps * batch, size),
                                   self.x[:, first : t + 1].transpose(0, 1).reshape(steps * batch, -1))  # [C*B]
            if not op.ds.is_cuda and not bool(torch.isfinite(op.ds).all() & torch.isfinite(op.dg).all()):
                raise FactorizationError(f"non-finite Jacobians of the steps {first}..{t} (reg={self.reg})")
            chunk = self._op_chunk = (first, t + 1, batch, op)
            fold_stats(self._stats, factorized_steps=float(steps))
        first, _, batch, op = chunk
        return op.rows(slice((t - first) * batch, (t - first + 1) * batch))

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
            fold_stats(self._stats, factorized_steps=float(steps))
        first, _, batch, factor = chunk
        rows = slice((t - first) * batch, (t - first + 1) * batch)
        lin = factor.lin
        c_diag = None if lin.c_diag is None else lin.c_diag[rows]
        q = None if factor.q is None else factor.q[rows]
        return Factor(Linearization(lin.jac_h[rows], c_diag), factor.chol[rows], q)

    def linearized(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``(J_t^T J_t + r I)^{-1} J_t^T delta`` ``[B, S]``: by :func:`cgls` with the matrix-free ``J_t``
        (``linear_solver="cg"``) or with the precomputed Cholesky factor (``"cholesky"``)."""
        fold_stats(self._stats, linearized_calls=1.0)
        with torch.no_grad():
            if self.linear_solver == "cholesky":
                return self.factors(t).linearized(delta)
            tol = 16 * torch.finfo(delta.dtype).eps if self.cg_tol is None else self.cg_tol
            u, rel, iters = cgls(self.operators(t), delta, self.reg, tol=tol, max_iter=self.cg_max_iter,
                                 check_every=self.cg_check_every or (1 if delta.device.type == "cpu" else 4))
            fold_stats(self._stats, cg_sum=float(iters), cg_calls=1.0, cg_max=float(iters), cg_rel_max=rel.max())
            return u

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
            fold_stats(self._stats, invert_calls=1.0, gn_sum=steps.sum(), gn_rows=float(rows), gn_max=steps.max(),
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

    def report(self) -> dict[str, float]:
        """The diagnostics since :meth:`bind` (keys in the class docstring), as Python floats."""
        s = {k: float(v) for k, v in self._stats.items()}
        return {
            "cg_iterations_max": s.get("cg_max", 0.0),
            "cg_iterations_mean": s.get("cg_sum", 0.0) / max(s.get("cg_calls", 0.0), 1.0),
            "cg_relative_residual_max": s.get("cg_rel_max", 0.0),
            "factorized_steps": s.get("factorized_steps", 0.0),
            "gn_iterations_max": s.get("gn_max", 0.0),
            "gn_iterations_mean": s.get("gn_sum", 0.0) / max(s.get("gn_rows", 0.0), 1.0),
            "final_relative_residual_max": s.get("rel_max", 0.0),
            "converged": s.get("converged", 1.0),
            "invert_calls": s.get("invert_calls", 0.0),
            "linearized_calls": s.get("linearized_calls", 0.0),
        }
