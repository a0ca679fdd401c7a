"""The Elman recurrent step and its activation functions (math core: imports only torch).

The step is ``h_t = phi(W h_{t-1} + U x_t + b)`` with ``W = weight_hh_l0`` ``[H, H]``, ``U = weight_ih_l0``
``[H, D]`` and ``b = bias_ih_l0 + bias_hh_l0`` ``[H]``: the parameter layout of ``torch.nn.RNN``.

For target propagation we also need ``a = phi^{-1}`` applied to a target and its derivative ``a'``
(Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023, Sec. 3):

=========  ======================================  =================================
phi        a(v)                                    a'(h)
=========  ======================================  =================================
tanh       atanh(clamp(v, -1 + eps, 1 - eps))      1 / (1 - clamp(h, -1+eps, 1-eps)^2)
relu       max(v, 0)  (as in the paper's code)     1[h > 0]
identity   v                                       1
=========  ======================================  =================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NONLINEARITIES = ("tanh", "relu", "identity")


def check_nonlinearity(nonlinearity: str) -> str:
    """Return ``nonlinearity`` if supported.

    Raises:
        ValueError: if it is not one of ``tanh``, ``relu``, ``identity``.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}")
    return nonlinearity


def activation(z: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """``phi(z)``, elementwise."""
    if nonlinearity == "tanh":
        return torch.tanh(z)
    if nonlinearity == "relu":
        return torch.relu(z)
    return z


def activation_grad_from_output(h: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """``phi'(z)`` written in terms of the output ``h = phi(z)`` (``1 - h^2`` for tanh, ``1[h > 0]`` for relu)."""
    if nonlinearity == "tanh":
        return 1 - h * h
    if nonlinearity == "relu":
        return (h > 0).to(h.dtype)
    return torch.ones_like(h)


def inverse_activation(v: torch.Tensor, nonlinearity: str, *, eps: float = 1e-3) -> torch.Tensor:
    """``a(v)``: the inverse of ``phi`` applied to a target ``v`` (clamped for tanh, ``max(v, 0)`` for relu)."""
    if nonlinearity == "tanh":
        return torch.atanh(v.clamp(-1 + eps, 1 - eps))
    if nonlinearity == "relu":
        return torch.relu(v)
    return v


def inverse_activation_grad(h: torch.Tensor, nonlinearity: str, *, eps: float = 1e-3) -> torch.Tensor:
    """``a'(h)``: the derivative of :func:`inverse_activation` at ``h``."""
    if nonlinearity == "tanh":
        hc = h.clamp(-1 + eps, 1 - eps)
        return 1 / (1 - hc * hc)
    if nonlinearity == "relu":
        return (h > 0).to(h.dtype)
    return torch.ones_like(h)


@dataclass(frozen=True)
class ElmanParams:
    """The parameters of a single-layer Elman cell in ``torch.nn.RNN`` layout.

    Attributes:
        weight_ih: ``U`` ``[H, D]``.
        weight_hh: ``W`` ``[H, H]``.
        bias: ``b = bias_ih + bias_hh`` ``[H]`` (zeros when the RNN has no bias).
        nonlinearity: ``tanh``, ``relu`` or ``identity``.
    """

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias: torch.Tensor
    nonlinearity: str


def elman_params(rnn: torch.nn.Module, *, dtype: torch.dtype | None = None) -> ElmanParams:
    """Read the Elman parameters of a ``torch.nn.RNN`` or of a :class:`seqtp.RNNModel` (detached).

    Args:
        rnn: a single-layer, unidirectional, ``batch_first`` ``torch.nn.RNN``, or a model with an ``rnn`` attribute
            holding one and a ``nonlinearity`` attribute (which may be ``identity``).
        dtype: cast the parameters to this dtype (default: keep theirs).

    Returns:
        The detached :class:`ElmanParams`.

    Raises:
        TypeError: if ``rnn`` is not such a module.
        ValueError: if it is multi-layer, bidirectional, or not ``batch_first``.
    """
    nonlinearity = getattr(rnn, "nonlinearity", None)
    core = getattr(rnn, "rnn", rnn)
    if not isinstance(core, torch.nn.RNN):
        raise TypeError(f"expected a torch.nn.RNN or seqtp.RNNModel, got {type(rnn).__name__}")
    if core.num_layers != 1 or core.bidirectional or not core.batch_first:
        raise ValueError("only single-layer, unidirectional, batch_first=True RNNs are supported")
    nonlinearity = check_nonlinearity(nonlinearity or core.nonlinearity)
    w_hh = core.weight_hh_l0.detach()
    if core.bias:
        bias = (core.bias_ih_l0 + core.bias_hh_l0).detach()
    else:
        bias = torch.zeros_like(w_hh[0])
    w_ih = core.weight_ih_l0.detach()
    return ElmanParams(w_ih.to(dtype), w_hh.to(dtype), bias.to(dtype), nonlinearity)


def elman_forward(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor,
    nonlinearity: str,
    h0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference Elman forward pass, one Python step per time step (differentiable).

    ``h_t = phi(W h_{t-1} + U x_t + b)``, ``h_0 = 0`` unless given.

    Args:
        x: inputs ``[B, T, D]``.
        weight_ih, weight_hh, bias: ``U`` ``[H, D]``, ``W`` ``[H, H]``, ``b`` ``[H]``.
        nonlinearity: ``tanh``, ``relu`` or ``identity``.
        h0: initial state ``[B, H]`` (zeros if ``None``).

    Returns:
        The states ``h_1 .. h_T`` ``[B, T, H]``.
    """
    batch, seq_len, _ = x.shape
    drive = x @ weight_ih.T + bias  # [B, T, H]: U x_t + b for all steps at once
    h = drive.new_zeros(batch, weight_hh.shape[0]) if h0 is None else h0
    states = []
    for t in range(seq_len):
        h = activation(drive[:, t] + h @ weight_hh.T, nonlinearity)  # [B, H]
        states.append(h)
    return torch.stack(states, dim=1)  # [B, T, H]
