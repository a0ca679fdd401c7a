"""Direct linear feedback from the output to every step (DDTP-linear), trained by the difference reconstruction loss.

Math core: imports only torch. Device and dtype follow the states.

Meulemans, Carzaniga, Suykens, Sacramento & Grewe, "A Theoretical Framework for Target Propagation", NeurIPS 2020,
Sec. 4 (DDTP): each hidden layer gets its target straight from the output, ``v_i = h_i + Q_i (y_target - y)``,
and ``Q_i`` is trained by the difference reconstruction loss (DRL) with weight decay ``lambda``::

    L_i(Q_i) = (1/sigma^2) |sigma e - Q_i (y(h_i + sigma e) - y(h_i))|^2 + lambda |Q_i|_F^2,    e ~ N(0, I)

(their code: ``DDTPMLPNetwork.compute_feedback_gradients`` with a single linear feedback layer, the squared error
as ``F.mse_loss`` and ``lambda`` as the feedback optimizer's weight decay; ``lambda |Q|_F^2`` is also the expectation
over ``e_2 ~ N(0, I)`` of the paper's second DRL term ``(lambda/sigma^2) |Q sigma e_2|^2``). Linearizing
``y(h + sigma e) - y(h) = sigma J e`` (``J = dy/dh``) and taking the expectation over ``e``,
``E L = |I - Q J|_F^2 + lambda |Q|_F^2``, minimized by the damped Gauss-Newton feedback
``Q* = J^T (J J^T + lambda I)^{-1}`` (the paper's Theorem 6 for one sample): its targets are damped Gauss-Newton
targets, with ``J Q* -> I`` as ``lambda -> 0`` and ``lambda Q* -> J^T`` (the gradient direction) as
``lambda -> inf``.

Through time, step ``t`` plays the layer; the weights are shared over steps, so one matrix serves each lag:
``Q_k`` ``[S, C]`` for ``k = T - t`` (0-based state index ``t``: ``k = T - 1 - t``), ``k < K`` (the truncation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from .._cells import Cell
from .base import move_training_state

OUTPUTS = ("last", "all")

Readout = Callable[[torch.Tensor], torch.Tensor]


class DirectFeedback:
    """Per-lag direct linear feedback ``Q`` ``[K, S, C]`` from the output errors to the state shifts (DDTP-linear).

    Target shifts (:meth:`shifts`), from output shifts ``dy = y_target - y``:

    - ``outputs="last"`` (one output ``y = readout(h_T)``, ``dy`` ``[B, C]``): ``delta_t = Q_{T-t} dy``;
    - ``outputs="all"`` (``y_s = readout(h_s)`` at every step, ``dy`` ``[B, T, C]``): the joint reconstruction over
      lags ``delta_t = sum_{s >= t, s - t < K} Q_{s-t} dy_s``.

    Lags ``k >= K`` (steps more than ``K - 1`` before an output) get no shift from that output, as truncated BPTT
    gets no gradient there: a lag never trained has no feedback to give, and ``Q_{K-1}`` stands for one lag only
    (the Jacobians of different lags differ by powers of the recurrent Jacobian).

    Training (:meth:`fit`, one SGD step per batch, before the shifts: TPTT order). For every step ``t`` with a lag
    ``< K`` to an output, the state is corrupted, ``s_t + sigma e_t``, and run forward through the (frozen) cell to
    the outputs it reaches within the truncation, ``dy~_s = readout(s~_s) - readout(s_s)`` for ``s = t .. t+K-1``
    (``"last"``: only ``s = T``); the difference reconstruction ``r_t = sum_s Q_{s-t} dy~_s`` must return the
    corruption::

        L(Q) = mean_b sum_t (1/sigma^2) |sigma e_t - r_t|^2 + lambda sum_{k < L} |Q_k|_F^2

    (``L = min(K, T)``: the lags this batch reaches). With ``"last"`` each lag ``k`` appears in one term only (step
    ``t = T - k``), so its minimizer is the damped Gauss-Newton feedback ``J_k^T (J_k J_k^T + lambda I)^{-1}``
    (``J_k = dy/ds_{T-k}``; batch: ``(mean_b J^T)(mean_b J J^T + lambda I)^{-1}`` in expectation over ``e``), up to
    ``O(sigma^2)`` (``e`` symmetric: odd moments vanish). With ``"all"`` the lags share each step's reconstruction
    (a joint least-squares problem). The sum over steps makes the loss, not its per-lag gradient, grow with ``T``.

    Cost of one :meth:`fit`: ``min(K, T)`` batched cell steps on ``[B, n, S]`` copies (``n = min(K, T)`` for
    ``"last"``, ``T`` for ``"all"``), i.e. ``O(K T)`` step evaluations (``O(T^2)`` untruncated).

    Why not an :class:`~seqtp.inverses.InverseSolver`: that contract inverts one step (``psi_t``: a target of
    ``s_t`` to one of ``s_{t-1}``, bound to the states, propagated by a backward recursion from direct shifts in
    state space); direct feedback maps output-space errors to every step at once and its training needs the
    readout. It declares the same abilities (``trainable``, ``stateful``) and checkpoint contract.

    Args:
        feedback_lr: SGD learning rate of ``Q``.
        noise: ``sigma > 0`` (the loss divides by ``sigma^2``).
        damping: ``lambda >= 0``, the weight decay = the Gauss-Newton damping.
        truncation: ``K``, the number of lags (``None``: the sequence length of the first batch).
        momentum: SGD momentum.
        seed: seeds the init (``Q_k`` i.i.d. ``N(0, 2 / (S + C))``, drawn in float64 on the CPU, then cast) and the
            noise generator (on the states' device).

    Raises:
        ValueError: invalid options (one line naming the option); mismatched shapes at use.
    """

    trainable = True
    stateful = True

    def __init__(self, *, feedback_lr: float = 0.05, noise: float = 0.1, damping: float = 0.1,
                 truncation: int | None = None, momentum: float = 0.0, seed: int = 0):
        if not feedback_lr > 0:
            raise ValueError(f"feedback_lr must be > 0, got {feedback_lr}")
        if not noise > 0:
            raise ValueError(f"noise must be > 0 (the loss divides by noise^2), got {noise}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if truncation is not None and truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.feedback_lr, self.noise, self.damping = float(feedback_lr), float(noise), float(damping)
        self.truncation, self.momentum, self.seed = truncation, float(momentum), int(seed)
        self.weights: torch.nn.Parameter | None = None  # Q [K, S, C]
        self.optimizer: torch.optim.SGD | None = None
        self.generator: torch.Generator | None = None
        self.last_loss: float | None = None

    # -- the weights -------------------------------------------------------------------------------------------------

    def _build(self, lags: int, state_size: int, output_size: int, device, dtype) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        std = math.sqrt(2.0 / (state_size + output_size))
        q = std * torch.randn(lags, state_size, output_size, generator=gen, dtype=torch.float64)  # [K, S, C]
        self.weights = torch.nn.Parameter(q.to(device=device, dtype=dtype))
        self.optimizer = torch.optim.SGD([self.weights], lr=self.feedback_lr, momentum=self.momentum)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def ensure(self, state_size: int, output_size: int, seq_len: int, like: torch.Tensor) -> torch.nn.Parameter:
        """``Q`` ``[K, S, C]``, created at the first use (``K = truncation`` or ``seq_len``) on ``like``'s device and
        dtype, and moved there afterwards (in place: the optimizer keeps the same Parameter).

        Raises:
            ValueError: ``(S, C)`` differ from the weights'.
        """
        if self.weights is None:
            self._build(self.truncation or seq_len, state_size, output_size, like.device, like.dtype)
        q = self.weights
        if tuple(q.shape[1:]) != (state_size, output_size):
            raise ValueError(f"the direct feedback has (S, C) = {tuple(q.shape[1:])}, got ({state_size}, "
                             f"{output_size})")
        if q.device != like.device or q.dtype != like.dtype:
            q.data = q.data.to(device=like.device, dtype=like.dtype)
            self.generator = move_training_state(self.optimizer, self.generator, self.seed, like)
        return q

    # -- targets -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def shifts(self, dy: torch.Tensor, seq_len: int, *, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The state shifts ``delta`` ``[B, T, S]`` from the output shifts ``dy = y_target - y``.

        Args:
            dy: ``[B, C]`` (one output, at the last step) or ``[B, T, C]`` (one output per step).
            seq_len: ``T``.
            weights: ``Q`` ``[K, S, C]`` to use instead of the trained ones (analysis; default: :attr:`weights`).

        Returns:
            ``[B, T, S]``: ``delta_t = Q_{T-t} dy`` (``[B, C]``), or ``sum_{s >= t} Q_{s-t} dy_s`` (``[B, T, C]``);
            zero at lags ``>= K``.

        Raises:
            ValueError: the weights do not exist yet, or ``dy`` has the wrong shape.
        """
        q = self.weights if weights is None else weights
        if q is None:
            raise ValueError("the direct feedback has no weights yet: call fit (or ensure) first")
        q = q.detach()
        lags, state_size, output_size = q.shape
        if dy.shape[-1] != output_size or dy.ndim not in (2, 3) or (dy.ndim == 3 and dy.shape[1] != seq_len):
            raise ValueError(f"dy must be [B, {output_size}] or [B, {seq_len}, {output_size}], got {tuple(dy.shape)}")
        dy = dy.to(q.dtype)
        out = dy.new_zeros(dy.shape[0], seq_len, state_size)  # [B, T, S]
        reach = min(lags, seq_len)
        if dy.ndim == 2:
            # delta[:, T-1-k] = Q_k dy for k < reach: the lags run backwards in time
            out[:, seq_len - reach :] = torch.einsum("ksc,bc->bks", q[:reach].flip(0), dy)  # [B, reach, S]
        else:
            for k in range(reach):  # delta_t += Q_k dy_{t+k} for t + k <= T - 1
                out[:, : seq_len - k] += torch.einsum("sc,btc->bts", q[k], dy[:, k:])  # [B, T-k, S]
        return out

    # -- training ----------------------------------------------------------------------------------------------------

    def loss(
        self,
        cell: Cell,
        readout: Readout,
        x: torch.Tensor,
        states: torch.Tensor,
        *,
        outputs: str = "last",
        noise: float | None = None,
        probes: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The difference reconstruction loss of the class docstring, differentiable in ``Q``.

        Args:
            cell: the recurrent step (its current parameters; run under ``no_grad``). readout: ``h [..., H] ->
                y [..., C]`` (run under ``no_grad``). x: ``[B, T, D]``. states: ``s_1 .. s_T`` ``[B, T, S]``.
            outputs: ``"last"`` or ``"all"`` (see :meth:`shifts`).
            noise: ``sigma`` (default: the option).
            probes: the corruptions ``e`` ``[B, n, S]`` instead of draws from the generator (``n = min(K, T)`` for
                ``"last"``: steps ``T - n .. T - 1``; ``n = T`` for ``"all"``), e.g. a fixed probe set.
            weights: ``Q`` to use instead of the trained weights (e.g. to differentiate the loss in ``Q``).

        Returns:
            The scalar loss.

        Raises:
            ValueError: bad ``outputs``, ``noise`` or shapes.
        """
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        sigma = self.noise if noise is None else float(noise)
        if not sigma > 0:
            raise ValueError(f"noise must be > 0, got {sigma}")
        if states.shape[-1] != cell.state_size or x.shape[:2] != states.shape[:2]:
            raise ValueError(f"shape mismatch: x {tuple(x.shape)}, states {tuple(states.shape)}; expected [B, T, D] "
                             f"and [B, T, {cell.state_size}] for a {cell.kind} cell")
        states, x = states.detach(), x.detach()
        batch, seq_len, state_size = states.shape
        hidden = cell.hidden_size
        with torch.no_grad():
            y_ref = readout(states[..., :hidden])  # [B, T, C]: the unperturbed outputs
        q = self.ensure(state_size, y_ref.shape[-1], seq_len, states)  # also the generator, on the states' device
        if weights is not None:
            if weights.shape[1:] != q.shape[1:]:
                raise ValueError(f"weights must be [K, {state_size}, {q.shape[2]}], got {tuple(weights.shape)}")
            q = weights
        reach = min(q.shape[0], seq_len)  # lags this batch reaches
        first = seq_len - reach if outputs == "last" else 0
        t_vec = torch.arange(first, seq_len, device=states.device)  # [n]: the corrupted steps
        n = seq_len - first
        if probes is None:
            e = torch.randn((batch, n, state_size), generator=self.generator, device=states.device,
                            dtype=states.dtype)  # [B, n, S]
        else:
            if probes.shape != (batch, n, state_size):
                raise ValueError(f"probes must be [{batch}, {n}, {state_size}], got {tuple(probes.shape)}")
            e = probes.to(states.dtype)
        s = states[:, t_vec] + sigma * e  # [B, n, S]: s_t + sigma e_t, one copy per corrupted step
        rec = torch.zeros_like(s)  # [B, n, S]: r_t, differentiable in Q
        for p in range(reach):  # copy t is at time t + p
            time = t_vec + p  # [n]
            alive = time <= seq_len - 1  # [n]
            idx = time.clamp(max=seq_len - 1)  # [n]
            if p > 0:
                with torch.no_grad():
                    s = torch.where(alive[:, None], cell.step(s, x[:, idx]), s)  # [B, n, S]
            use = (time == seq_len - 1) if outputs == "last" else alive  # [n]: the outputs this lag reconstructs
            with torch.no_grad():
                dy = (readout(s[..., :hidden]) - y_ref[:, idx]) * use[:, None].to(s.dtype)  # [B, n, C]
            rec = rec + torch.einsum("sc,bnc->bns", q[p], dy)  # [B, n, S]
        fit = (sigma * e - rec).square().sum(dim=(1, 2)).mean() / sigma**2
        return fit + self.damping * q[:reach].square().sum()

    def fit(self, cell: Cell, readout: Readout, x: torch.Tensor, states: torch.Tensor, *, outputs: str = "last",
            noise: float | None = None) -> float:
        """One SGD step of ``Q`` on :meth:`loss` (noise from the generator).

        Returns:
            The loss before the step, a Python float (one host sync).
        """
        with torch.enable_grad():
            loss = self.loss(cell, readout, x, states, outputs=outputs, noise=noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.last_loss = float(loss.detach())
        return self.last_loss

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Copies of ``Q``, the optimizer state and the noise generator state; ``{}`` before the weights exist."""
        if self.weights is None:
            return {}
        return {
            "weights": self.weights.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (rebuilds ``Q`` from the saved shape; device and dtype those of the weights
        already built, else the saved ones)."""
        if not state:
            return
        saved = state["weights"]
        like = self.weights if self.weights is not None else saved
        self._build(*saved.shape, like.device, like.dtype)
        with torch.no_grad():
            self.weights.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"])
        self.last_loss = state.get("last_loss")
