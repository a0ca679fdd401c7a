"""Target propagation through time with feedback trained by the difference reconstruction loss (math core: imports
only torch): DRL (difference targets through a learned feedback cell) and DDTP (direct linear feedback from the
output to every step).

Meulemans, Carzaniga, Suykens, Sacramento & Grewe, "A Theoretical Framework for Target Propagation", NeurIPS 2020.
Step ``t`` of the RNN (``s_{t-1} -> s_t``, weights shared over steps) plays the role of a layer. Both methods use
TP's output targets per sample (``target_lr`` times the per-sample loss gradient, as :class:`TargetProp`), give the
readout its ordinary gradient, and update the RNN by the local TP loss
``(1/B) sum_b sum_t 1/2 |f(s_{t-1}, x_t) - v_t|^2`` (``s_{t-1}``, ``v_t = s_t + delta_t`` constant).
"""

from __future__ import annotations

import torch

from .._cells import Cell, make_cell
from ..inverses import LearnedInverse, complete_states
from ..inverses.direct import DirectFeedback
from .base import LossFn, Method, hidden_states
from .target_prop import TargetProp, local_update


class DRLInverse(LearnedInverse):
    """A feedback cell ``g_t(s) = phi(V s + U_g x_t + c)`` (:class:`~seqtp.inverses.LearnedInverse`) trained by the
    difference reconstruction loss through time (Meulemans et al., NeurIPS 2020, Sec. 4, the DRL of DTP-DRL).

    The paper's loss for layer ``i`` is ``(1/sigma^2) |h_{i-1} + sigma e - r_{i-1}|^2``: ``h_{i-1} + sigma e`` is run
    forward to the output, then propagated back to layer ``i - 1`` by difference targets, where only the feedback of
    layer ``i`` is trained (their code: ``DTPDRLNetwork.compute_feedback_gradients``). Through time, for the feedback
    application of step ``t`` (``s_t -> s_{t-1}``, ``1 <= t <= T - 1`` as 0-based indices into the states):

    1. corrupt ``s~_{t-1} = s_{t-1} + sigma e``, ``e ~ N(0, I)``;
    2. run the (frozen) cell forward ``m_t = min(K, T - t)`` steps: ``s~_j = f(s~_{j-1}, x_j)``, ``j = t .. t+m_t-1``
       (``K = truncation``; ``None``: to the end of the sequence);
    3. propagate back by difference targets, with the feedback applications above ``t`` frozen: ``r_{t+m_t-1} =
       s~_{t+m_t-1}``, ``r_{j-1} = g_j(r_j) - g_j(s_j) + s_{j-1}`` for ``j = t+m_t-1 .. t+1``;
    4. the trained application: ``r_{t-1} = g_t(r_t) - g_t(s_t) + s_{t-1}`` (gradient into ``V, U_g, c``);

    ``L = mean_b mean_{t in S} (1/sigma^2) |s_{t-1} + sigma e - r_{t-1}|^2`` over the steps ``S``: all ``T - 1``, or
    a random subset of ``sample_steps`` of them per batch (from the noise generator; the subset mean is an unbiased
    estimate of the full mean, so ``feedback_lr`` does not depend on ``T`` or ``sample_steps``). For a linear
    step and feedback the loss is ``|e - V^{m} W^{m} e|^2``, zero at ``V = W^{-1}``: the difference targets then are
    the Gauss-Newton targets ``delta_{t-1} = J_f^{-1} delta_t``.

    Cost of one :meth:`fit`: every selected step runs ``m_t`` forward steps and ``m_t`` feedback applications, all
    steps batched together (``[B, n, S]``, ``max m_t`` sequential iterations): ``O(T^2)`` step evaluations in full,
    ``O(k T)`` with ``k = sample_steps``, ``O(k K)`` with the truncation too.

    Args:
        reg: unused (as in :class:`~seqtp.inverses.LearnedInverse`). feedback_lr: SGD learning rate. noise:
            ``sigma > 0``. momentum: SGD momentum. seed: init and noise generator. nonlinearity: of the feedback
            cell, ``"tanh"`` or ``"identity"``.
        sample_steps: the number of steps trained per batch (``None``: all).
        truncation: ``K``, the forward horizon of each reconstruction (``None``: to the end; ``1``: the local DRL,
            one step forward and back).

    Raises:
        ValueError: invalid options.
    """

    def __init__(self, *, reg: float = 1.0, feedback_lr: float = 0.1, noise: float = 0.1, momentum: float = 0.0,
                 seed: int = 0, nonlinearity: str = "tanh", sample_steps: int | None = None,
                 truncation: int | None = None):
        super().__init__(reg=reg, feedback_lr=feedback_lr, noise=noise, momentum=momentum, seed=seed,
                         nonlinearity=nonlinearity, reduction="mean")
        if not noise > 0:
            raise ValueError(f"noise must be > 0 (the loss divides by noise^2), got {noise}")
        if sample_steps is not None and sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        if truncation is not None and truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        self.sample_steps, self.truncation = sample_steps, truncation

    def drl_loss(
        self,
        cell: Cell,
        x: torch.Tensor,
        states: torch.Tensor,
        *,
        noise: float | None = None,
        probes: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The difference reconstruction loss of the class docstring, differentiable in the feedback parameters.

        Args:
            cell: the recurrent step (run under ``no_grad``). x: ``[B, T, D]``. states: ``s_1 .. s_T`` ``[B, T, S]``.
            noise: ``sigma`` (default: the option).
            probes: the corruptions ``e`` ``[B, n, S]`` instead of draws (``n`` the number of steps).
            steps: the trained steps ``[n]`` (0-based indices ``1 .. T-1``) instead of all or a sample.
            generator: draws the step sample and the noise (default: the solver's own generator).

        Returns:
            The scalar loss (a zero tensor with a graph when ``T < 2``: no step has a previous state to rebuild).

        Raises:
            ValueError: mismatched shapes or sizes.
        """
        sigma = self.noise if noise is None else float(noise)
        if not sigma > 0:
            raise ValueError(f"noise must be > 0, got {sigma}")
        self.bind(cell, x, states)  # checks the shapes, creates the feedback cell (device, dtype of the states)
        fb, gen = self.feedback, self.generator if generator is None else generator
        states, x = states.detach(), x.detach()
        batch, seq_len, state_size = states.shape
        if seq_len < 2:
            return 0 * fb.V.sum()
        device = states.device
        if steps is None:
            if self.sample_steps is not None and self.sample_steps < seq_len - 1:
                pick = torch.randperm(seq_len - 1, generator=gen, device=gen.device)[: self.sample_steps]
                steps = pick.to(device).sort().values + 1  # [k]
            else:
                steps = torch.arange(1, seq_len, device=device)  # [T-1]
        t_vec = steps.to(device=device, dtype=torch.long)  # [n]
        n = t_vec.shape[0]
        horizon = seq_len if self.truncation is None else self.truncation
        length = (seq_len - t_vec).clamp(max=horizon)  # [n]: m_t, the forward steps of each reconstruction
        longest = int(length.max())
        if probes is None:
            e = torch.randn((batch, n, state_size), generator=gen, device=gen.device, dtype=states.dtype).to(device)
        else:
            if probes.shape != (batch, n, state_size):
                raise ValueError(f"probes must be [{batch}, {n}, {state_size}], got {tuple(probes.shape)}")
            e = probes.to(states.dtype)
        prev = states[:, t_vec - 1]  # [B, n, S]: s_{t-1}
        with torch.no_grad():
            s = prev + sigma * e  # [B, n, S]: the corrupted s_{t-1}, one copy per trained step
            for p in range(longest):  # copy t steps into time t + p
                idx = (t_vec + p).clamp(max=seq_len - 1)  # [n]
                s = torch.where((p < length)[:, None], cell.step(s, x[:, idx]), s)  # [B, n, S]
            drive = fb.drive(x)  # [B, T, S]: U_g x_j + c
            g_states = fb.apply_drive(states, drive)  # [B, T, S]: g_j(s_j)
            rec = s  # r at the end of each copy's horizon
            for p in range(longest - 1, 0, -1):  # frozen difference steps at time j = t + p
                idx = (t_vec + p).clamp(max=seq_len - 1)  # [n]
                back = fb.apply_drive(rec, drive[:, idx]) - g_states[:, idx] + states[:, (idx - 1).clamp(min=0)]
                rec = torch.where((p < length)[:, None], back, rec)  # [B, n, S]
        xt, st = x[:, t_vec], states[:, t_vec]  # [B, n, D], [B, n, S]
        rec = fb(rec, xt) - fb(st, xt) + prev  # [B, n, S]: r_{t-1}, the trained application g_t
        return (prev + sigma * e - rec).square().sum(dim=-1).mean() / sigma**2

    def fit(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, *, noise: float | None = None) -> float:
        """One SGD step of the feedback cell on :meth:`drl_loss` (steps and noise from the generator).

        Returns:
            The loss before the step, a Python float (one host sync).
        """
        with torch.enable_grad():
            loss = self.drl_loss(cell, x, states, noise=noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.last_loss = float(loss.detach())
        self.bind(cell, x, states)  # g changed: rebinding drops the stale caches
        return self.last_loss

    @torch.no_grad()
    def reconstruction_loss(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, *, noise: float | None = None,
                            seed: int = 0) -> float:
        """:meth:`drl_loss` over all steps, its noise from a fresh generator seeded by ``seed`` (so the solver's
        state is untouched and calls are comparable across training), without a step."""
        gen = torch.Generator(device=states.device).manual_seed(seed)
        steps = torch.arange(1, max(states.shape[1], 1), device=states.device)
        if steps.numel() == 0:
            return 0.0
        return float(self.drl_loss(cell, x, states, noise=noise, steps=steps, generator=gen))


class DRL(Method):
    """DTP through time with the feedback cell trained by the difference reconstruction loss (Meulemans et al.,
    NeurIPS 2020, "DTP-DRL"), for any recurrent cell.

    Per batch: (1) forward pass; the readout gets its ordinary gradient; direct shifts ``dhat_t = -target_lr *
    dl_i/dh_t`` (per sample, as :class:`TargetProp`); (2) one SGD step of the feedback cell on the DRL loss
    (:class:`DRLInverse`; TPTT order: before the targets); (3) difference targets ``delta_{t-1} = dhat_{t-1} +
    g_t(s_t + delta_t) - g_t(s_t)`` from ``delta_T = dhat_T``; (4) the local update. Steps 1, 3 and 4 are
    ``TargetProp(solver=DRLInverse(...), mode="difference", update="local")``. The reconstruction runs through the
    states only (the readout plays no part in it), so it serves a readout of the last step or of every step alike.

    Cost: the forward pass, the DRL step (``O(T^2)`` cell steps for all steps, ``O(k T)`` for ``sample_steps = k``;
    see :class:`DRLInverse`), ``T`` feedback applications and the batched local update.

    Args:
        target_lr: ``gamma_h`` of the direct shifts.
        feedback_lr, noise, sample_steps, truncation, seed: of :class:`DRLInverse`. feedback_momentum: its SGD
            momentum.
        feedback_nonlinearity: ``"tanh"`` (default) or ``"identity"`` (LSTM: the cell-state half of ``s = [h, c]``
            is not bounded by 1).
        normalize: Bengio (2020)'s per-step normalization of the update (:func:`seqtp.methods.influence_weights`).

    Stats: those of :class:`TargetProp` (``feedback_loss``: the DRL loss before the step; ``shift_*``).

    Raises:
        ValueError: invalid options (one line naming the option).
    """

    has_targets = True
    config_defaults = {"lr": 0.1, "target_lr": 0.1, "sample_steps": 8}  # training: O(8 T) feedback cost, not O(T^2)
    search_space = ("lr=1e-3:1", "target_lr=1e-3:1", "feedback_lr=1e-3:1")

    def __init__(
        self,
        *,
        target_lr: float = 0.1,
        feedback_lr: float = 0.1,
        noise: float = 0.1,
        sample_steps: int | None = None,
        truncation: int | None = None,
        feedback_momentum: float = 0.0,
        feedback_nonlinearity: str = "tanh",
        normalize: bool = False,
        seed: int = 0,
    ):
        self.inverse = DRLInverse(feedback_lr=feedback_lr, noise=noise, momentum=feedback_momentum, seed=seed,
                                  nonlinearity=feedback_nonlinearity, sample_steps=sample_steps,
                                  truncation=truncation)
        self._tp = TargetProp(reg=1.0, target_lr=target_lr, mode="difference", update="local", solver=self.inverse,
                              normalize=normalize)
        self.target_lr = target_lr

    def backward(self, model, x, loss_fn):
        return self._tp.backward(model, x, loss_fn)

    def targets(self, model, x, loss_fn):
        """Steps 1-3 of :meth:`backward` (the feedback's DRL step included: it changes the state, as
        :meth:`backward` does), without writing any ``.grad`` of the model; see :meth:`Method.targets`."""
        return self._tp.targets(model, x, loss_fn)

    def state_dict(self) -> dict:
        """The feedback cell's weights, optimizer and noise generator (copies)."""
        return self._tp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._tp.load_state_dict(state)


def _readout_output(model, loss_fn: LossFn, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, y)``: ``loss_fn(leaf)`` and the output ``y`` of ``model.readout`` inside it (by a forward hook), with
    its graph.

    Raises:
        ValueError: the model has no readout module, or ``loss_fn`` does not call it exactly once.
    """
    readout = getattr(model, "readout", None)
    if not isinstance(readout, torch.nn.Module):
        raise ValueError("DDTP needs a model with a readout module (seqtp.RNNModel): its targets live in the output")
    captured: list[torch.Tensor] = []
    handle = readout.register_forward_hook(lambda _module, _inputs, out: captured.append(out))
    try:
        loss = loss_fn(leaf)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"loss_fn must call model.readout exactly once (it called it {len(captured)} times)")
    return loss, captured[0]


def _outputs_mode(y: torch.Tensor, leaf: torch.Tensor) -> str:
    """``"last"`` for ``y`` ``[B, C]`` (the readout of ``h_T``), ``"all"`` for ``[B, T, C]``."""
    batch, seq_len = leaf.shape[:2]
    if y.ndim == 2 and y.shape[0] == batch:
        return "last"
    if y.ndim == 3 and tuple(y.shape[:2]) == (batch, seq_len):
        return "all"
    raise ValueError(f"the readout output must be [B, C] or [B, T, C] (B={batch}, T={seq_len}), got {tuple(y.shape)}")


class DDTP(Method):
    """Direct difference target propagation through time with linear feedback (Meulemans et al., NeurIPS 2020,
    "DDTP-linear"), for any recurrent cell of a :class:`seqtp.RNNModel`.

    Per batch:

    1. Forward pass; ``loss_fn(states)`` with a forward hook on ``model.readout`` records the output ``y`` (``[B, C]``,
       the readout of ``h_T``, or ``[B, T, C]``, one output per step); the readout gets its ordinary gradient.
    2. Output targets per sample: ``y_target = y - target_lr * dl_i/dy`` (``dl_i/dy = B * dL/dy`` for the
       batch-mean loss ``L``), ``dy = y_target - y``.
    3. One SGD step of the direct feedback ``Q`` ``[K, S, C]`` on its difference reconstruction loss with weight
       decay ``damping`` (:class:`~seqtp.inverses.direct.DirectFeedback`; TPTT order: before the targets), whose
       minimizer gives damped Gauss-Newton targets ``delta_t = J_t^T (J_t J_t^T + damping I)^{-1} dy`` (``J_t =
       dy/ds_t``; one sample, linearized).
    4. Targets ``v_t = s_t + delta_t`` with ``delta_t = Q_{T-t} dy`` (``[B, C]``) or ``sum_{s >= t} Q_{s-t} dy_s``
       (``[B, T, C]``); no shift at lags ``>= K``.
    5. The local update of the RNN (as :class:`TargetProp` with ``update="local"``).

    ``loss_fn`` must call ``model.readout`` once, on ``states[:, -1]`` or on ``states``. Cost: the forward pass, the
    feedback step (``O(K T)`` cell steps, ``O(T^2)`` untruncated), the shifts and the batched local update.

    Args:
        target_lr: the output step ``gamma``.
        feedback_lr, noise, damping, truncation, seed: of
            :class:`~seqtp.inverses.direct.DirectFeedback` (``damping`` = the weight decay ``lambda``).
        feedback_momentum: the feedback's SGD momentum.

    Stats: ``feedback_loss`` (before the step); ``shift_first``, ``shift_mid``, ``shift_last``: batch mean of
    ``|delta_t|`` at ``t = 1, T/2, T``.

    Raises:
        ValueError: invalid options (one line naming the option); a model without a readout, or a ``loss_fn`` that
        does not call it once.
    """

    has_targets = True
    config_defaults = {"lr": 0.1, "target_lr": 0.1}
    search_space = ("lr=1e-3:1", "target_lr=1e-3:1", "feedback_lr=1e-3:1", "damping=1e-3:10")

    def __init__(
        self,
        *,
        target_lr: float = 0.1,
        feedback_lr: float = 0.05,
        noise: float = 0.1,
        damping: float = 0.1,
        truncation: int | None = None,
        feedback_momentum: float = 0.0,
        seed: int = 0,
    ):
        if not target_lr > 0:
            raise ValueError(f"target_lr must be > 0, got {target_lr}")
        self.target_lr = float(target_lr)
        self.feedback = DirectFeedback(feedback_lr=feedback_lr, noise=noise, damping=damping, truncation=truncation,
                                       momentum=feedback_momentum, seed=seed)

    def state_dict(self) -> dict:
        """The direct feedback's weights, optimizer and noise generator (copies); ``{}`` before the first batch."""
        state = self.feedback.state_dict()
        return {"feedback": state} if state else {}

    def load_state_dict(self, state: dict) -> None:
        if "feedback" in state:
            self.feedback.load_state_dict(state["feedback"])

    def _targets(self, model, x: torch.Tensor, loss_fn: LossFn, *, write_grads: bool) -> tuple:
        """Steps 1-4: ``(loss, cell, states [B, T, S], deltas [B, T, S])``; ``write_grads``: the readout's ``.grad``
        (and that of every other leaf of the loss) too."""
        with torch.no_grad():
            hidden = hidden_states(model, x)  # [B, T, H]
        leaf = hidden.detach().requires_grad_()
        with torch.enable_grad():
            loss, y = _readout_output(model, loss_fn, leaf)
            outputs = _outputs_mode(y, leaf)
            if write_grads:
                y.retain_grad()
                loss.backward()  # readout .grad; dL/dy in y.grad
                dl_dy = y.grad
            else:
                (dl_dy,) = torch.autograd.grad(loss, y, allow_unused=True)
        if dl_dy is None:
            raise ValueError("loss_fn(states) does not depend on the readout's output: no output target")
        dy = dl_dy.detach().mul(-self.target_lr * x.shape[0])  # [B, C] or [B, T, C]: y_target - y, per sample
        cell = make_cell(model)
        states, _ = complete_states(cell, x, leaf.detach(), torch.zeros_like(hidden))  # [B, T, S]
        self.feedback.fit(cell, model.readout, x, states, outputs=outputs)
        deltas = self.feedback.shifts(dy, x.shape[1]).to(states.dtype)  # [B, T, S]
        return loss.detach(), cell, states, deltas

    def targets(self, model, x, loss_fn):
        """Steps 1-4 of :meth:`backward` (the feedback step included: it changes the state, as :meth:`backward`
        does), without writing any ``.grad`` of the model; see :meth:`Method.targets`.

        Returns:
            ``(states, deltas)`` ``[B, T, S]`` each.
        """
        _, _, states, deltas = self._targets(model, x, loss_fn, write_grads=False)
        return states, deltas

    def backward(self, model, x, loss_fn):
        loss, cell, states, deltas = self._targets(model, x, loss_fn, write_grads=True)
        local_update(model, x, cell, states, deltas)
        seq_len = states.shape[1]
        norms = deltas[:, [0, seq_len // 2, seq_len - 1]].norm(dim=-1).mean(dim=0)  # [3]
        stats = {"feedback_loss": torch.as_tensor(self.feedback.last_loss), "shift_first": norms[0],
                 "shift_mid": norms[1], "shift_last": norms[2]}
        return loss, stats
