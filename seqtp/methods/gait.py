"""GAIT-prop through time for Elman RNNs (Ahmad, van Gerven & Ambrogioni, "GAIT-prop: A biologically plausible
learning rule derived from backpropagation of error", NeurIPS 2020), math core: imports only torch.

Targets travel backwards through the exact inverse of each step (no regularization) as small, gradient-adjusted
increments of the forward states; for orthogonal recurrent weights the local update they give tends to
``target_lr`` times the BPTT gradient as the increment ``gamma -> 0``. See :class:`GAITProp` for the derivation. The
method is composed of parts: the exact inverse (:class:`~seqtp.inverses.ExactInverse`), GAIT's target rule
(:class:`~seqtp.inverses.GaitRule`), the local update (:func:`seqtp.local_update_grads`) and the orthogonality
penalty; ``TargetProp(solver="exact", mode="gait", update="local")`` is the same method without penalty and clip.
"""

from __future__ import annotations

import torch

from .._cells import ElmanParams, make_cell
from ..inverses import ExactInverse, GaitRule, inverse_increment, inverse_weight
from .base import Method, hidden_states, loss_and_state_grad
from .target_prop import accumulate_local_grads, local_update_grads

__all__ = ["GAITProp", "gait_errors", "inverse_increment", "inverse_weight"]


def gait_errors(
    cell, x: torch.Tensor, states: torch.Tensor, direct: torch.Tensor, *, gamma: float, eps: float = 1e-3
) -> torch.Tensor:
    """The rescaled GAIT-prop errors ``eps_t`` of every step (the target shifts are ``gamma * eps_t``): GAIT's rule
    (:class:`~seqtp.inverses.GaitRule`) through the exact inverse (:class:`~seqtp.inverses.ExactInverse`).

    ``eps_T = dhat_T`` and, for ``t = T .. 2``,
    ``eps_{t-1} = W^{-1} (a(h_t + gamma phi'(z_t)^2 eps_t) - a(h_t)) / gamma + dhat_{t-1}``,
    with ``a(h_t) = z_t = W h_{t-1} + U x_t + b`` (see :class:`GAITProp`); entries below
    :func:`~seqtp.inverses.flush_floor` are zeroed, as in every target recursion
    (:func:`~seqtp.inverses.backward_recursion`).

    Args:
        cell: the Elman step (:func:`seqtp.make_cell`); x: ``[B, T, D]``; states: ``h_1 .. h_T`` ``[B, T, H]``;
            direct: ``dhat`` ``[B, T, H]`` (zero at steps without a loss term); gamma: the increment; eps: clamp margin
            of ``atanh``.

    Returns:
        ``eps`` ``[B, T, H]``.

    Raises:
        seqtp.FactorizationError: as :func:`inverse_weight`.
    """
    solver = ExactInverse(eps=eps).bind(cell, x, states)
    return solver.propagate(direct, mode=GaitRule(gamma))


