"""seqtp: target propagation through time for recurrent networks, and BPTT to compare it with.

Public API (everything else is private and may change):

- :class:`RNNModel`: an Elman RNN (``torch.nn.RNN`` layout) with a linear readout.
- :func:`propagate_targets`: TP targets by regularized inversion (Roulet & Harchaoui, TMLR 2023).
- :class:`ElmanInverse`: the analytic regularized inverse of an Elman step; :class:`FactorizationError`.
- :class:`Method`, :class:`TargetProp`, :class:`BPTT`, ``METHODS``: credit assignment that fills ``.grad``.
- :func:`local_update_grads`: TP's batched local parameter update.
"""

from ._cells import elman_params
from ._inverse import ElmanInverse, FactorizationError
from ._methods import BPTT, METHODS, Method, TargetProp, local_update_grads
from ._model import RNNModel
from ._targets import propagate_targets

__all__ = [
    "BPTT",
    "METHODS",
    "ElmanInverse",
    "FactorizationError",
    "Method",
    "RNNModel",
    "TargetProp",
    "elman_params",
    "local_update_grads",
    "propagate_targets",
]
__version__ = "0.1.0"
