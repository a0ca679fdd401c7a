"""The solver registry: names of the layer-inverse solvers, and the ``"auto"`` choice (math core: imports only torch).

A new solver is one :class:`~seqtp.inverses.base.InverseSolver` subclass in its own module plus one entry of
:data:`SOLVERS`; the config schema (``seqtp.config``) reads each solver's options from its constructor's signature.
"""

from __future__ import annotations

import inspect

from .._cells import Cell
from .analytic import AnalyticInverse
from .base import InverseSolver
from .dense import DenseInverse
from .exact import ExactInverse
from .gated import LDRLFeedback
from .gauss_newton import GaussNewtonInverse
from .iterated import IteratedInverse
from .learned import LearnedInverse

__all__ = ["DENSE_MAX_STATE", "SOLVERS", "auto_solver_name", "make_solver"]

SOLVERS: dict[str, type[InverseSolver]] = {
    "analytic": AnalyticInverse,
    "dense": DenseInverse,
    "exact": ExactInverse,
    "gauss_newton": GaussNewtonInverse,
    "iterated": IteratedInverse,
    "learned": LearnedInverse,
    "ldrl": LDRLFeedback,
}


DENSE_MAX_STATE = 128
"""``solver="auto"`` picks ``dense`` for GRU/LSTM cells with a state size ``S <= DENSE_MAX_STATE``, else
``gauss_newton``: with its default batched CG on the structured Jacobians, the dense solver was the faster of the two
at ``S = 64`` (GRU) and ``S = 128`` (LSTM, H = 64) in ``docs/results/gru_lstm.md``; above that neither was timed, and
Gauss-Newton-CG needs no ``[B, T, ...]`` Jacobian diagonals."""


def auto_solver_name(cell: Cell) -> str:
    """The solver ``"auto"`` stands for: ``analytic`` for Elman cells; for other cells ``dense`` when the state size
    is at most :data:`DENSE_MAX_STATE`, else ``gauss_newton``."""
    if cell.output_nonlinearity is not None:
        return "analytic"
    return "dense" if cell.state_size <= DENSE_MAX_STATE else "gauss_newton"


def make_solver(name: str, *, cell: Cell, reg: float, eps: float | None = None, **options) -> InverseSolver:
    """The solver ``name`` (a key of :data:`SOLVERS`, or ``"auto"``: see :func:`auto_solver_name`) built with
    ``reg``, the ``atanh`` clamp ``eps`` (for the solvers that take it) and its own keyword ``options``.

    Raises:
        ValueError: unknown name, or an option the solver does not take (one line naming it).
    """
    if name == "auto":
        name = auto_solver_name(cell)
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from auto, {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    if eps is not None and "eps" in inspect.signature(cls).parameters and "eps" not in options:
        options["eps"] = eps
    try:
        return cls(reg=reg, **options)
    except TypeError as e:
        raise ValueError(f"solver {name!r}: {e}") from None
