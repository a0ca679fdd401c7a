"""Named methods that are presets of :class:`~seqtp.methods.target_prop.TargetProp`'s parts (a target rule, an inverse
or feedback, an update), as optax's optimizers are compositions of transforms."""

from __future__ import annotations

from .target_prop import TargetProp


class DTP(TargetProp):
    """Difference target propagation through time: difference targets through a learned feedback cell, local update.

    Lee, Zhang, Fischer & Bengio, "Difference Target Propagation", ECML-PKDD 2015; its recurrent form, Manchev &
    Spratling, "Target Propagation in Recurrent Neural Networks", JMLR 2020. The preset of
    ``TargetProp(solver="learned", mode="difference", update="local")``:

    - output targets ``dhat_t = -target_lr * dl_i/dh_t`` (per sample);
    - ``v_{t-1} = s_{t-1} + dhat_{t-1} + g(v_t, x_t) - g(s_t, x_t)`` with the feedback cell
      ``g(s, x) = tanh(V s + U_g x + c)`` (:class:`seqtp.LearnedInverse`), trained first on each batch by one SGD
      step on the noisy reconstruction loss ``mean_b mean_t |g(f(s_{t-1} + sigma e, x_t), x_t) - (s_{t-1} + sigma
      e)|^2``;
    - the local update: the batch mean of ``sum_t 1/2 |f(s_{t-1}, x_t) - v_t|^2`` with ``s_{t-1}``, ``v_t``
      constant.

    Args:
        target_lr: ``gamma_h`` of the output targets.
        feedback_lr: SGD step of the feedback cell. noise: ``sigma`` of the reconstruction loss.
        update: ``"local"`` (DTP's) or ``"through_time"``.
        shift_cap: per-step cap ``|delta_t| <= shift_cap * |s_t|`` (``None``: off).
        normalize: Bengio (2020)'s per-step normalization of the update (see :class:`TargetProp`).
        seed: seeds the feedback cell's init and its noise.
    """

    takes_solver_options = False
    config_defaults = {"lr": 0.05}
    search_space = ("lr=1e-3:1", "target_lr=1e-3:1", "feedback_lr=1e-3:1")

    def __init__(
        self,
        *,
        target_lr: float = 1e-2,
        feedback_lr: float = 0.1,
        noise: float = 0.1,
        update: str = "local",
        shift_cap: float | None = None,
        normalize: bool = False,
        seed: int = 0,
    ):
        super().__init__(reg=1.0, target_lr=target_lr, mode="difference", update=update, shift_cap=shift_cap,
                         solver="learned", normalize=normalize,
                         solver_options={"feedback_lr": feedback_lr, "noise": noise, "seed": seed})
