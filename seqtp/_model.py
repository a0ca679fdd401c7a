"""The recurrent model: a single-layer Elman RNN, GRU or LSTM with a linear readout (cuDNN forward on GPU)."""

from __future__ import annotations

import torch
from torch import nn

from ._cells import check_nonlinearity, elman_forward

CELL_KINDS = ("elman", "gru", "lstm")


class RNNModel(nn.Module):
    """A single-layer recurrent network with a linear readout.

    ``cell="elman"`` (default): ``h_t = phi(W h_{t-1} + U x_t + b)``, ``h_0 = 0``; ``"gru"`` and ``"lstm"``: the steps
    of ``torch.nn.GRU`` / ``torch.nn.LSTM``. ``self.rnn`` is a genuine ``torch.nn.RNN``/``GRU``/``LSTM``
    (``batch_first=True``), so its ``state_dict`` (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0``) is interchangeable with a plain module's: ``model.rnn.load_state_dict(plain.state_dict())`` and
    back. ``phi = identity`` (which ``torch.nn.RNN`` lacks) keeps that layout and runs the reference loop of
    :func:`seqtp._cells.elman_forward`.

    Args:
        input_size, hidden_size, output_size: ``D``, ``H`` and ``C``.
        cell: ``"elman"``, ``"gru"`` or ``"lstm"``.
        nonlinearity: ``"tanh"`` (default), ``"relu"`` or ``"identity"`` (Elman only).
        readout: ``"last"`` (one output per sequence, from ``h_T``) or ``"all"`` (one output per step).
        init: ``"orthogonal"`` (default: each ``[H, H]`` block of ``weight_hh`` orthogonal, as in the paper's code;
            the rest as in torch) or ``"default"`` (torch's uniform init).

    Shapes: ``forward(x)`` with ``x`` ``[B, T, D]`` returns ``(outputs, states)``, ``outputs`` ``[B, C]`` or
    ``[B, T, C]``, ``states`` (the ``h`` sequence) ``[B, T, H]``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        cell: str = "elman",
        nonlinearity: str = "tanh",
        readout: str = "last",
        init: str = "orthogonal",
    ):
        super().__init__()
        if cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {', '.join(CELL_KINDS)}, got {cell!r}")
        self.nonlinearity = check_nonlinearity(nonlinearity)
        if cell != "elman" and nonlinearity != "tanh":
            raise ValueError(f"nonlinearity applies to Elman cells only (got {nonlinearity!r} for a {cell} cell)")
        if readout not in ("last", "all"):
            raise ValueError(f"readout must be 'last' or 'all', got {readout!r}")
        if init not in ("orthogonal", "default"):
            raise ValueError(f"init must be 'orthogonal' or 'default', got {init!r}")
        self.cell, self.readout_mode = cell, readout
        if cell == "elman":
            cudnn_nl = "relu" if nonlinearity == "relu" else "tanh"
            self.rnn = nn.RNN(input_size, hidden_size, nonlinearity=cudnn_nl, batch_first=True)
        else:
            self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(input_size, hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size)
        if init == "orthogonal":
            with torch.no_grad():
                for block in self.rnn.weight_hh_l0.split(hidden_size, dim=0):  # [H, H] per gate
                    nn.init.orthogonal_(block)

    def states(self, x: torch.Tensor, *, truncation: int | None = None) -> torch.Tensor:
        """The states ``h_1 .. h_T`` ``[B, T, H]`` for inputs ``x`` ``[B, T, D]``.

        Args:
            truncation: if given, the state is detached every ``truncation`` steps (truncated BPTT: gradients flow
                back at most ``truncation`` steps).
        """
        seq_len = x.shape[1]
        chunk = seq_len if truncation is None else truncation
        carry, out = None, []
        for start in range(0, seq_len, chunk):
            xs = x[:, start : start + chunk]  # [B, chunk, D]
            if self.nonlinearity == "identity":
                r = self.rnn
                bias = r.bias_ih_l0 + r.bias_hh_l0
                hs = elman_forward(xs, r.weight_ih_l0, r.weight_hh_l0, bias, "identity",
                                   None if carry is None else carry[0])
                carry = hs[:, -1].unsqueeze(0)  # [1, B, H]
            else:
                hs, carry = self.rnn(xs, carry)  # [B, chunk, H]; carry [1, B, H] (LSTM: a pair)
            # the next chunk starts from a detached state
            carry = tuple(c.detach() for c in carry) if isinstance(carry, tuple) else carry.detach()
            out.append(hs)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [B, T, H]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """Readout outputs from states ``[B, T, H]``: ``[B, C]`` (``readout="last"``) or ``[B, T, C]``."""
        return self.readout(states[:, -1] if self.readout_mode == "last" else states)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.states(x)
        return self.read(states), states
