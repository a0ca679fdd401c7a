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
        return torch.square(h).neg_().add_(1)  # one allocation
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
        return h.clamp(-1 + eps, 1 - eps).square_().neg_().add_(1).reciprocal_()  # one allocation
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

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """``U x_t + b`` for all steps: ``x`` ``[B, T, D]`` -> ``[B, T, H]``."""
        return x @ self.weight_ih.T + self.bias


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
    cell = make_cell(rnn, dtype=dtype)
    if not isinstance(cell, ElmanCell):
        raise TypeError(f"expected a torch.nn.RNN or an Elman seqtp.RNNModel, got a {cell.kind} cell")
    return cell.elman_params()


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


# ---------------------------------------------------------------------------------------------------------------------
# Any recurrent cell as a pure, batched step function (Elman, GRU, LSTM), reading torch.nn.RNN/GRU/LSTM parameters.


def _core_module(module: torch.nn.Module) -> torch.nn.Module:
    """The ``torch.nn.RNNBase`` inside ``module`` (itself, or a model's ``.rnn``), checked for the supported layout."""
    core = getattr(module, "rnn", module)
    if not isinstance(core, (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM)):
        raise TypeError(f"expected a torch.nn.RNN, GRU or LSTM (or seqtp.RNNModel), got {type(module).__name__}")
    if core.num_layers != 1 or core.bidirectional or not core.batch_first:
        raise ValueError(
            f"only single-layer, unidirectional, batch_first=True RNNs are supported; got num_layers="
            f"{core.num_layers}, bidirectional={core.bidirectional}, batch_first={core.batch_first}"
        )
    if getattr(core, "proj_size", 0):
        raise ValueError("LSTM with proj_size > 0 is not supported")
    return core