class GAITProp(Method):
    """GAIT-prop through time (Ahmad, van Gerven & Ambrogioni, NeurIPS 2020) for Elman cells, one step per layer.

    Step ``t`` is ``h_t = phi(z_t)``, ``z_t = W h_{t-1} + U x_t + b``; its exact inverse is
    ``psi_t(v) = W^{-1} (a(v) - U x_t - b)`` (``a = phi^{-1}``, ``psi_t(h_t) = h_{t-1}``).

    1. Forward pass; direct targets ``dhat_t = -target_lr * dl_i/dh_t`` (per-sample loss, as
       :class:`seqtp.TargetProp`; zero at steps without a loss term); the readout gets its ordinary gradient.
    2. Rescaled errors (:func:`gait_errors`): ``eps_T = dhat_T`` and
       ``eps_{t-1} = [psi_t(h_t + gamma phi'(z_t)^2 eps_t) - psi_t(h_t)] / gamma + dhat_{t-1}``
       ``= W^{-1} (a(h_t + gamma phi'(z_t)^2 eps_t) - z_t) / gamma + dhat_{t-1}``. The targets are
       ``v_t = h_t + gamma eps_t``: each step's target is an increment ``gamma`` times an error of order one, so
       nothing underflows however long the sequence (GAIT's literal targets are ``gamma^{T-t}`` times smaller).
    3. Update: the local update (:func:`seqtp.local_update_grads`) of the targets ``v_t``, divided by ``gamma``,
       i.e. :func:`seqtp.local_update_grads` with the shifts ``eps_t``: ``dL/dz_t = -phi'(z_t) eps_t / B``,
       ``dW = sum_t dL/dz_t h_{t-1}^T``, ``dU = sum_t dL/dz_t x_t^T``, ``db = sum_t dL/dz_t`` (batch sums).
       With ``ortho_penalty = lambda > 0`` the gradient ``lambda (W W^T - I) W`` of the soft orthogonality penalty
       ``(lambda / 4) |W W^T - I|_F^2`` is added to ``weight_hh``'s gradient (the paper's regularizer, which keeps
       ``W`` near the orthogonal matrices where the theorem below holds).

    Why the update tends to ``target_lr`` times BPTT's gradient (GAIT's theorem, per step). BPTT's adjoint of the
    per-sample loss is ``lambda_{t-1} = J_t^T lambda_t + dl/dh_{t-1}|direct`` with ``J_t = dh_t/dh_{t-1} =
    diag(phi'(z_t)) W``, so ``J_t^T lambda = W^T (phi'(z_t) * lambda)``. Since ``a'(h_t) = 1 / phi'(z_t)``,
    ``a(h_t + d) - a(h_t) = d / phi'(z_t) + a''(h_t) d^2 / 2 + O(d^3)``; with ``d = gamma phi'(z_t)^2 eps_t``,
    ``eps_{t-1} = W^{-1} (phi'(z_t) * eps_t) + (gamma / 2) W^{-1} (a''(h_t) phi'(z_t)^4 eps_t^2) + O(gamma^2) +
    dhat_{t-1}``. One factor ``phi'`` of the square cancels ``a'``; the other is ``J_t``'s: the rule applies
    ``J_t^{-1} diag(phi'^2) = W^{-1} diag(phi')``, which is ``J_t^T`` exactly when ``W^{-1} = W^T``. (Plain TP with
    the exact inverse applies ``J_t^{-1} = W^{-1} diag(1 / phi')`` instead, which differs from ``J_t^T`` even for an
    orthogonal ``W`` unless ``phi' = 1``.) ``phi'`` is evaluated at the forward pre-activation ``z_t`` of the step
    being inverted (``1 - h_t^2`` for tanh). By induction from ``eps_T = dhat_T = -target_lr dl/dh_T``, for
    orthogonal ``W``: ``eps_t = -target_lr lambda_t + O(gamma)``, and, the update being linear in ``eps``,
    ``dL/dz_t = target_lr phi'(z_t) lambda_t / B + O(gamma)`` is ``target_lr`` times BPTT's ``dL/dz_t`` for the
    batch-mean loss: the update is ``target_lr * dL/dtheta + O(gamma)``. The ``O(gamma)`` term comes from ``a''``
    (tanh: ``a''(h) = 2h / (1 - h^2)^2``, so the first correction to ``eps_{t-1}`` is
    ``gamma W^T (h_t phi'(z_t)^2 eps_t^2)``, carried through the earlier steps); its constant depends on the
    instance (on ``|h_t|`` and ``|eps_t|``; relative to the update it scales with ``gamma * target_lr``). With
    ``phi`` the identity (``a'' = 0``) the rule is exact for every ``gamma``; with relu it is exact once
    ``gamma |eps_t| < h_t`` on the active units. Non-orthogonal ``W``: ``eps_{t-1} -> W^{-1} (phi' * eps_t)``
    instead of ``W^T (phi' * eps_t)``, so the update leaves BPTT's direction.

    Corrections to a literal reading of the rule. (i) The last step's error is ``eps_T = dhat_T``, not
    ``dhat_T / gamma``: the increment at ``T`` must be of order ``gamma`` for the linearization, and the update is
    linear in ``eps``, so ``dhat / gamma`` would give ``target_lr / gamma`` times the gradient and a step that does
    not shrink with ``gamma``. Likewise the loss term of an earlier step adds ``dhat_t`` to ``eps_t``. This is the
    authors' code: the top layer's error is the unscaled output error, each lower layer's is rescaled by
    ``1 / gamma`` per layer. (ii) ``psi_t(v) - psi_t(h_t)`` is used for ``psi_t(v) - h_{t-1}``: the same in exact
    arithmetic (``a(h_t) = z_t``), but computed by :func:`inverse_increment` without cancellation (the literal
    difference ``a(h_t + d) - z_t`` loses ``ulp / gamma`` relative precision, 1e-4 in float32 at ``gamma = 1e-3``)
    and free of the reconstruction error ``a(h_t) - z_t != 0`` where the ``atanh`` clamp binds (``|z_t| >
    atanh(1 - eps)``), which ``1 / gamma`` would amplify; there both the clamped rule and BPTT pass almost nothing
    (``phi' <= 2 eps``).

    ``W^{-1}`` comes from one LU factorization per :meth:`backward` (:func:`inverse_weight`). Steps 2-3 are
    ``TargetProp(solver=ExactInverse(eps=eps), mode=GaitRule(gamma), update="local")`` (tested); this class adds the
    penalty, the clip and the shifts ``gamma eps_t`` of :meth:`targets`.

    Args:
        target_lr: ``> 0``, the scale of the direct targets; the update tends to ``target_lr`` times the BPTT
            gradient, so ``target_lr = 1`` (default) makes the optimizer's ``lr`` that of BPTT.
        gamma: ``> 0``, the increment: the targets are ``gamma`` times an error of order one. The update differs
            from its orthogonal-``W`` limit ``target_lr * dL/dtheta`` by ``O(gamma * target_lr)`` (relative
            ``5e-4`` on the tests' instance at the default ``1e-3``, the authors' value). A smaller ``gamma`` costs
            no precision: the increments are computed without cancellation (:func:`inverse_increment`) and the
            errors are rescaled at every step, so in float32 the update stays at rounding level (``2e-7`` relative
            to float32 BPTT at ``gamma = 1e-20``).
        ortho_penalty: ``lambda >= 0`` of the penalty ``(lambda / 4) |W W^T - I|_F^2`` (0: off).
        eps: clamp margin of ``atanh`` for tanh cells, in ``(0, 1)`` (as :class:`seqtp.AnalyticInverse`); the
            default ``1e-3`` clamps only units with ``|z_t| > 3.8``, where ``phi' < 2e-3``.
        clip: if given, clip the global norm of the gradients of all the model's parameters to this value after the
            update is accumulated (as :class:`seqtp.BPTT`; ``None``: off).

    Training defaults (:attr:`config_defaults`): SGD lr 0.01 with Nesterov momentum 0.9, ``target_lr = 1``,
    ``gamma = 1e-3``, ``ortho_penalty = 3``, ``clip = 1``. Chosen on temporal order T = 60 (hidden 100, batch 20,
    float32, a hand loop, 2,000 iterations): validation accuracy 1.0 by iteration 500 on seeds 0, 1, 2 (seed 1 with
    ``gamma = 1e-6``: the same). Through 60
    steps ``W^{-1}`` amplifies by up to ``(1 / sigma_min(W))^60`` where BPTT's ``W^T`` gives ``sigma_max^60``, so
    GAIT needs ``W`` close to orthogonal. Seed 0 unless noted: without clipping, penalty 0.1 and 1 diverged (at
    iterations 122 and 653: the errors exploded once ``sigma_min(W)`` dipped to ~0.8), penalty 10 diverged at 285 (the
    penalty's own dynamics are unstable at this lr and momentum), penalty 0 stalled (``|W W^T - I|_F`` grew to 130);
    with clip 1, penalty 0 and 0.1 stalled (accuracy 0.42, 0.40), penalty 1 solved seed 0 but not 1 (errors
    exploded) nor 2 (0.77).

    Stats: ``shift_first``, ``shift_mid``, ``shift_last``: batch mean of ``|gamma eps_t|`` at ``t = 1, T/2, T``;
    ``ortho_defect`` ``|W W^T - I|_F``; ``ortho_penalty`` ``(lambda / 4) |W W^T - I|_F^2`` (0 when off);
    ``grad_norm`` (with ``clip``): the global norm before clipping.

    Raises:
        ValueError: a bad option (at construction). TypeError (at :meth:`backward`, :meth:`targets`): not an Elman
        cell (GRU, LSTM). seqtp.FactorizationError: ``W`` is singular (as :func:`inverse_weight`).
    """

    has_targets = True
    config_defaults = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "target_lr": 1.0, "ortho_penalty": 3.0,
                       "clip": 1.0}
    search_space = ("lr=1e-4:1", "target_lr=1e-1:10", "gamma=1e-5:1e-1", "ortho_penalty=1e-2:10", "clip=1e-2:1e2")

    def __init__(self, *, target_lr: float = 1.0, gamma: float = 1e-3, ortho_penalty: float = 0.0,
                 eps: float = 1e-3, clip: float | None = None):
        if not target_lr > 0:
            raise ValueError(f"target_lr must be > 0, got {target_lr}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not ortho_penalty >= 0:
            raise ValueError(f"ortho_penalty must be >= 0, got {ortho_penalty}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.target_lr, self.gamma = float(target_lr), float(gamma)
        self.ortho_penalty, self.eps, self.clip = float(ortho_penalty), float(eps), clip

    def targets(self, model, x, loss_fn):
        """Steps 1-2 of :meth:`backward` without writing any ``.grad``; see :meth:`Method.targets`.

        Returns:
            ``(states, deltas)`` ``[B, T, H]`` each: ``h_t`` and the shifts ``gamma * eps_t`` (``v_t = h_t +
            delta_t``).

        Raises:
            TypeError: not an Elman cell. ValueError: ``loss_fn(states)`` does not depend on the states.
        """
        with torch.enable_grad():
            _, _, states, errs = self._errors(model, x, loss_fn, readout_grad=False)
        return states, errs * self.gamma

    def _errors(
        self, model, x: torch.Tensor, loss_fn, *, readout_grad: bool
    ) -> tuple[torch.Tensor, ElmanParams, torch.Tensor, torch.Tensor]:
        """Steps 1-2: the forward pass, the loss (into the readout's ``.grad`` when ``readout_grad``), ``dhat`` and
        the errors.

        Returns:
            ``(loss, params, states [B, T, H], eps [B, T, H])``.
        """
        cell = make_cell(model)
        if cell.kind != "elman":
            raise TypeError(f"GAIT-prop needs an Elman cell (an invertible step), got a {cell.kind} cell")
        with torch.no_grad():
            hidden = hidden_states(model, x)  # [B, T, H]
        leaf = hidden.requires_grad_()
        loss, dl_dh = loss_and_state_grad(loss_fn, leaf, readout_grad=readout_grad)
        direct = dl_dh.mul_(-self.target_lr * x.shape[0])  # [B, T, H]: dhat_t = -target_lr * dl_i/dh_t
        states = leaf.detach()
        return loss, cell.elman_params(), states, gait_errors(cell, x, states, direct, gamma=self.gamma, eps=self.eps)

    def backward(self, model, x, loss_fn):
        loss, params, states, errs = self._errors(model, x, loss_fn, readout_grad=True)
        seq_len = states.shape[1]
        steps = [0, seq_len // 2, seq_len - 1]  # the steps whose mean shift norm is reported
        norms = errs[:, steps].norm(dim=-1).mean(dim=0) * self.gamma  # [3]
        g_ih, g_hh, g_b = local_update_grads(params, x, states, errs)  # the local update of v divided by gamma
        w = params.weight_hh  # [H, H]
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        gram = w @ w.T - eye  # [H, H]: W W^T - I
        defect = gram.norm()
        if self.ortho_penalty > 0:
            g_hh = g_hh + self.ortho_penalty * (gram @ w)  # [H, H]: d/dW (lambda/4) |W W^T - I|^2
        accumulate_local_grads(model, g_ih, g_hh, g_b)
        stats = {"shift_first": norms[0], "shift_mid": norms[1], "shift_last": norms[2],
                 "ortho_defect": defect, "ortho_penalty": 0.25 * self.ortho_penalty * defect.square()}
        if self.clip is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        return loss.detach(), stats
