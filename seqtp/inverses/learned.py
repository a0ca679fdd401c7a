"""A learned inverse of the recurrent step: a feedback cell trained by noisy reconstruction.

Math core: imports only torch. Device and dtype follow the states.

Difference target propagation (Lee, Zhang, Fischer & Bengio, "Difference Target Propagation", ECML-PKDD 2015) and
its recurrent form, target propagation through time (Manchev & Spratling, "Target Propagation in Recurrent Neural
Networks", JMLR 2020, "TPTT"), replace the inverse of a step ``s_t = f(s_{t-1}, x_t)`` by a learned feedback cell::

    g(s, x) = tanh(V s + U_g x + c)          s [B, S], x [B, D] -> an estimate of s_{t-1} [B, S]

trained to reconstruct a (noise-corrupted) previous state from the step's output::

    L(V, U_g, c) = mean_b sum_{t=1}^{T-1} |g(f(s_{t-1} + sigma e, x_t), x_t) - (s_{t-1} + sigma e)|^2,  e ~ N(0, I)

(one SGD step per batch, before the targets are computed). ``g`` is never an exact inverse, so targets should be
difference-corrected: ``psi_t(s_t + delta) - psi_t(s_t)`` (the ``"difference"`` rule), or linearized.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .._cells import Cell
from .base import InverseSolver, move_training_state

FEEDBACK_NONLINEARITIES = ("tanh", "identity")


class FeedbackCell(nn.Module):
    """``g(s, x) = phi(V s + U x + c)`` with ``phi = tanh`` (default) or the identity.

    Args:
        state_size: ``S``. input_size: ``D``. nonlinearity: ``"tanh"`` or ``"identity"``.
        generator: a CPU ``torch.Generator`` for the deterministic init (``V`` orthogonal, ``U`` uniform in
            ``+-1/sqrt(S)`` as ``torch.nn.RNN`` does, ``c = 0``). The init is drawn in float64 on the CPU, then cast,
            so it is the same on every device.
        device, dtype: of the parameters.

    Shapes: ``forward(s [..., S], x [..., D]) -> [..., S]``.
    """

    def __init__(self, state_size: int, input_size: int, *, nonlinearity: str = "tanh",
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__()
        if nonlinearity not in FEEDBACK_NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(FEEDBACK_NONLINEARITIES)}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        f64 = torch.float64
        q, r = torch.linalg.qr(torch.randn(state_size, state_size, generator=generator, dtype=f64))
        sign = torch.diagonal(r).sign()
        q = q * torch.where(sign == 0, 1.0, sign)  # sign-corrected QR: a Haar-distributed orthogonal V
        bound = 1 / math.sqrt(state_size)
        u = (2 * torch.rand(state_size, input_size, generator=generator, dtype=f64) - 1) * bound
        self.V = nn.Parameter(q.to(device=device, dtype=dtype))  # [S, S]
        self.U = nn.Parameter(u.to(device=device, dtype=dtype))  # [S, D]
        self.c = nn.Parameter(torch.zeros(state_size, device=device, dtype=dtype))  # [S]

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """``U x + c`` ``[..., S]`` (detached parameters: the targets never train the feedback cell)."""
        return x @ self.U.detach().T + self.c.detach()

    def apply_drive(self, s: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        """``phi(V s + drive)`` ``[..., S]`` with detached parameters."""
        z = s @ self.V.detach().T + drive
        return torch.tanh(z) if self.nonlinearity == "tanh" else z

    def forward(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = s @ self.V.T + x @ self.U.T + self.c  # [..., S]
        return torch.tanh(z) if self.nonlinearity == "tanh" else z


class LearnedInverse(InverseSolver):
    """A learned feedback cell as the inverse of the step (DTP, Lee et al. 2015; TPTT, Manchev & Spratling 2020).

    ``psi_t(v) = g(v, x_t) = tanh(V v + U_g x_t + c)``. Unlike the regularized inverses there is no proximal term
    (``reg`` is accepted for the common constructor and unused) and ``psi_t(s_t) != s_{t-1}`` in general: use the
    ``"difference"`` rule ``g(s_t + delta, x_t) - g(s_t, x_t)`` (exact by construction at ``delta = 0``) or the
    ``"linearized"`` rule ``(1 - g(s_t, x_t)^2) * (V delta)``; the ``"exact"`` rule ``g(v_t) - s_{t-1}`` carries the
    reconstruction error of ``g`` into every target.

    Training (TPTT order): call :meth:`fit` once per batch *before* :meth:`bind` / :meth:`propagate`. It takes one
    SGD step on the noisy reconstruction loss, batched over all steps at once::

        L = mean_b sum_{t=1}^{T-1} |g(f(s_{t-1} + sigma e, x_t), x_t) - (s_{t-1} + sigma e)|^2,   e ~ N(0, I)

    (``f`` = ``cell.step`` on ``[B, T-1, S]``, under ``no_grad``; only ``V, U_g, c`` are trained). This loss sums over
    steps, so its gradient grows with ``T``: with ``reduction="sum"``, ``feedback_lr=0.01`` already diverged at
    ``T = 60`` (temporal order: the loss rose from 1660 to 2120 over 200 iterations) and at ``T = 784``. The default
    ``reduction="mean"`` averages over the ``T - 1`` steps instead, so that one ``feedback_lr`` serves every length;
    the default ``feedback_lr=0.1`` took the loss from 1.73 to 0.48 over 300 temporal-order iterations (T = 60),
    where 0.3 diverged.

    The feedback cell (:attr:`feedback`, a :class:`FeedbackCell`) is created at the first :meth:`fit` or
    :meth:`bind` from the cell's sizes (``S = cell.state_size``, ``D = cell.input_size``), on the states' device and
    dtype, with a deterministic init from ``seed``. The noise ``e`` comes from a ``torch.Generator`` on the states'
    device, seeded by ``seed``. :meth:`state_dict` / :meth:`load_state_dict` checkpoint both, and the optimizer.

    Args:
        reg: unused (no proximal term); must be > 0 for the common base class.
        feedback_lr: SGD learning rate of the feedback cell.
        noise: ``sigma``, the standard deviation of the corruption (0 for none).
        momentum: SGD momentum (``torch.optim.SGD``; 0 = plain SGD).
        reduction: over steps, ``"mean"`` (default: the loss divided by ``T - 1``) or ``"sum"`` (as above); always
            a mean over the batch.
        seed: seeds the init and the noise generator.
        nonlinearity: ``"tanh"`` (default, as in TPTT) or ``"identity"`` (e.g. for LSTM, whose cell-state half of
            ``s = [h, c]`` is not bounded by 1 and so is out of reach of a tanh).

    Raises:
        ValueError: invalid options; a cell whose sizes differ from the feedback cell's (at :meth:`fit` /
            :meth:`bind`).
    """

    trainable = True
    stateful = True
    fixed_point = False
    config_options = ("feedback_lr", "noise")

    def __init__(self, *, reg: float = 1.0, feedback_lr: float = 0.1, noise: float = 0.1, momentum: float = 0.0,
                 seed: int = 0, nonlinearity: str = "tanh", reduction: str = "mean"):
        super().__init__(reg=reg)
        if not feedback_lr > 0:
            raise ValueError(f"feedback_lr must be > 0, got {feedback_lr}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nonlinearity not in FEEDBACK_NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(FEEDBACK_NONLINEARITIES)}, got {nonlinearity!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.feedback_lr, self.noise, self.momentum = float(feedback_lr), float(noise), float(momentum)
        self.reduction = reduction
        self.seed, self.nonlinearity = int(seed), nonlinearity
        self.feedback: FeedbackCell | None = None
        self.optimizer: torch.optim.SGD | None = None
        self.generator: torch.Generator | None = None
        self.last_loss: float | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (drive, g(s_t)) of the bound batch

    # -- the feedback cell -------------------------------------------------------------------------------------------

    def _build(self, state_size: int, input_size: int, device, dtype) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.feedback = FeedbackCell(state_size, input_size, nonlinearity=self.nonlinearity, generator=gen,
                                     device=device, dtype=dtype)
        self.optimizer = torch.optim.SGD(self.feedback.parameters(), lr=self.feedback_lr, momentum=self.momentum)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def _ensure(self, cell: Cell, states: torch.Tensor) -> FeedbackCell:
        """Create the feedback cell on first use; check sizes and follow the states' device/dtype afterwards."""
        if self.feedback is None:
            self._build(cell.state_size, cell.input_size, states.device, states.dtype)
        fb = self.feedback
        if tuple(fb.U.shape) != (cell.state_size, cell.input_size):
            raise ValueError(f"the feedback cell has (S, D) = {tuple(fb.U.shape)}, the {cell.kind} cell has "
                             f"({cell.state_size}, {cell.input_size})")
        if fb.V.device != states.device or fb.V.dtype != states.dtype:
            fb.to(device=states.device, dtype=states.dtype)  # in place: the optimizer keeps the same Parameters
            self.generator = move_training_state(self.optimizer, self.generator, self.seed, states)
        return fb

    def _corrupt(self, prev: torch.Tensor, noise: float) -> torch.Tensor:
        if noise == 0:
            return prev
        e = torch.randn(prev.shape, generator=self.generator, device=prev.device, dtype=prev.dtype)  # [B, T-1, S]
        return prev + noise * e

    def _loss(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, noise: float) -> torch.Tensor:
        """The reconstruction loss (a differentiable scalar in the feedback parameters)."""
        if states.shape[-1] != cell.state_size or x.shape[:2] != states.shape[:2]:
            raise ValueError(f"shape mismatch: x {tuple(x.shape)}, states {tuple(states.shape)}; expected [B, T, D] "
                             f"and [B, T, {cell.state_size}] for a {cell.kind} cell")
        fb = self._ensure(cell, states)
        prev = states[:, :-1].detach()  # [B, T-1, S]: s_{t-1} for t = 1 .. T-1 (0-based indices into states)
        xs = x[:, 1:].detach()  # [B, T-1, D]
        target = self._corrupt(prev, noise)  # [B, T-1, S]
        with torch.no_grad():
            out = cell.step(target, xs)  # [B, T-1, S]: f(s_{t-1} + sigma e, x_t), all steps at once
        rec = fb(out, xs)  # [B, T-1, S]
        steps = prev.shape[1] if self.reduction == "mean" else 1
        return (rec - target).pow(2).sum() / (states.shape[0] * max(steps, 1))

    def fit(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, *, noise: float | None = None) -> float:
        """One SGD step of the feedback cell on the noisy reconstruction loss (see the class docstring).

        Args:
            cell: the recurrent step (its current parameters). x: inputs ``[B, T, D]``. states: the forward states
                ``s_1 .. s_T`` ``[B, T, S]`` (detached here). noise: ``sigma`` for this call (default: the option).

        Returns:
            The loss before the step, a Python float (one host sync).

        Raises:
            ValueError: mismatched shapes or sizes.
        """
        sigma = self.noise if noise is None else float(noise)
        with torch.enable_grad():
            loss = self._loss(cell, x, states, sigma)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self._cache = None  # g changed: the bound batch's caches are stale
        self.last_loss = float(loss.detach())
        return self.last_loss

    @torch.no_grad()
    def reconstruction_loss(self, cell: Cell, x: torch.Tensor, states: torch.Tensor, *, noise: float = 0.0) -> float:
        """The loss of :meth:`fit` without a step (draws from the noise generator only when ``noise > 0``)."""
        return float(self._loss(cell, x, states, float(noise)))

    # -- the solver contract -----------------------------------------------------------------------------------------

    def bind(self, cell, x, states):
        super().bind(cell, x, states)
        self._ensure(cell, states)
        self._cache = None
        if self.last_loss is not None:
            self._report["fit_loss"] = self.last_loss
        return self

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_g x_t + c, g(s_t, x_t))`` for all steps, ``[B, T, S]`` each (computed once per bind / fit)."""
        if self._cache is None:
            drive = self.feedback.drive(self.x)  # [B, T, S]
            self._cache = (drive, self.feedback.apply_drive(self.states, drive))
        return self._cache

    def invert(self, t, v):
        """``g(v, x_t)`` ``[B, S]``."""
        return self.feedback.apply_drive(v, self._cached()[0][:, t])

    def linearized(self, t, delta):
        """``J_g(s_t) delta = (1 - g(s_t)^2) * (V delta)`` ``[B, S]`` (without the factor for ``identity``)."""
        vd = delta @ self.feedback.V.detach().T  # [B, S]
        if self.nonlinearity == "identity":
            return vd
        g = self._cached()[1][:, t]  # [B, S]
        return (1 - g * g) * vd

    def difference(self, t, delta):
        """``g(s_t + delta, x_t) - g(s_t, x_t)`` ``[B, S]``."""
        drive, g = self._cached()
        return self.feedback.apply_drive(self.states[:, t] + delta, drive[:, t]) - g[:, t]

    def report(self):
        """``fit_loss`` (of the last :meth:`fit`, if any) and ``reconstruction_error``: on the bound batch,
        ``sqrt(mean_{b,t} |g(s_t, x_t) - s_{t-1}|^2 / mean_{b,t} |s_{t-1}|^2)`` over ``t = 1 .. T-1`` (one sync)."""
        out = dict(self._report)
        if getattr(self, "states", None) is not None and self.states.shape[1] > 1:
            g = self._cached()[1][:, 1:]  # [B, T-1, S]
            prev = self.states[:, :-1]  # [B, T-1, S]
            err = (g - prev).pow(2).sum() / prev.pow(2).sum().clamp_min(torch.finfo(prev.dtype).tiny)
            out["reconstruction_error"] = float(err.sqrt())
        return out

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The feedback weights, the optimizer state and the noise generator state (copies), or ``{}`` before the
        feedback cell exists."""
        if self.feedback is None:
            return {}
        return {
            "feedback": {k: v.detach().clone() for k, v in self.feedback.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "last_loss": self.last_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (rebuilds the feedback cell from the saved shapes; device and dtype those of the
        cell already built, else the saved ones)."""
        if not state:
            return
        fb = state["feedback"]
        s, d = fb["U"].shape
        # an already built cell keeps its device and dtype: a checkpoint loaded on the CPU (map_location="cpu")
        # must not move a CUDA solver, whose noise generator state is a CUDA one
        like = self.feedback.V if self.feedback is not None else fb["V"]
        self._build(s, d, like.device, like.dtype)
        self.feedback.load_state_dict(fb)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"])
        self.last_loss = state.get("last_loss")
        self._cache = None
