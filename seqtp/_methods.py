"""Credit-assignment methods: each fills ``.grad`` of a model's parameters for one batch.

A method sits on the math core (cells, inverse, targets) and knows nothing of configs, devices or logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ._cells import ElmanParams, activation_grad_from_output, elman_params
from ._inverse import ElmanInverse
from ._model import RNNModel
from ._targets import MODES, propagate_shifts

LossFn = Callable[[torch.Tensor], torch.Tensor]
UPDATES = ("local", "through_time")


class Method(ABC):
    """The contract of a credit-assignment method.

    ``backward(model, x, loss_fn)`` runs the forward pass of ``model`` (:class:`seqtp.RNNModel`) on ``x``
    ``[B, T, D]``, evaluates ``loss_fn(states)`` (``states`` ``[B, T, H]``; the readout and the task loss, a batch
    mean), and **accumulates** into ``.grad`` of every parameter of the model (zero them before, as with
    ``loss.backward()``), so that any ``torch.optim`` optimizer can then step.

    It returns ``(loss, stats)``: the detached scalar loss and a dict of detached diagnostic tensors (no host sync).
    """

    @abstractmethod
    def backward(self, model: RNNModel, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        """Fill ``.grad`` for one batch; see the class docstring."""


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.dtype))


class BPTT(Method):
    """Backpropagation through time through ``torch.nn.RNN`` (cuDNN on GPU).

    Args:
        clip: if given, clip the global gradient norm of all parameters to this value.
        truncation: if given, truncated BPTT: the state is detached every ``truncation`` steps.
    """

    def __init__(self, *, clip: float | None = None, truncation: int | None = None):
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if truncation is not None and truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        self.clip, self.truncation = clip, truncation

    def backward(self, model, x, loss_fn):
        loss = loss_fn(model.states(x, truncation=self.truncation))
        loss.backward()
        stats = {}
        if self.clip is not None:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        return loss.detach(), stats


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
    batch = states.shape[0]
    g_z = deltas * activation_grad_from_output(states, params.nonlinearity) / -batch  # [B, T, H]
    h_prev = torch.cat([states.new_zeros(batch, 1, states.shape[2]), states[:, :-1]], dim=1)  # [B, T, H]: h_0 = 0
    g_ih = torch.einsum("bth,btd->hd", g_z, x)  # [H, D]
    g_hh = torch.einsum("bth,btk->hk", g_z, h_prev)  # [H, H]
    return g_ih, g_hh, g_z.sum(dim=(0, 1))  # [H]


class TargetProp(Method):
    """TP through time by regularized inversion (Roulet & Harchaoui, TMLR 2023).

    1. Forward pass ``h_1 .. h_T`` with ``torch.nn.RNN``.
    2. Direct targets from the loss, per sample: ``dhat_t = -target_lr * dl_i/dh_t`` where ``l_i`` is sample ``i``'s
       loss (``= B * dL/dh_t`` for the batch-mean loss ``L``), so targets do not depend on the batch size. The
       readout gets its ordinary gradient of ``L``.
    3. Targets ``v_t = h_t + delta_t`` by :func:`seqtp.propagate_targets`'s rule ``mode``.
    4. RNN gradient by ``update``: ``"local"``, the batch mean of ``sum_t 1/2 |phi(W h_{t-1} + U x_t + b) - v_t|^2``
       with ``h_{t-1}``, ``v_t`` constant (:func:`local_update_grads`), or ``"through_time"``, the batch mean of
       ``sum_t 1/2 |h_t(theta) - v_t|^2`` back-propagated through the unrolled graph (the paper's public code).

    Both losses are batch means, so the learning rate and ``target_lr`` are independent of the batch size (the
    reference code mixes a batch mean with a batch sum).

    Args:
        reg: ``r > 0`` of the regularized inverse. target_lr: ``gamma_h``. mode: the target rule. update: as above.
        eps: clamp margin of ``atanh``. shift_cap: per-step cap ``|delta_t| <= shift_cap * |h_t|`` (``None``: off).

    Stats: ``shift_first``, ``shift_mid``, ``shift_last``: batch mean of ``|delta_t|`` at ``t = 1, T/2, T``.
    """

    def __init__(
        self,
        *,
        reg: float,
        target_lr: float,
        mode: str = "linearized",
        update: str = "local",
        eps: float = 1e-3,
        shift_cap: float | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        if not target_lr > 0:
            raise ValueError(f"target_lr must be > 0, got {target_lr}")
        if shift_cap is not None and not shift_cap > 0:
            raise ValueError(f"shift_cap must be > 0, got {shift_cap}")
        self.reg, self.target_lr, self.mode, self.update = reg, target_lr, mode, update
        self.eps, self.shift_cap = eps, shift_cap

    def backward(self, model, x, loss_fn):
        through_time = self.update == "through_time"
        with torch.set_grad_enabled(through_time):
            states = model.states(x)  # [B, T, H]
        leaf = states.detach().requires_grad_()
        loss = loss_fn(leaf)
        loss.backward()  # readout .grad, and dL/dh_t in leaf.grad
        direct = leaf.grad * (-self.target_lr * x.shape[0])  # [B, T, H]: dhat_t = -gamma_h * dl_i/dh_t
        params = elman_params(model)
        inverse = ElmanInverse(params, reg=self.reg, eps=self.eps)
        deltas = propagate_shifts(
            inverse, x, leaf.detach(), direct, mode=self.mode, shift_cap=self.shift_cap
        )  # [B, T, H]
        rnn = model.rnn
        if through_time:
            targets = leaf.detach() + deltas
            (0.5 * (states - targets).square().sum(dim=(1, 2)).mean()).backward()
        else:
            g_ih, g_hh, g_b = local_update_grads(params, x, leaf.detach(), deltas)
            pairs = ((rnn.weight_ih_l0, g_ih), (rnn.weight_hh_l0, g_hh), (rnn.bias_ih_l0, g_b), (rnn.bias_hh_l0, g_b))
            for p, g in pairs:
                _accumulate(p, g)
        norms = deltas.norm(dim=-1).mean(dim=0)  # [T]
        seq_len = norms.shape[0]
        stats = {"shift_first": norms[0], "shift_mid": norms[seq_len // 2], "shift_last": norms[-1]}
        return loss.detach(), stats


METHODS: dict[str, type[Method]] = {"bptt": BPTT, "tp": TargetProp}
