"""The contract of a credit-assignment method (math core: imports only torch).

A method fills ``.grad`` of a model's parameters for one batch; it knows nothing of configs, devices or logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from .._model import RNNModel

LossFn = Callable[[torch.Tensor], torch.Tensor]


class Method(ABC):
    """The contract of a credit-assignment method.

    ``backward(model, x, loss_fn)`` runs the forward pass of ``model`` (:class:`seqtp.RNNModel`) on ``x``
    ``[B, T, D]``, evaluates ``loss_fn(states)`` (``states`` ``[B, T, H]``; the readout and the task loss, a batch
    mean), and **accumulates** into ``.grad`` of every parameter of the model (zero them before, as with
    ``loss.backward()``), so that any ``torch.optim`` optimizer can then step.

    It returns ``(loss, stats)``: the detached scalar loss and a dict of detached diagnostic tensors (no host sync).

    Optional ability: a method whose update fits the states to targets sets the class attribute ``has_targets =
    True`` and implements :meth:`targets` (the targets its ``backward`` would fit on the same batch, for
    :func:`seqtp.alignment`); callers test ``has_targets``, not ``hasattr``.

    Config and tuning (read by ``seqtp.config`` and ``seqtp tune``, so a new method needs no edit there): the config
    section ``<name>:`` of a method holds the optimizer fields (``optimizer``, ``lr``, ``momentum``, ``nesterov``) and
    one field per keyword-only constructor option whose annotation is ``bool``, ``int``, ``float`` or ``str`` (or
    ``X | None``; in a union with other types, its simple member); :attr:`config_defaults` gives the training
    defaults where they differ from the constructor's (and must give required options), :attr:`search_space` the
    default ``seqtp tune`` space in ``--space`` syntax without the section prefix (``"lr=1e-4:1"``: log-uniform).
    """

    has_targets: bool = False
    config_defaults: ClassVar[dict[str, object]] = {}
    search_space: ClassVar[tuple[str, ...]] = ("lr=1e-4:1",)
    takes_solver_options: ClassVar[bool] = False
    """The config section also holds the options of the ``seqtp.SOLVERS`` (``InverseSolver.config_options``), handed
    to the constructor as ``solver_options``."""

    @abstractmethod
    def backward(self, model: RNNModel, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        """Fill ``.grad`` for one batch; see the class docstring."""

    def targets(self, model: RNNModel, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """The state targets of :meth:`backward` on this batch, without writing any ``.grad``.

        Args:
            model, x, loss_fn: as in :meth:`backward`.

        Returns:
            ``(states, deltas)``, ``[B, T, S]`` each: the forward states ``s_1 .. s_T`` and the shifts ``delta_t =
            v_t - s_t`` of the targets ``v_t``.

        Raises:
            NotImplementedError: the method has no targets (``has_targets`` is ``False``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no state targets")

    def state_dict(self) -> dict:
        """State to checkpoint (e.g. a learned inverse's weights); empty for stateless methods."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook, stateless by default
        """Restore :meth:`state_dict`."""


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.dtype))


def loss_and_state_grad(
    loss_fn: LossFn, leaf: torch.Tensor, *, readout_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn(leaf)`` and ``dL/dh`` on the forward states ``leaf`` ``[B, T, H]`` (a leaf that requires grad).

    With ``readout_grad`` the loss is back-propagated into the readout's ``.grad`` too (one backward pass gives both);
    otherwise only ``dL/dh`` is computed and no ``.grad`` is written.

    Returns:
        ``(loss, dL/dh [B, T, H])``.

    Raises:
        ValueError: ``loss_fn(states)`` does not depend on the states.
    """
    with torch.enable_grad():
        loss = loss_fn(leaf)
        if readout_grad:
            loss.backward()  # readout .grad, and dL/dh_t in leaf.grad
            dl_dh, leaf.grad = leaf.grad, None
        else:
            (dl_dh,) = torch.autograd.grad(loss, leaf, allow_unused=True)  # [B, T, H]
    if dl_dh is None:
        raise ValueError("loss_fn(states) does not depend on the states: nothing to propagate")
    return loss, dl_dh


def hidden_states(module: torch.nn.Module, x: torch.Tensor, *, truncation: int | None = None) -> torch.Tensor:
    """The outputs ``h_1 .. h_T`` ``[B, T, H]`` of an :class:`RNNModel` or a plain ``torch.nn.RNN``/``GRU``/``LSTM``."""
    if isinstance(module, RNNModel):
        return module.states(x, truncation=truncation)
    if truncation is not None:
        raise ValueError("truncation needs a seqtp.RNNModel")
    out, _ = module(x)
    return out
