"""L-DRL: difference target propagation through time with a feedback trained by the local difference
reconstruction loss (Ernoult, Normandin, Moudgil, Spinney, Belilovsky, Rish, Richards & Bengio, "Towards Scaling
Difference Target Propagation by Learning Backprop Targets", ICML 2022). Math core: imports only torch.

A preset of parts: :class:`~seqtp.methods.TargetProp` with the difference rule, the local update and the L-DRL
feedback :class:`~seqtp.inverses.gated.LDRLFeedback` (the gated linear map ``G_t(s) = Q (phi'(z_t) * s) + c`` and its
training), plus an optional gradient clip.
"""

from __future__ import annotations

import torch

from ..inverses.gated import FEEDBACK_INITS, GatedLinearFeedback, LDRLFeedback, feedback_angle, ldrl_loss
from .target_prop import TargetProp

__all__ = ["FEEDBACK_INITS", "LDRL", "GatedLinearFeedback", "LDRLFeedback", "feedback_angle", "ldrl_loss"]


class LDRL(TargetProp):
    """DTP through time with the L-DRL-trained gated linear feedback (Ernoult et al., ICML 2022), Elman cells:
    ``TargetProp(solver=LDRLFeedback(...), mode="difference", update="local")`` and a clip.

    Per batch (``backward``):

    1. Forward pass (the torch module); states ``h_1 .. h_T``, gates ``D_t = phi'(z_t)`` from ``h_t``.
    2. Feedback training (before the targets, as in the paper's code): ``feedback_steps`` SGD steps of ``Q`` on the
       normalized L-DRL loss over at least ``feedback_probes`` probe rows each (:meth:`LDRLFeedback.fit`).
    3. Output targets ``dhat_t = -target_lr * dl_i/dh_t`` (``= -target_lr * B * dL/dh_t``, per sample, as in
       :class:`seqtp.TargetProp`); the readout gets its ordinary gradient of ``L``.
    4. Difference targets: ``delta_T = dhat_T``, ``delta_{t-1} = dhat_{t-1} + G_t(h_t + delta_t) - G_t(h_t) =
       dhat_{t-1} + Q (D_t * delta_t)`` (exact: ``G_t`` is affine).
    5. Local update of the RNN (:func:`seqtp.methods.local_update_grads`): the gradient of ``(1/B) sum_{b,t} 1/2
       |f_t(h_{t-1}) - v_t|^2`` with ``h_{t-1}``, ``v_t`` constant, ``dL_loc/dz_t = -D_t * delta_t / B``. With ``Q =
       W^T``, ``delta_t = -target_lr * B * lambda_t`` (``lambda_t`` the BPTT adjoint) and the update is exactly
       ``target_lr`` times the BPTT gradient.

    State: that of the feedback (:meth:`LDRLFeedback.state_dict`: ``Q``, ``c``, the SGD state and the noise
    generator), so a resumed run is exact.

    Args:
        target_lr: ``gamma_h > 0`` (the paper's ``beta``, 0.7 there): the RNN's update is ``target_lr`` times the
            BPTT gradient at alignment (the readout's is its gradient), so the default 1 matches BPTT's scale.
        feedback_lr, noise, feedback_steps, feedback_probes, feedback_momentum, init, seed: of
            :class:`LDRLFeedback`.
        normalize: Bengio (2020)'s per-step normalization of the update (:func:`seqtp.methods.influence_weights`).
        clip: if given, clip the global norm of the ``.grad`` of all the model's parameters to this value after the
            update (as :class:`seqtp.BPTT` does). The training defaults are BPTT's (SGD lr 0.01, Nesterov 0.9, clip
            1.0): on temporal order T = 60 (H = 100, B = 20, seed 0) L-DRL reached validation accuracy 1.0 by
            iteration 700 (BPTT: 400) with the angle at 1.4-1.6 degrees throughout; without the clip neither BPTT nor
            L-DRL learned within 800-1000 iterations.

    Defaults. The paper's CIFAR-10 schedule (their code's defaults) is 20-55 feedback iterations per layer and batch,
    ``sigma`` 0.08-0.4, SGD with momentum 0.9 and per-layer rates 1e-4-0.18 on the undivided loss, one probe
    sample per iteration. Here ``sigma = 0.1`` (the ``O(sigma^2)`` bias of the minimizer shrinks ``|Q|`` by ~1%
    and turns it by < 0.2 degrees), 20 plain SGD steps at ``feedback_lr = 0.02`` with ``N >= 4096``: from a random
    orthogonal ``Q`` (~70 degrees) the angle falls below 1 degree within 10 calls on a fixed batch (B = T = H = 8;
    0.4-0.46 degrees after 30, the noise floor) and the update's cosine with BPTT reaches 0.9999.
    ``sqrt(feedback_lr * H / N)`` grows with ``H``: at ``H = 100`` the floor is ~1 degree. Cost per batch:
    ``feedback_steps`` times three ``[N, H] x [H, H]`` products and ``2 N H`` normal draws (Elman temporal order,
    H = 100, B = 20, T = 60, one CPU thread: 31-40x a BPTT backward in turns, docs/results/family/).

    Stats: ``feedback_loss`` (the mean normalized loss over this call's SGD steps, each before its step; ``nan``
    without steps), ``feedback_angle`` (degrees between ``Q`` and ``W^T`` after training), ``feedback_distance``
    (``|Q - W^T|_F / |W|_F``), ``shift_first``, ``shift_mid``, ``shift_last`` (batch mean of ``|delta_t|`` at ``t =
    1, T/2, T``); ``grad_norm`` (before clipping) with ``clip``; ``normalize_weight_max`` with ``normalize``.

    Raises:
        ValueError: invalid options (at construction); an RNN whose hidden size differs from the feedback's (at the
        first :meth:`backward` / :meth:`targets`). TypeError: a GRU/LSTM model (Elman cells only, as GAIT-prop).
    """

    has_targets = True
    takes_solver_options = False
    config_defaults = {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "clip": 1.0}  # BPTT's training defaults
    search_space = ("lr=1e-3:1", "target_lr=1e-1:10", "feedback_lr=1e-3:0.5")  # feedback_lr < 1: SGD is stable

    def __init__(
        self,
        *,
        target_lr: float = 1.0,
        feedback_lr: float = 0.02,
        noise: float = 0.1,
        feedback_steps: int = 20,
        feedback_probes: int = 4096,
        feedback_momentum: float = 0.0,
        init: str = "orthogonal",
        seed: int = 0,
        normalize: bool = False,
        clip: float | None = None,
    ):
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        feedback = LDRLFeedback(feedback_lr=feedback_lr, noise=noise, feedback_steps=feedback_steps,
                                feedback_probes=feedback_probes, feedback_momentum=feedback_momentum, init=init,
                                seed=seed)
        super().__init__(reg=1.0, target_lr=target_lr, mode="difference", update="local", solver=feedback,
                         normalize=normalize)
        self.clip = clip

    @property
    def solver(self) -> LDRLFeedback:
        """The feedback (an :class:`LDRLFeedback`): its options (``feedback_steps``, ...) and state."""
        return self._solver

    @property
    def feedback(self) -> GatedLinearFeedback | None:
        """``Q``, ``c`` (``None`` before the first call)."""
        return self._solver.feedback

    @property
    def generator(self):
        """The feedback's noise generator (``None`` before the first call)."""
        return self._solver.generator

    @property
    def feedback_steps(self) -> int:
        return self._solver.feedback_steps

    @feedback_steps.setter
    def feedback_steps(self, value: int) -> None:
        self._solver.feedback_steps = int(value)

    def backward(self, model, x, loss_fn):
        loss, stats = super().backward(model, x, loss_fn)
        for key in ("feedback_angle", "feedback_distance"):  # the feedback's report, under L-DRL's own names
            if f"solver_{key}" in stats:
                stats[key] = stats.pop(f"solver_{key}")
        if self.clip is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        return loss, stats

    def state_dict(self) -> dict:
        """The feedback's state (:meth:`LDRLFeedback.state_dict`), or ``{}`` before the first call."""
        return self._solver.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._solver.load_state_dict(state)
