"""How a credit-assignment method's update aligns with the BPTT gradient, on one batch (math core: imports only torch).

Target propagation (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023) replaces the
gradient of the loss ``L`` by the gradient of a target-fitting loss. :func:`alignment` shows what that update is: its
cosine with, and its size relative to, the BPTT gradient ``dL/dtheta`` of the same loss; and, step by step, how the
target shifts ``delta_t`` compare with ``-dL/dh_t``, BPTT's adjoint (the steepest-descent direction for the state).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from ._cells import make_cell
from .methods import Method

LossFn = Callable[[torch.Tensor], torch.Tensor]


def alignment(
    model: torch.nn.Module, x: torch.Tensor, loss_fn: LossFn, method: Method
) -> dict[str, float | torch.Tensor]:
    """Compare ``method``'s update of the RNN's parameters with the BPTT gradient of the same loss, on one batch.

    The update ``u`` is what ``method.backward(model, x, loss_fn)`` writes into ``.grad`` of the RNN's parameters
    (``model.rnn``'s for a :class:`seqtp.RNNModel`, else all of ``model``'s); the reference is ``g = dL/dtheta``,
    ``L = loss_fn(h_1 .. h_T)`` (the readout and the task loss, a batch mean), by BPTT through an unrolled graph of
    the cell's steps. The readout is excluded from both (every method gives it its ordinary gradient). For TP with
    ``update="through_time"``, ``u = -(1/B) sum_t (dh_t/dtheta)^T delta_t`` with ``delta_t = O(1/reg)`` for
    ``t`` without a loss of its own, so ``u -> target_lr * g`` as ``reg -> inf``.

    Per step, for a method with targets (``method.has_targets``), its shifts ``delta_t = v_t - s_t`` from
    :meth:`seqtp.Method.targets` are compared with ``-lambda_t``, ``lambda_t = dL/dh_t`` the BPTT adjoint of the
    batch-mean loss: the total derivative through all later steps (the gradient with respect to step ``t``'s output
    in the unrolled graph), not only the readout's direct one. LSTM states are ``s = [h, c]``; the comparison uses the
    ``h`` part. ``step_cosine[t] = <delta_t, -lambda_t> / (|delta_t| |lambda_t|)`` over the batch and state
    dimensions together (the flattened ``[B, H]`` slices), so that samples weigh by their size, as they do in the
    batch update, and a sample with a zero adjoint adds nothing instead of an undefined cosine.

    Nothing is left changed: ``method`` runs as private copies (``copy.deepcopy``), so its state (e.g. a learned
    inverse's feedback weights and noise generator, which ``fit`` advances in ``backward``) is untouched; the
    ``.grad`` of the model's parameters and of every other leaf of the loss's graph (a user's readout) are put back
    as they were (the same tensors, or ``None``); the CPU random state (and that of ``x``'s CUDA device) is rewound
    before each of the three computations, so a random ``loss_fn`` (e.g. dropout) sees the same draws in each, and
    restored at the end. Parameters are never written.

    Cost: one BPTT pass through a Python loop of the cell's steps, one ``method.backward`` and, with targets, one
    ``method.targets`` (a forward pass and the targets again), plus copies of ``method``; a few host syncs.

    Args:
        model: a :class:`seqtp.RNNModel`, or a single-layer, ``batch_first`` ``torch.nn.RNN``/``GRU``/``LSTM``.
        x: inputs ``[B, T, D]``, of the model's dtype and device.
        loss_fn: ``states [B, T, H] -> scalar``, the readout and the task loss as a batch mean (as for
            :meth:`seqtp.Method.backward`).
        method: any :class:`seqtp.Method` (e.g. :class:`seqtp.TargetProp`, :class:`seqtp.BPTT`).

    Returns:
        A dict. Python floats: ``loss``; ``cosine`` = ``<u, g> / (|u| |g|)`` and ``norm_ratio`` = ``|u| / |g|`` over
        all the RNN's parameters together; ``update_norm`` ``|u|``, ``grad_norm`` ``|g|``; ``cosine/<name>`` for each
        RNN parameter, named as in ``model.named_parameters()`` (``rnn.weight_hh_l0``, ...). A cosine is ``nan``
        where either vector is zero (e.g. ``weight_hh`` for ``T = 1``, where ``h_0 = 0``). Only if
        ``method.has_targets``, tensors ``[T]`` on ``x``'s device: ``step_cosine`` (above; ``nan`` where either
        slice is zero), ``step_shift_norm`` = batch mean of ``|delta_t|`` (TP's ``shift_*`` statistics at
        ``t = 1, T/2, T``), ``step_adjoint_norm`` = batch mean of ``|lambda_t|``; for a method without targets (BPTT)
        these keys are absent.

    Raises:
        TypeError, ValueError: an unsupported model (as :func:`seqtp.make_cell`), or what ``method`` raises.
    """
    rnn = getattr(model, "rnn", model)
    cell = make_cell(model, detach=False)  # reads the module's parameters with their graph; validates the module
    rnn_ids = {id(p) for p in rnn.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in rnn_ids]
    rng = _RandomState(x.device)
    try:
        with torch.enable_grad():
            loss, grads, adjoint = _bptt(cell, x, loss_fn, [p for _, p in named])  # adjoint [B, T, S]
            keep = {id(p): p for p in (*_graph_leaves(loss), *model.parameters())}.values()
            saved = [(p, p.grad) for p in keep]
            try:
                for p in keep:
                    p.grad = None
                rng.rewind()
                copy.deepcopy(method).backward(model, x, loss_fn)
                update = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for _, p in named]
                if method.has_targets:
                    rng.rewind()
                    _, deltas = copy.deepcopy(method).targets(model, x, loss_fn)  # [B, T, S]
            finally:
                for p, g in saved:
                    p.grad = g
    finally:
        rng.rewind()
    u, g = torch.cat([t.flatten() for t in update]), torch.cat([t.flatten() for t in grads])
    update_norm, grad_norm = float(u.norm()), float(g.norm())
    out: dict[str, float | torch.Tensor] = {
        "loss": float(loss.detach()),
        "cosine": _cosine(u, g),
        "norm_ratio": update_norm / grad_norm if grad_norm > 0 else math.nan,
        "update_norm": update_norm,
        "grad_norm": grad_norm,
    }
    for (name, _), ui, gi in zip(named, update, grads, strict=True):
        out[f"cosine/{name}"] = _cosine(ui.flatten(), gi.flatten())
    if method.has_targets:
        hidden = cell.hidden_size
        d, lam = deltas.detach()[..., :hidden], adjoint[..., :hidden]  # [B, T, H] each: the h part
        dot = -(d * lam).sum(dim=(0, 2))  # [T]
        denom = d.square().sum(dim=(0, 2)).sqrt() * lam.square().sum(dim=(0, 2)).sqrt()  # [T]
        out["step_cosine"] = torch.where(denom > 0, dot / denom, math.nan)  # [T]
        out["step_shift_norm"] = d.norm(dim=-1).mean(dim=0)  # [T]
        out["step_adjoint_norm"] = lam.norm(dim=-1).mean(dim=0)  # [T]
    return out


def _bptt(
    cell, x: torch.Tensor, loss_fn: LossFn, params: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The loss, ``dL/dtheta`` for ``params`` and the adjoints ``dL/ds_t`` ``[B, T, S]``, by one backward pass
    through the cell's steps unrolled one tensor per step (the gradient with respect to step ``t``'s output then
    includes every later step)."""
    s = cell.initial_state(x)  # [B, S]: s_0 = 0
    steps = []
    for t in range(x.shape[1]):
        s = cell.step(s, x[:, t])  # [B, S]
        steps.append(s)
    loss = loss_fn(torch.stack(steps, dim=1)[..., : cell.hidden_size])  # states [B, T, H]
    grads = torch.autograd.grad(loss, [*params, *steps], allow_unused=True)
    grads = [torch.zeros_like(v) if gv is None else gv for v, gv in zip([*params, *steps], grads, strict=True)]
    return loss, grads[: len(params)], torch.stack(grads[len(params) :], dim=1)  # adjoint [B, T, S]


def _graph_leaves(root: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that ``root.backward()`` would write ``.grad`` into (the ``AccumulateGrad`` nodes)."""
    seen, stack, leaves = set(), [root.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return leaves


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b> / (|a| |b|)`` of two flat vectors, accumulated in float64 (so it stays in [-1, 1] for float32
    inputs); ``nan`` if either is zero."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return max(-1.0, min(1.0, float(a @ b) / denom)) if denom > 0 else math.nan


class _RandomState:
    """The CPU random state and, for a CUDA ``device``, that device's, captured once; :meth:`rewind` restores them."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)
