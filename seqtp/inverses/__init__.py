"""Layer inverses and feedbacks: how a target of the state ``s_t`` becomes a target of ``s_{t-1}``.

One module per inverse behind the contract of :class:`~seqtp.inverses.base.InverseSolver` (``base.py``), one
registry (:data:`SOLVERS`, ``registry.py``) and :func:`propagate_targets` (``propagate.py``). Math core: imports
only torch (Triton lazily, through ``seqtp.kernels``).
"""

from .analytic import AnalyticInverse, ElmanInverse, FactorizationError, torch_shifts
from .base import (
    MODES,
    RULES,
    GaitRule,
    InverseSolver,
    TargetRule,
    backward_recursion,
    cap_shift,
    check_mode,
    flush_floor,
    flush_tiny,
    fold_stats,
    get_rule,
)
from .dense import DenseInverse
from .direct import DirectFeedback
from .exact import ExactInverse, inverse_increment, inverse_weight
from .gated import LDRLFeedback
from .gauss_newton import GaussNewtonInverse
from .iterated import IteratedInverse
from .learned import FeedbackCell, LearnedInverse
from .propagate import complete_states, propagate_targets
from .registry import DENSE_MAX_STATE, SOLVERS, auto_solver_name, make_solver

__all__ = [
    "DENSE_MAX_STATE",
    "MODES",
    "RULES",
    "SOLVERS",
    "AnalyticInverse",
    "DenseInverse",
    "DirectFeedback",
    "ElmanInverse",
    "ExactInverse",
    "FactorizationError",
    "FeedbackCell",
    "GaitRule",
    "GaussNewtonInverse",
    "InverseSolver",
    "IteratedInverse",
    "LDRLFeedback",
    "LearnedInverse",
    "TargetRule",
    "auto_solver_name",
    "backward_recursion",
    "cap_shift",
    "check_mode",
    "complete_states",
    "flush_floor",
    "flush_tiny",
    "fold_stats",
    "get_rule",
    "inverse_increment",
    "inverse_weight",
    "make_solver",
    "propagate_targets",
    "torch_shifts",
]