class Cell:
    """A recurrent step ``s_t = f(s_{t-1}, x_t)`` as a pure function, batched over any leading dimensions.

    The state ``s`` has ``state_size`` S entries; the readout sees its first ``hidden_size`` H entries (the ``h`` of
    ``torch.nn.RNN``/``GRU``; for LSTM ``s = [h, c]``, S = 2H). Parameters keep the names and layout of the torch
    module (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``; gates stacked as torch does).

    Shapes: ``step(state [..., S], x [..., D]) -> [..., S]``; ``full_states(x [B, T, D], hidden [B, T, H]) ->
    [B, T, S]`` (the state sequence ``s_1 .. s_T`` from the module's outputs ``h_1 .. h_T``; ``s_0 = 0``).

    Attributes:
        kind: ``"elman"``, ``"gru"`` or ``"lstm"``.
        output_nonlinearity: for cells whose state is ``phi(pre(s_{t-1}, x_t))`` with an invertible ``phi`` (Elman),
            its name, and ``preactivation(state, x)`` gives ``pre``; ``None`` otherwise.
        params: dict of the four tensors (detached unless built with ``detach=False``, so that autograd reaches
            the module's parameters).
    """

    kind: str = ""
    output_nonlinearity: str | None = None

    def __init__(self, module: torch.nn.Module, *, detach: bool = True, dtype: torch.dtype | None = None):
        core = _core_module(module)
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        params = {}
        for name in names:
            p = getattr(core, name, None)
            if p is None:  # bias=False
                p = torch.zeros(core.weight_hh_l0.shape[0], dtype=core.weight_hh_l0.dtype,
                                device=core.weight_hh_l0.device)
            p = p.detach() if detach else p
            params[name] = p if dtype is None else p.to(dtype)
        self.params = params
        self.hidden_size = core.hidden_size
        self.input_size = core.input_size
        self.state_size = self.hidden_size

    def _gates(self, state: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        h = state[..., : self.hidden_size]
        gi = x @ p["weight_ih_l0"].T + p["bias_ih_l0"]  # [..., G*H]
        gh = h @ p["weight_hh_l0"].T + p["bias_hh_l0"]  # [..., G*H]
        return gi, gh

    def step(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def full_states(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The state sequence ``[B, T, S]`` from the module's outputs ``hidden`` ``[B, T, H]`` (``h`` is the state
        for Elman and GRU)."""
        return hidden

    def initial_state(self, like: torch.Tensor) -> torch.Tensor:
        """``s_0 = 0`` ``[B, S]`` with the batch size, dtype and device of ``like`` ``[B, ...]``."""
        return like.new_zeros(like.shape[0], self.state_size)

    def unroll(self, x: torch.Tensor) -> torch.Tensor:
        """Reference forward pass by the step function, one Python step per time step: ``[B, T, D] -> [B, T, S]``."""
        s = self.initial_state(x)
        out = []
        for t in range(x.shape[1]):
            s = self.step(s, x[:, t])  # [B, S]
            out.append(s)
        return torch.stack(out, dim=1)  # [B, T, S]


class ElmanCell(Cell):
    """``h_t = phi(W h_{t-1} + U x_t + b)`` (``torch.nn.RNN``; ``phi`` may also be ``identity``)."""

    kind = "elman"

    def __init__(self, module, *, detach=True, dtype=None, nonlinearity: str | None = None):
        super().__init__(module, detach=detach, dtype=dtype)
        core = _core_module(module)
        self.output_nonlinearity = check_nonlinearity(nonlinearity or getattr(module, "nonlinearity", None)
                                                      or core.nonlinearity)

    def elman_params(self) -> ElmanParams:
        """The parameters as :class:`ElmanParams` (``b = bias_ih + bias_hh``)."""
        p = self.params
        return ElmanParams(p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"] + p["bias_hh_l0"],
                           self.output_nonlinearity)

    def preactivation(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W h + U x + b`` ``[..., H]``."""
        gi, gh = self._gates(state, x)
        return gi + gh

    def step(self, state, x):
        return activation(self.preactivation(state, x), self.output_nonlinearity)


class GRUCell(Cell):
    """``torch.nn.GRU``'s step: ``r, z = sigmoid(.)``, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
    ``h' = (1 - z) * n + z * h`` (gates stacked ``r, z, n``)."""

    kind = "gru"

    def step(self, state, x):
        gi, gh = self._gates(state, x)  # [..., 3H] each
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * state


class LSTMCell(Cell):
    """``torch.nn.LSTM``'s step on the state ``s = [h, c]`` (S = 2H): ``i, f, o = sigmoid(.)``, ``g = tanh(.)``,
    ``c' = f * c + i * g``, ``h' = o * tanh(c')`` (gates stacked ``i, f, g, o``)."""

    kind = "lstm"

    def __init__(self, module, *, detach=True, dtype=None):
        super().__init__(module, detach=detach, dtype=dtype)
        self.state_size = 2 * self.hidden_size

    def _gate_values(self, state, x):
        gi, gh = self._gates(state, x)  # [..., 4H] each
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    def step(self, state, x):
        i, f, g, o = self._gate_values(state, x)
        c = f * state[..., self.hidden_size :] + i * g  # [..., H]
        return torch.cat([o * torch.tanh(c), c], dim=-1)  # [..., 2H]

    def full_states(self, x, hidden):
        """``[h, c]`` ``[B, T, 2H]``: the gates of every step at once from ``h_{t-1}`` (known), then the cell-state
        recursion ``c_t = f_t * c_{t-1} + i_t * g_t`` (elementwise, one cheap loop)."""
        h_prev = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)  # [B, T, H]
        i, f, g, _ = self._gate_values(h_prev, x)  # [B, T, H] each
        c = torch.zeros_like(hidden[:, 0])  # [B, H]
        cs = []
        for t in range(hidden.shape[1]):
            c = f[:, t] * c + i[:, t] * g[:, t]
            cs.append(c)
        return torch.cat([hidden, torch.stack(cs, dim=1)], dim=-1)  # [B, T, 2H]


CELLS: dict[str, type[Cell]] = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}


def make_cell(module: torch.nn.Module, *, detach: bool = True, dtype: torch.dtype | None = None) -> Cell:
    """The :class:`Cell` of a ``torch.nn.RNN``/``GRU``/``LSTM`` or a :class:`seqtp.RNNModel`.

    Args:
        module: the recurrent module (single layer, unidirectional, ``batch_first=True``) or a model with ``.rnn``.
        detach: read detached parameters (default) or the parameters themselves (for autograd to reach them).
        dtype: cast the parameters to this dtype.

    Raises:
        TypeError, ValueError: unsupported module or layout (one line naming what is wrong).
    """
    core = _core_module(module)
    if isinstance(core, torch.nn.LSTM):
        return LSTMCell(module, detach=detach, dtype=dtype)
    if isinstance(core, torch.nn.GRU):
        return GRUCell(module, detach=detach, dtype=dtype)
    return ElmanCell(module, detach=detach, dtype=dtype)
