"""Credit-assignment methods: each fills ``.grad`` of a model's parameters for one batch.

One module per method behind the contract of :class:`~seqtp.methods.base.Method` (``base.py``) and one registry,
:data:`METHODS`. Math core: imports only torch.
"""

from .base import LossFn, Method, accumulate, hidden_states
from .bptt import BPTT
from .drl import DDTP, DRL, DRLInverse
from .gait import GAITProp
from .ldrl import LDRL
from .presets import DTP
from .target_prop import (
    UPDATES,
    TargetProp,
    influence_weights,
    local_update_grads,
    local_update_grads_from_factor,
    local_update_loss,
    tp_backward,
)

METHODS: dict[str, type[Method]] = {"bptt": BPTT, "tp": TargetProp, "dtp": DTP, "drl": DRL, "ddtp": DDTP,
                                   "ldrl": LDRL, "gait": GAITProp}
"""Method names (``--method``, the config's ``method``) -> classes; a new method is one class and one entry here."""

__all__ = [
    "METHODS",
    "UPDATES",
    "BPTT",
    "DDTP",
    "DRL",
    "DRLInverse",
    "DTP",
    "GAITProp",
    "LDRL",
    "LossFn",
    "Method",
    "TargetProp",
    "accumulate",
    "hidden_states",
    "influence_weights",
    "local_update_grads",
    "local_update_grads_from_factor",
    "local_update_loss",
    "tp_backward",
]
