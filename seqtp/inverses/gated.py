"""The L-DRL feedback of an Elman step: the gated linear map ``G_t(s) = Q (phi'(z_t) * s) + c`` trained by the local
difference reconstruction loss of Ernoult, Normandin, Moudgil, Spinney, Belilovsky, Rish, Richards & Bengio,
"Towards Scaling Difference Target Propagation by Learning Backprop Targets", ICML 2022 (math core: imports only
torch).

As an inverse of step ``t`` (:class:`LDRLFeedback`, an :class:`~seqtp.inverses.InverseSolver`), the feedback maps a
target of ``h_t`` to one of ``h_{t-1}`` by the difference rule of DTP::

    psi_t(v) = h_{t-1} + G_t(v) - G_t(h_t) = h_{t-1} + Q (D_t (v - h_t)),    D_t = diag(phi'(z_t))

(the gate evaluated at the forward state ``h_t`` and held constant), so ``psi_t(h_t) = h_{t-1}`` and the linearized,
difference and exact rules coincide: ``J_G = Q D_t`` while the step's Jacobian is ``J_f = D_t W``. The local loss
(their Eq. 12, ``target_prop/feedback_loss.py`` of their code) trains ``G`` so that ``J_G -> J_f^T``; then
``G(v_t) - G(h_t) = W^T (D_t delta_t)`` is one step of BPTT's adjoint recursion.

The expectation of the loss (derived in :func:`ldrl_loss`)::

    E[L_t] = sigma^2 (|J_G - J_f^T|_F^2 - |J_f|_F^2) + O(sigma^4)

so its minimizer is ``J_G = J_f^T`` as ``sigma -> 0``; for the gated linear ``G`` it is ``Q = W^T`` up to
``O(sigma^2)`` (a bias mostly in the scale of ``Q``, which no target direction depends on).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .._cells import Cell, activation, activation_grad_from_output
from .base import InverseSolver, check_cell, move_training_state

__all__ = ["FEEDBACK_INITS", "GatedLinearFeedback", "LDRLFeedback", "feedback_angle", "ldrl_loss"]

FEEDBACK_INITS = ("orthogonal", "zeros", "symmetric")


class GatedLinearFeedback(nn.Module):
    """The gated linear feedback of an Elman step: ``G(s; gate) = Q (gate * s) + c``.

    ``gate`` ``[..., H]`` is ``phi'(z_t)`` of the forward state ``h_t``, a constant of ``G`` (no gradient flows into
    it), so ``J_G = Q diag(gate)``. The offset ``c`` cancels in every difference ``G(u) - G(h_t) = Q (gate * (u -
    h_t))``, in the difference rule and in the L-DRL loss alike: it never receives a gradient and stays at its init
    ``0``; it is kept so that ``G`` is the affine map of the paper's feedback layers and round-trips in checkpoints.

    Args:
        hidden_size: ``H``.
        init: ``"orthogonal"`` (a Haar-distributed orthogonal ``Q`` drawn in float64 on the CPU from ``generator``,
            then cast, so the same on every device), ``"zeros"`` or ``"symmetric"`` (``Q = weight_hh^T``, the
            minimizer: Ernoult et al.'s ``init_symetric_weights`` debugging option; needs ``weight_hh``).
        generator: a CPU ``torch.Generator`` for the orthogonal init.
        weight_hh: ``W`` ``[H, H]`` for ``init="symmetric"``.
        device, dtype: of the parameters.

    Shapes: ``forward(s [..., H], gate [..., H]) -> [..., H]``; ``difference(delta, gate)`` ``-> Q (gate * delta)``
    ``[..., H]``.

    Raises:
        ValueError: an unknown ``init``, or ``init="symmetric"`` without ``weight_hh``.
    """

    def __init__(self, hidden_size: int, *, init: str = "orthogonal", generator: torch.Generator | None = None,
                 weight_hh: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        if init not in FEEDBACK_INITS:
            raise ValueError(f"init must be one of {', '.join(FEEDBACK_INITS)}, got {init!r}")
        f64 = torch.float64
        if init == "orthogonal":
            q, r = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=generator, dtype=f64))
            sign = torch.diagonal(r).sign()
            q = q * torch.where(sign == 0, 1.0, sign)  # [H, H]: sign-corrected QR, Haar-distributed
        elif init == "zeros":
            q = torch.zeros(hidden_size, hidden_size, dtype=f64)
        else:
            if weight_hh is None:
                raise ValueError("init='symmetric' needs weight_hh")
            q = weight_hh.detach().T.to(f64).cpu()  # [H, H]
        # contiguous: QR returns a column-major Q, and a different layout changes the rounding of the products with
        # it, so a checkpoint restored into a fresh (row-major) Q would not resume bit for bit
        self.Q = nn.Parameter(q.to(device=device, dtype=dtype).contiguous())  # [H, H]
        self.c = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))  # [H]

    def forward(self, s: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (gate * s) @ self.Q.T + self.c  # [..., H]

    def difference(self, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``G(h_t + delta) - G(h_t) = Q (gate * delta)`` ``[..., H]`` (exact: ``G`` is affine in ``s``), with
        detached parameters."""
        return (gate * delta) @ self.Q.detach().T


def ldrl_loss(
    cell: Cell,
    x: torch.Tensor,
    prev: torch.Tensor,
    states: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    xi: torch.Tensor,
    eta: torch.Tensor,
) -> torch.Tensor:
    """The local difference reconstruction loss of Ernoult et al. (ICML 2022, Eq. 12) for the gated linear feedback,
    one value per sample and step (given probes; the paper's loss is the batch mean of these)::

        L_t = -2 <xi, G(f_t(h_{t-1} + xi)) - G(h_t)> + |G(h_t + eta) - G(h_t)|^2,    G(s) = Q (D_t s) + c

    with ``xi, eta ~ N(0, sigma^2 I)`` independent and ``D_t = diag(gate)``.

    Expectation. ``G(u) - G(h_t) = J_G (u - h_t)`` exactly (``J_G = Q D_t``; ``c`` cancels), so the second term has
    the mean ``sigma^2 |J_G|_F^2``. Taylor: ``f_t(h_{t-1} + xi) - h_t = J_f xi + T_2[xi, xi]/2 + T_3[xi, xi, xi]/6 +
    O(|xi|^4)`` (``J_f = D_t W``); ``E[xi^T J_G J_f xi] = sigma^2 tr(J_G J_f)``, the quadratic term has an odd
    moment of the symmetric ``xi`` and vanishes, the cubic one is ``O(sigma^4)``. With ``|J_G - J_f^T|_F^2 =
    |J_G|_F^2 - 2 tr(J_G J_f) + |J_f|_F^2``::

        E[L_t] = sigma^2 (|J_G|_F^2 - 2 tr(J_G J_f)) + O(sigma^4) = sigma^2 (|J_G - J_f^T|_F^2 - |J_f|_F^2) + O(sigma^4)

    (the paper states ``O(sigma^3)``; for a symmetric noise the odd order vanishes). Its minimizer over ``G`` is
    ``J_G = J_f^T`` as ``sigma -> 0``: here ``(Q - W^T) D_t = 0``, ``Q = W^T``.

    Args:
        cell: the Elman step ``f_t(u) = cell.step(u, x_t)`` (detached parameters).
        x: inputs ``[..., D]`` of the steps; prev: ``h_{t-1}`` ``[..., H]``; states: ``h_t`` ``[..., H]``; gate:
            ``phi'(z_t)`` ``[..., H]``; all broadcastable against the probes.
        weight: ``Q`` ``[H, H]`` (a Parameter for training: the loss is differentiable in it).
        xi, eta: the probes ``[..., H]`` (already scaled by ``sigma``).

    Returns:
        ``L_t`` ``[...]``, the broadcast shape without the last dimension.
    """
    with torch.no_grad():
        moved = (cell.step(prev + xi, x) - states) * gate  # [..., H]: D_t (f_t(h_{t-1} + xi) - h_t)
    dr = moved @ weight.T  # [..., H]: G(f_t(h_{t-1} + xi)) - G(h_t)
    dr_y = (gate * eta) @ weight.T  # [..., H]: G(h_t + eta) - G(h_t)
    return -2 * (xi * dr).sum(dim=-1) + dr_y.square().sum(dim=-1)


def feedback_angle(weight: torch.Tensor, weight_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The angle (degrees) between ``Q`` and ``W^T`` as flattened vectors, and the relative distance
    ``|Q - W^T|_F / |W|_F`` (the metrics of Ernoult et al.'s ``compute_dist_angle``, there per row), as 0-d tensors on
    the weights' device (no host sync); the angle is ``nan`` where either is zero.

    Args:
        weight: ``Q`` ``[H, H]``; weight_hh: ``W`` ``[H, H]``.
    """
    q, wt = weight.detach(), weight_hh.detach().T.to(weight.dtype)  # [H, H] each
    denom = q.norm() * wt.norm()
    cos = torch.where(denom > 0, (q * wt).sum() / denom, math.nan).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos)), (q - wt).norm() / wt.norm()


class LDRLFeedback(InverseSolver):
    """The gated linear feedback ``G_t(s) = Q (phi'(z_t) * s) + c`` of an Elman step, as an inverse
    ``psi_t(v) = h_{t-1} + Q (D_t (v - h_t))``, trained by the L-DRL local loss (Ernoult et al., ICML 2022).

    Training (:meth:`fit`, once per batch before :meth:`bind`, as the paper's code schedules it): ``feedback_steps``
    SGD steps on ``mean_{p, b, t} L_t / sigma^2`` over ``P = ceil(feedback_probes / (B (T - 1)))`` fresh probe pairs
    ``(xi, eta) ~ N(0, sigma^2 I)`` per sample and step (Ernoult et al.'s ``feedback_samples_per_iteration``;
    ``feedback_probes=1`` gives their default ``P = 1``), ``t = 2 .. T`` (the steps whose feedback carries a target;
    :func:`ldrl_loss`), all drawn at once: ``N = P B (T - 1) >= feedback_probes`` probe rows per SGD step. Dividing by
    ``sigma^2`` makes the loss ``O(1)`` and ``feedback_lr`` independent of ``sigma`` (SGD on the paper's undivided
    loss with ``lr`` is this one with ``feedback_lr = lr * sigma^2``). The expected gradient is ``2 (Q - W^T) M +
    O(sigma^2)``, ``M = mean_{b,t} D_t^2`` (tested), so SGD contracts towards ``W^T`` (for ``feedback_lr < 1``:
    ``M <= 1``) by ``exp(-2 feedback_lr m_j)`` per step in column ``j`` (``m_j`` the entries of ``M``), down to a
    noise floor of the angle of about ``sqrt(feedback_lr * H / N)`` rad (fitted: 0.54 degrees predicted, 0.6
    measured at ``feedback_lr = 0.01``, ``H = 8``, ``N = 896``). Cost per :meth:`fit`: ``feedback_steps`` times three
    ``[N, H] x [H, H]`` products and ``2 N H`` normal draws.

    Abilities: ``trainable`` (:meth:`fit`), ``stateful`` (``Q``, ``c``, the SGD state and the noise generator: a
    ``torch.Generator`` on the states' device seeded by ``seed``), ``fixed_point``; Elman cells only. ``Q`` and ``c``
    are created at the first :meth:`fit` or :meth:`bind` on the states' device and dtype (``init`` drawn from
    ``seed``).

    Args:
        reg: unused (as for the other trained feedbacks).
        feedback_lr: SGD learning rate of ``Q`` on the ``sigma^2``-normalized loss. noise: ``sigma > 0``.
        feedback_steps: SGD steps per :meth:`fit` (``>= 0``). feedback_probes: the least number ``N`` of probe rows
            per SGD step (``>= 1``).
        feedback_momentum: SGD momentum in ``[0, 1)`` (0: plain SGD; the paper's code uses 0.9).
        init: of ``Q``, see :class:`GatedLinearFeedback`. seed: the init and the noise generator.

    Report (:meth:`report`, after :meth:`bind`): ``feedback_angle`` (degrees between ``Q`` and ``W^T``),
    ``feedback_distance`` (``|Q - W^T|_F / |W|_F``).

    Raises:
        ValueError: invalid options (at construction); an RNN whose hidden size differs from the feedback's (at
        :meth:`fit` / :meth:`bind`). TypeError: a GRU/LSTM cell (at :meth:`fit` / :meth:`bind`).
    """

    cells = ("elman",)
    trainable = True
    stateful = True
    config_options = ("feedback_lr", "noise")

    def __init__(self, *, reg: float = 1.0, feedback_lr: float = 0.02, noise: float = 0.1, feedback_steps: int = 20,
                 feedback_probes: int = 4096, feedback_momentum: float = 0.0, init: str = "orthogonal",
                 seed: int = 0):
        if not feedback_lr > 0:
            raise ValueError(f"feedback_lr must be > 0, got {feedback_lr}")
        if not noise > 0:
            raise ValueError(f"noise must be > 0, got {noise}")
        if feedback_steps < 0:
            raise ValueError(f"feedback_steps must be >= 0, got {feedback_steps}")
        if feedback_probes < 1:
            raise ValueError(f"feedback_probes must be >= 1, got {feedback_probes}")
        if not 0 <= feedback_momentum < 1:
            raise ValueError(f"feedback_momentum must be in [0, 1), got {feedback_momentum}")
        if init not in FEEDBACK_INITS:
            raise ValueError(f"init must be one of {', '.join(FEEDBACK_INITS)}, got {init!r}")
        self.reg, self._report = float(reg), {}
        self.feedback_lr, self.noise = float(feedback_lr), float(noise)
        self.feedback_steps, self.feedback_probes = int(feedback_steps), int(feedback_probes)
        self.feedback_momentum, self.init, self.seed = float(feedback_momentum), init, int(seed)
        self.feedback: GatedLinearFeedback | None = None
        self.optimizer: torch.optim.SGD | None = None
        self.generator: torch.Generator | None = None
        self.cell: Cell | None = None

    # -- the feedback ------------------------------------------------------------------------------------------------

    def _build(self, hidden_size: int, device, dtype, weight_hh: torch.Tensor | None, init: str | None = None) -> None:
        self.feedback = GatedLinearFeedback(hidden_size, init=init or self.init, weight_hh=weight_hh,
                                            generator=torch.Generator().manual_seed(self.seed), device=device,
                                            dtype=dtype)
        self.optimizer = torch.optim.SGD([self.feedback.Q], lr=self.feedback_lr,
                                         momentum=self.feedback_momentum)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def _ensure(self, cell: Cell, states: torch.Tensor) -> GatedLinearFeedback:
        """Create the feedback on first use; check the cell and size and follow the states' device and dtype."""
        check_cell(type(self).__name__, cell, self.cells)  # fit runs before bind
        weight_hh = cell.params["weight_hh_l0"]
        if self.feedback is None:
            self._build(cell.hidden_size, states.device, states.dtype, weight_hh)
        fb = self.feedback
        if fb.Q.shape[0] != cell.hidden_size:
            raise ValueError(f"the feedback has H = {fb.Q.shape[0]}, the RNN has hidden_size {cell.hidden_size}")
        if fb.Q.device != states.device or fb.Q.dtype != states.dtype:
            fb.to(device=states.device, dtype=states.dtype)  # in place: the optimizer keeps the same Parameters
            self.generator = move_training_state(self.optimizer, self.generator, self.seed, states)
        return fb

    def fit(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``feedback_steps`` SGD steps on the normalized L-DRL loss; returns their mean loss, a 0-d tensor (no host
        sync; ``nan`` without steps or for ``T < 2``).

        The batch loss and its gradient in ``Q`` are computed from two ``[H, H]`` moments of the probes (no
        autograd): with ``m_n = D_t (f_t(h_{t-1} + xi_n) - h_t)`` and ``e_n = D_t eta_n`` over the ``N`` probe rows,
        ``sum_n L_n = -2 <Q, A>_F + <Q E, Q>_F``, ``A = sum_n xi_n m_n^T``, ``E = sum_n e_n e_n^T``, so the gradient is
        ``(2 Q E - 2 A) / (N sigma^2)`` (equal to autograd of :func:`ldrl_loss`, tested).
        """
        states = states.detach()
        fb = self._ensure(cell, states)
        if self.feedback_steps == 0 or states.shape[1] < 2:
            return states.new_tensor(math.nan)
        gate = activation_grad_from_output(states, cell.output_nonlinearity)  # [B, T, H]: D_t = phi'(z_t)
        cur, g = states[:, 1:], gate[:, 1:]  # [B, T-1, H]: steps t = 2 .. T
        z = cell.preactivation(states[:, :-1], x[:, 1:])  # [B, T-1, H]: z_t = W h_{t-1} + U x_t + b
        w_t = cell.params["weight_hh_l0"].T.to(states.dtype)  # [H, H]
        hidden = states.shape[-1]
        samples = -(-self.feedback_probes // (cur.shape[0] * cur.shape[1]))  # P = ceil(probes / (B (T-1)))
        shape = (samples, *cur.shape)  # [P, B, T-1, H]
        sigma, rows = self.noise, samples * cur.shape[0] * cur.shape[1]  # N = P B (T-1) probe rows
        scale = 1.0 / (rows * sigma**2)
        total = states.new_zeros(())
        q = fb.Q
        for _ in range(self.feedback_steps):
            xi = torch.randn(shape, generator=self.generator, device=states.device, dtype=states.dtype).mul_(sigma)
            eta = torch.randn(shape, generator=self.generator, device=states.device, dtype=states.dtype).mul_(sigma)
            with torch.no_grad():
                moved = activation(z + xi @ w_t, cell.output_nonlinearity).sub_(cur).mul_(g)  # [P, B, T-1, H]
                e = eta.mul_(g).reshape(rows, hidden)  # [N, H]: D_t eta, in place
                a = xi.reshape(rows, hidden).T @ moved.reshape(rows, hidden)  # [H, H]: sum_n xi_n m_n^T
                qm = q @ (e.T @ e)  # [H, H]: Q E
                total += scale * (qm * q - 2 * a * q).sum()  # the loss at this step's Q
                q.grad = (2 * scale) * (qm - a)  # [H, H]
            self.optimizer.step()
        return total / self.feedback_steps

    # -- the inverse ---------------------------------------------------------------------------------------------------

    def bind(self, cell, x, states):
        self._ensure(cell, states)
        super().bind(cell, x, states)
        self.gate = activation_grad_from_output(states, cell.output_nonlinearity)  # [B, T, H]: D_t
        return self

    def difference(self, t, delta):
        """``G_t(h_t + delta) - G_t(h_t) = Q (D_t delta)`` (exact: ``G_t`` is affine), detached parameters."""
        return self.feedback.difference(delta, self.gate[:, t])

    def linearized(self, t, delta):
        return self.difference(t, delta)

    def invert(self, t, v):
        return self.states[:, t - 1] + self.difference(t, v - self.states[:, t])

    def report(self) -> dict[str, float]:
        if self.feedback is None or self.cell is None:  # not bound yet
            return {}
        angle, distance = feedback_angle(self.feedback.Q, self.cell.params["weight_hh_l0"])
        return {"feedback_angle": float(angle), "feedback_distance": float(distance)}

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``Q``, ``c``, the SGD state and the noise generator state (copies), or ``{}`` before the first call."""
        if self.feedback is None:
            return {}
        return {
            "Q": self.feedback.Q.detach().clone(),
            "c": self.feedback.c.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (``{}``: nothing). An existing feedback keeps its device and dtype (a checkpoint
        loaded with ``map_location="cpu"`` does not move a CUDA run); else the saved tensors' are used until the
        first call moves them to the states' (a generator moved to another device is re-seeded)."""
        if not state:
            return
        like = self.feedback.Q if self.feedback is not None else state["Q"]
        self._build(state["Q"].shape[0], like.device, like.dtype, None, init="zeros")  # then overwritten
        with torch.no_grad():
            self.feedback.Q.copy_(state["Q"])
            self.feedback.c.copy_(state["c"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"])
