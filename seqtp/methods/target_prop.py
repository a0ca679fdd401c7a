"""Target propagation through time by regularized inversion (Roulet & Harchaoui, TMLR 2023), for any cell: the
direct targets, the target rule through an inverse (``seqtp.inverses``) and the update (local or through time)."""

from __future__ import annotations

import torch

from .._cells import Cell, ElmanParams, activation_grad_from_output, make_cell
from ..inverses import SOLVERS, InverseSolver, check_mode, complete_states, make_solver
from .base import LossFn, Method, accumulate, hidden_states, loss_and_state_grad

UPDATES = ("local", "through_time")


def local_update_grads(
    params: ElmanParams, x: torch.Tensor, states: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the local TP loss, one batched computation over all steps (no sequential backward).

    ``L_loc = (1/B) sum_b sum_t 1/2 |phi(W h_{t-1} + U x_t + b) - v_t|^2`` with ``h_{t-1}`` and ``v_t = h_t +
    delta_t`` held constant. Since ``phi(W h_{t-1} + U x_t + b) = h_t``, the residual is ``-delta_t`` and
    ``dL_loc/dz_t = -delta_t * phi'(z_t) / B``.

    Args:
        params: the cell; x: ``[B, T, D]``; states: ``h_1 .. h_T`` ``[B, T, H]``; deltas: ``v - h`` ``[B, T, H]``.

    Returns:
        ``(dL/dU [H, D], dL/dW [H, H], dL/db [H])``; ``dL/db`` is the gradient of each of ``bias_ih``, ``bias_hh``.
    """
    g_z = activation_grad_from_output(states, params.nonlinearity).mul_(deltas).div_(-states.shape[0])  # [B, T, H]
    return local_update_grads_from_factor(x, states, g_z)


def local_update_grads_from_factor(
    x: torch.Tensor, states: torch.Tensor, g_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second half of :func:`local_update_grads`: the parameter gradients from ``g_z = dL_loc/dz`` ``[B, T, H]``
    (which a variant of the fused kernel writes directly, :func:`seqtp.kernels._triton.fused_local_factor`).

    Returns:
        ``(dL/dU [H, D], dL/dW [H, H], dL/db [H])``.
    """
    batch, seq_len, hidden = states.shape
    g_flat, h_flat = g_z.reshape(batch * seq_len, hidden), states.reshape(batch * seq_len, hidden)  # [B*T, H]
    g_ih = g_flat.T @ x.reshape(batch * seq_len, -1).to(g_z.dtype)  # [H, D]
    # dL/dW = sum_{b, t >= 1} g_z[b, t] h[b, t-1]^T without materializing the shifted states: in the flattened
    # [B*T, H] views row i pairs with row i - 1 (contiguous slices); the B - 1 wrong pairs (g_z[b, 0] with
    # h[b-1, T-1]) are subtracted; h_0 = 0 contributes nothing.
    g_hh = g_flat[1:].T @ h_flat[:-1].to(g_z.dtype)  # [H, H]
    if batch > 1:
        g_hh -= g_z[1:, 0].T @ states[:-1, -1].to(g_z.dtype)  # [H, H]
    return g_ih, g_hh, g_z.sum(dim=(0, 1))  # [H]


def local_update_loss(cell: Cell, x: torch.Tensor, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The local TP loss for any cell, one batched computation over all steps:
    ``(1/B) sum_b sum_t 1/2 |f(s_{t-1}, x_t; theta) - v_t|^2`` with ``s_{t-1}``, ``v_t`` constant.

    Args:
        cell: built with ``detach=False`` so that autograd reaches the module's parameters.
        x: ``[B, T, D]``; states: ``s_1 .. s_T`` ``[B, T, S]``; targets: ``v`` ``[B, T, S]``.
    """
    prev = torch.cat([cell.initial_state(states).unsqueeze(1), states[:, :-1]], dim=1)  # [B, T, S]: s_0 = 0
    pred = cell.step(prev, x)  # [B, T, S]: every step at once
    return 0.5 * (pred - targets).square().sum(dim=(1, 2)).mean()


class TargetProp(Method):
    """TP through time by regularized inversion (Roulet & Harchaoui, TMLR 2023), for any recurrent cell.

    1. Forward pass with the torch module (cuDNN on GPU); the state sequence ``s_1 .. s_T`` (``s = h``; LSTM:
       ``s = [h, c]``).
    2. Direct targets from the loss, per sample: ``dhat_t = -target_lr * dl_i/dh_t`` where ``l_i`` is sample ``i``'s
       loss (``= B * dL/dh_t`` for the batch-mean loss ``L``), so targets do not depend on the batch size. The
       readout gets its ordinary gradient of ``L``.
    3. Targets ``v_t = s_t + delta_t`` by :func:`seqtp.propagate_targets`'s rule ``mode`` with the inverse
       ``solver`` (``"auto"``: analytic for Elman, else dense or Gauss-Newton by the state size,
       :func:`seqtp.inverses.auto_solver_name`; or an ``InverseSolver`` instance). A
       ``trainable`` solver (the learned inverse) gets one training step per batch first (TPTT order).
    4. RNN gradient by ``update``: ``"local"``, the batch mean of ``sum_t 1/2 |f(s_{t-1}, x_t) - v_t|^2`` with
       ``s_{t-1}``, ``v_t`` constant (Elman: the closed form :func:`local_update_grads`; other cells: one batched
       autograd call; with ``AnalyticInverse(fuse_local_update=True)`` on the Triton kernel, the kernel accumulates
       the gradients itself and the shifts are never stored), or ``"through_time"``, the batch mean of
       ``sum_t 1/2 |s_t(theta) - v_t|^2`` back-propagated through the unrolled graph (the paper's public code).

    Both losses are batch means, so the learning rate and ``target_lr`` are independent of the batch size (the
    reference code mixes a batch mean with a batch sum).

    Args:
        reg: ``r > 0`` of the regularized inverse. target_lr: ``gamma_h``. mode: the target rule. update: as above.
        eps: clamp margin of ``atanh``. shift_cap: per-step cap ``|delta_t| <= shift_cap * |s_t|`` (``None``: off).
        solver: a name of ``seqtp.SOLVERS``, ``"auto"``, or an ``InverseSolver`` instance.
        solver_options: keyword options of the named solver (e.g. ``{"space": "output", "tol": 1e-6}``).
        normalize: Bengio (2020)'s normalization of each layer's change by its influence on the output, through time
            (:func:`influence_weights`): the update fits ``lambda_t * delta_t`` instead of ``delta_t``, with
            ``lambda_t = sum_{s >= t} |dhat_s|^2 / |delta_t|^2`` per sample. :meth:`targets` still returns the
            targets ``delta_t`` themselves.

    Stats: ``shift_first``, ``shift_mid``, ``shift_last``: batch mean of ``|delta_t|`` at ``t = 1, T/2, T``;
    ``feedback_loss`` for a learned inverse; the solver's report as ``solver_<key>``.
    """

    has_targets = True
    takes_solver_options = True
    config_defaults = {"lr": 0.05, "reg": 10.0, "target_lr": 1e-2, "update": "through_time"}
    search_space = ("lr=1e-3:1", "target_lr=1e-3:1", "reg=1e-1:1e2")

    def __init__(
        self,
        *,
        reg: float,
        target_lr: float,
        mode: str = "linearized",
        update: str = "local",
        eps: float = 1e-3,
        shift_cap: float | None = None,
        solver: str | InverseSolver = "auto",
        solver_options: dict | None = None,
        normalize: bool = False,
    ):
        check_mode(mode)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        if not target_lr > 0:
            raise ValueError(f"target_lr must be > 0, got {target_lr}")
        if shift_cap is not None and not shift_cap > 0:
            raise ValueError(f"shift_cap must be > 0, got {shift_cap}")
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if isinstance(solver, str) and solver != "auto" and solver not in SOLVERS:
            raise ValueError(f"solver must be one of auto, {', '.join(SOLVERS)}, got {solver!r} (unknown solver)")
        self.reg, self.target_lr, self.mode, self.update = reg, target_lr, mode, update
        self.eps, self.shift_cap, self.normalize = eps, shift_cap, bool(normalize)
        self.solver_name = solver if isinstance(solver, str) else None
        self.solver_options = dict(solver_options or {})
        self._solver = solver if isinstance(solver, InverseSolver) else None
        self._pending_state: dict | None = None

    def solver_for(self, cell: Cell) -> InverseSolver:
        """The solver instance (built at the first call, then kept: a learned inverse carries its weights)."""
        if self._solver is None:
            self._solver = make_solver(self.solver_name, cell=cell, reg=self.reg, eps=self.eps,
                                       **self.solver_options)
        return self._solver

    def state_dict(self) -> dict:
        solver = self._solver
        if solver is not None and solver.stateful:
            return {"solver": solver.state_dict()}
        return dict(self._pending_state or {})

    def load_state_dict(self, state: dict) -> None:
        if "solver" in state:
            if self._solver is not None and self._solver.stateful:
                self._solver.load_state_dict(state["solver"])
            else:  # loaded at the first backward, once the solver exists
                self._pending_state = state

    def targets(self, model, x, loss_fn):
        """Steps 1-3 of :meth:`backward` (the learned inverse's ``fit`` step included: it changes the solver's
        state, as :meth:`backward` does), without writing any ``.grad``; see :meth:`Method.targets`.

        Returns:
            ``(states, deltas)`` ``[B, T, S]`` each, ``v_t = s_t + delta_t``.

        Raises:
            ValueError: ``loss_fn(states)`` does not depend on the states. seqtp.FactorizationError: as
            :func:`seqtp.propagate_targets`.
        """
        with torch.enable_grad():
            _, _, cell, states, direct = self._direct_shifts(model, x, loss_fn, graph=False, readout_grad=False)
        solver = self._fit_and_bind(cell, x, states, {})
        return states, solver.propagate(direct, mode=self.mode, shift_cap=self.shift_cap)

    def _direct_shifts(
        self, model, x: torch.Tensor, loss_fn: LossFn, *, graph: bool, readout_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Cell, torch.Tensor, torch.Tensor]:
        """Steps 1-2: the forward pass (with its graph when ``graph``), the loss and the direct shifts ``dhat``.

        With ``readout_grad`` the loss is back-propagated into the readout's ``.grad`` too (one backward pass gives
        ``dL/dh_t`` and the readout's gradient); otherwise only ``dL/dh_t`` is computed.

        Returns:
            ``(hidden [B, T, H], loss, cell, states [B, T, S], direct [B, T, S])``.
        """
        with torch.set_grad_enabled(graph):
            hidden = hidden_states(model, x)  # [B, T, H]
        leaf = hidden.detach().requires_grad_()
        loss, dl_dh = loss_and_state_grad(loss_fn, leaf, readout_grad=readout_grad)
        cell = make_cell(model)
        direct_h = dl_dh.mul_(-self.target_lr * x.shape[0])  # [B, T, H]: dhat_t = -gamma_h * dl_i/dh_t, in place
        states, direct = complete_states(cell, x, leaf.detach(), direct_h)  # [B, T, S] each
        return hidden, loss, cell, states, direct

    def _fit_and_bind(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, stats: dict) -> InverseSolver:
        """The solver, after the learned inverse's training step (TPTT order; its loss into ``stats``), bound to
        this batch."""
        solver = self.solver_for(cell)
        if solver.trainable:
            if self._pending_state is not None:
                solver.bind(cell, x, states)  # creates the feedback weights, then restores them
                solver.load_state_dict(self._pending_state["solver"])
                self._pending_state = None
            stats["feedback_loss"] = torch.as_tensor(solver.fit(cell, x, states))
        solver.bind(cell, x, states)
        return solver

    def backward(self, model, x, loss_fn):
        through_time = self.update == "through_time"
        hidden, loss, cell, states, direct = self._direct_shifts(model, x, loss_fn, graph=through_time,
                                                                 readout_grad=True)
        stats = {}
        solver = self._fit_and_bind(cell, x, states, stats)
        seq_len = states.shape[1]
        steps = [0, seq_len // 2, seq_len - 1]  # the steps whose mean shift norm is reported
        fused = None
        if self.update == "local" and not self.normalize:  # a solver's fused fast path (None where it has none)
            fused = solver.propagate_local_update(direct, mode=self.mode, shift_cap=self.shift_cap)
        if fused is not None:  # the kernel accumulated the local update; delta itself never exists
            deltas, local_grads, row_norms = None, fused[:3], fused[3]  # [H, D], [H, H], [H]; [B, T]
            del direct
            norms = row_norms[:, steps].mean(dim=0)  # [3]
        else:
            deltas, local_grads = solver.propagate(direct, mode=self.mode, shift_cap=self.shift_cap), None  # [B, T, S]
            norms = deltas[:, steps].norm(dim=-1).mean(dim=0)  # [3]: three steps, not all T
            if self.normalize:
                weights = influence_weights(direct, deltas)  # [B, T]
                stats["normalize_weight_max"] = weights.amax()
                deltas = deltas * weights.unsqueeze(-1)  # [B, T, S]: the update fits lambda_t * delta_t
            del direct  # memory: the peak is states + deltas + one [B, T, S] temporary
        stats.update({"shift_first": norms[0], "shift_mid": norms[1], "shift_last": norms[2]})
        stats.update({f"solver_{k}": torch.as_tensor(v) for k, v in solver.report().items()})
        self._update(model, x, hidden, cell, states, deltas, local_grads)
        return loss.detach(), stats

    def _update(self, model, x: torch.Tensor, hidden: torch.Tensor, cell: Cell, states: torch.Tensor,
                deltas: torch.Tensor | None, local_grads: tuple | None) -> None:
        """Step 4: accumulate the RNN's gradient of the update loss into ``.grad``.

        Args:
            hidden: the forward outputs ``[B, T, H]`` (with their graph for ``through_time``); states, deltas:
                ``[B, T, S]`` (``deltas`` ``None`` when the fused kernel gave ``local_grads`` = ``(dU, dW, db)``).
        """
        if self.update == "through_time":
            graph_cell = make_cell(model, detach=False)
            full = graph_cell.full_states(x, hidden)  # [B, T, S] with the graph
            (0.5 * (full - (states + deltas)).square().sum(dim=(1, 2)).mean()).backward()
        else:
            local_update(model, x, cell, states, deltas, local_grads=local_grads)


def accumulate_local_grads(model, g_ih: torch.Tensor, g_hh: torch.Tensor, g_b: torch.Tensor) -> None:
    """Accumulate an Elman cell's local-update gradients (:func:`local_update_grads`) into ``.grad`` of the RNN of
    ``model`` (an :class:`seqtp.RNNModel` or a plain ``torch.nn.RNN``); both biases get ``g_b``."""
    rnn = getattr(model, "rnn", model)
    pairs = ((rnn.weight_ih_l0, g_ih), (rnn.weight_hh_l0, g_hh))
    if rnn.bias:
        pairs += ((rnn.bias_ih_l0, g_b), (rnn.bias_hh_l0, g_b))
    for p, g in pairs:
        accumulate(p, g)


def local_update(model, x: torch.Tensor, cell: Cell, states: torch.Tensor, deltas: torch.Tensor | None, *,
                 local_grads: tuple | None = None) -> None:
    """Accumulate the local TP update (the gradient of :func:`local_update_loss`) into the RNN's ``.grad``: Elman in
    closed form (:func:`local_update_grads`, or ``local_grads`` = ``(dU, dW, db)`` already computed by a fused
    kernel, then ``deltas`` may be ``None``), other cells by one batched autograd call.

    Args:
        x: ``[B, T, D]``; states, deltas: ``[B, T, S]``.
    """
    if cell.kind == "elman":  # closed form, no autograd
        if local_grads is None:
            local_grads = local_update_grads(cell.elman_params(), x, states, deltas)
        accumulate_local_grads(model, *local_grads)
    else:
        local_update_loss(make_cell(model, detach=False), x, states, states + deltas).backward()


def influence_weights(direct: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Per-step weights of Bengio's normalization through time: ``lambda_{b,t} = sum_{s >= t} |dhat_{b,s}|^2 /
    |delta_{b,t}|^2`` (0 where ``delta_{b,t} = 0``).

    Bengio, "Deriving Differential Target Propagation from Iterating Approximate Inverses", arXiv:2007.15139 (2020),
    proposes to normalize each layer's change by its influence on the output, so that more influential layers change
    more, as under gradient descent. Through time, step ``t`` is the layer; its target shift ``delta_t`` is (to first
    order, for an exact inverse) the change of ``s_t`` that produces the output shifts ``dhat_s``, ``s >= t``, so
    ``J_t delta_t = e_t`` with ``J_t`` the Jacobian of those outputs w.r.t. ``s_t``. The gain of step ``t`` along its
    target is ``|J_t delta_t| / |delta_t| = |e_t| / |delta_t|``: large where a small change of ``s_t`` moves the
    output a lot. Gradient descent moves ``s_t`` by ``J_t^T e_t``, of size ``~ gain * |e_t|``; a target shift has
    size ``|e_t| / gain``. Weighting the step's local loss by ``gain^2`` makes the fitted change ``lambda_t delta_t``
    of size ``gain * |e_t|``, as under gradient descent. Exact case: a linear cell with ``W = c Q`` (``Q``
    orthogonal) and a vanishing ``reg``: ``delta_t = (W^{-1})^k dhat_T`` and the BPTT adjoint ``(W^T)^k dhat_T``
    (``k = T - t``) are parallel, with norms ``c^{-k}`` and ``c^k`` times ``|dhat_T|``; ``lambda_t delta_t`` is the
    adjoint itself, so the normalized TP update is ``target_lr`` times BPTT's gradient. With ``e_t`` taken from the
    direct shifts, nothing is differentiated.

    Caveat: where ``delta_t`` is small because the inverse damps it (a large ``reg``), not because step ``t`` is
    influential, ``lambda_t`` undoes the damping (``lambda_t |delta_t| = |e_t|^2 / |delta_t|`` grows as ``delta_t``
    shrinks): use it with a small ``reg``.

    Args:
        direct: the direct shifts ``dhat`` ``[B, T, S]``; deltas: the propagated shifts ``delta`` ``[B, T, S]``.

    Returns:
        ``lambda`` ``[B, T]``.
    """
    reach = direct.square().sum(dim=-1).flip(1).cumsum(dim=1).flip(1)  # [B, T]: sum_{s >= t} |dhat_s|^2
    size = deltas.square().sum(dim=-1)  # [B, T]
    return torch.where(size > 0, reach / size.clamp_min(torch.finfo(size.dtype).tiny), 0.0)


def tp_backward(
    rnn: torch.nn.Module,
    x: torch.Tensor,
    loss_fn: LossFn,
    *,
    reg: float,
    target_lr: float,
    mode: str = "linearized",
    update: str = "local",
    solver: str | InverseSolver = "auto",
    eps: float = 1e-3,
    shift_cap: float | None = None,
    solver_options: dict | None = None,
    normalize: bool = False,
) -> float:
    """Drop-in TP replacement for ``loss.backward()`` on a plain single-layer ``torch.nn.RNN``/``GRU``/``LSTM``.

    Fills ``.grad`` of the RNN's parameters by target propagation through time (regularized inversion, Roulet &
    Harchaoui, TMLR 2023; see :class:`TargetProp`) and of every parameter ``loss_fn`` uses (e.g. the user's
    readout) by their ordinary gradient; any ``torch.optim`` optimizer can then step. Gradients accumulate, as with
    ``loss.backward()``.

    Args:
        rnn: ``torch.nn.RNN`` (tanh or relu), ``GRU`` or ``LSTM``; one layer, unidirectional, ``batch_first=True``.
        x: inputs ``[B, T, D]``.
        loss_fn: ``states [B, T, H] -> scalar``, the readout and the loss as a batch mean.
        reg, target_lr, mode, update, solver, eps, shift_cap, solver_options, normalize: as in :class:`TargetProp`.
            A stateful solver (``"learned"``) must be passed as an instance so that it keeps its weights between
            calls.

    Returns:
        The loss value (a float).

    Raises:
        TypeError: not an RNN/GRU/LSTM module. ValueError: multi-layer, bidirectional, ``batch_first=False``,
        LSTM ``proj_size > 0``, or bad options.
    """
    make_cell(rnn)  # validates the module before any work
    if solver == "learned":
        raise ValueError("solver='learned' keeps trained weights between calls: pass a seqtp LearnedInverse "
                         "instance, or use seqtp.TargetProp(solver='learned') and keep it")
    method = TargetProp(reg=reg, target_lr=target_lr, mode=mode, update=update, eps=eps, shift_cap=shift_cap,
                        solver=solver, solver_options=solver_options, normalize=normalize)
    loss, _ = method.backward(rnn, x, loss_fn)
    return loss.item()

