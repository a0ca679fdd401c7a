"""seqtp: target propagation through time for recurrent networks, and BPTT to compare it with.

Public API (everything else is private and may change):

- :func:`tp_backward`: a drop-in TP replacement for ``loss.backward()`` on a plain ``torch.nn.RNN``/``GRU``/``LSTM``.
- :func:`propagate_targets`: TP targets by regularized inversion (Roulet & Harchaoui, TMLR 2023).
- Layer-inverse solvers behind :class:`InverseSolver` (names in ``SOLVERS``): :class:`AnalyticInverse`,
  :class:`DenseInverse`, :class:`ExactInverse`, :class:`GaussNewtonInverse`, :class:`IteratedInverse`,
  :class:`LearnedInverse`; :class:`ElmanInverse` (the Cholesky-factorized Elman inverse) and
  :class:`FactorizationError`.
- Target rules behind :class:`TargetRule` (names in ``RULES``, the ``mode`` option): linearized, difference, exact
  and GAIT's (:class:`GaitRule`).
- Cells: :func:`make_cell` and ``CELLS`` (Elman, GRU, LSTM steps on ``torch.nn`` parameters).
- :class:`RNNModel`: an Elman/GRU/LSTM network (``torch.nn`` layout) with a linear readout.
- :class:`Method`, :class:`TargetProp`, :class:`BPTT`, ``METHODS``: credit assignment that fills ``.grad``;
  :func:`local_update_grads`: TP's batched local update for Elman cells.
"""

from . import _source_tree
from ._alignment import alignment
from ._cells import CELLS, Cell, elman_params, make_cell
from ._model import RNNModel
from .inverses import (
    RULES,
    SOLVERS,
    AnalyticInverse,
    DenseInverse,
    ElmanInverse,
    ExactInverse,
    FactorizationError,
    GaitRule,
    GaussNewtonInverse,
    InverseSolver,
    IteratedInverse,
    LearnedInverse,
    TargetRule,
    propagate_targets,
)
from .methods import BPTT, DDTP, DRL, DTP, LDRL, METHODS, GAITProp, Method, TargetProp, local_update_grads, tp_backward

__all__ = [
    "BPTT",
    "CELLS",
    "DDTP",
    "DRL",
    "DTP",
    "METHODS",
    "RULES",
    "SOLVERS",
    "AnalyticInverse",
    "Cell",
    "DenseInverse",
    "ElmanInverse",
    "ExactInverse",
    "FactorizationError",
    "GAITProp",
    "GaitRule",
    "GaussNewtonInverse",
    "InverseSolver",
    "IteratedInverse",
    "LDRL",
    "LearnedInverse",
    "Method",
    "RNNModel",
    "TargetProp",
    "TargetRule",
    "alignment",
    "elman_params",
    "local_update_grads",
    "make_cell",
    "propagate_targets",
    "tp_backward",
]
__version__ = "0.2.0"

_source_tree.register()  # seqtp.tasks from a checkout used without installing it
