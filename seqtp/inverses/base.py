"""Layer-inverse solvers: the regularized inverse ``psi_t`` of a recurrent step, behind one abstract base.

Math core: imports only torch. Device and dtype follow the inputs.

Target propagation through time (Roulet & Harchaoui, "Target Propagation via Regularized Inversion", TMLR 2023)
moves a target ``v_t`` of the state ``s_t`` to a target of ``s_{t-1}`` through an (approximate, regularized)
inverse of the step ``s_t = f(s_{t-1}, x_t)``. Every solver implements the contract of :class:`InverseSolver`; names
map to classes in :data:`SOLVERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from .._cells import Cell, activation_grad_from_output


def fold_stats(stats: dict, **values) -> None:
    """Fold one call's diagnostics into a solver's running ``stats`` in place, on the device (no host sync): keys
    ending in ``_max`` keep the maximum, ``converged`` the logical and, the others the sum."""
    for key, value in values.items():
        if key not in stats:
            stats[key] = value
        elif key.endswith("_max"):
            stats[key] = torch.maximum(torch.as_tensor(stats[key]), torch.as_tensor(value))
        elif key == "converged":
            stats[key] = torch.as_tensor(stats[key]) & value
        else:
            stats[key] = stats[key] + value


def cap_shift(delta: torch.Tensor, h: torch.Tensor, shift_cap: float | None) -> torch.Tensor:
    """Rescale each row so that ``|delta| <= shift_cap * |h|`` (no-op when ``shift_cap`` is ``None``).

    Linearized tanh targets are multiplied by ``a'(h) = 1 / (1 - h^2)`` at every step, so shifts can grow
    geometrically backwards in time; this per-step, per-sample cap relative to the state norm bounds them.

    Args:
        delta: shifts ``[B, S]``; h: states ``[B, S]``; shift_cap: the ratio, or ``None``.
    """
    if shift_cap is None:
        return delta
    norm = delta.norm(dim=-1, keepdim=True)  # [B, 1]
    limit = shift_cap * h.norm(dim=-1, keepdim=True)  # [B, 1]
    scale = torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(delta.dtype).tiny), 1.0)
    return delta * scale


def flush_floor(dtype: torch.dtype) -> float:
    """The magnitude below which :func:`flush_tiny` zeroes a shift: ``sqrt(finfo(c).tiny)``, ``c`` the compute dtype
    (``float64`` for float64, else ``float32``: half types compute in float32, and bfloat16 shares its range):
    ``2^-63 ~ 1.1e-19`` in float32, ``2^-511 ~ 1.5e-154`` in float64.

    Shifts that decay geometrically backwards in time (large ``reg``, linearized rule) otherwise go on into subnormal
    floats, which many x86 cores compute far more slowly. At the square root of the smallest normal number, every
    product of two such values and every square in a norm is still a normal number, so nothing downstream (the next
    step's matrix product, CG's inner products, the local update's ``delta * phi'(z) / B``) goes subnormal either;
    and a shift ``2^-63`` is ``2^-40`` of float32's ulp at 1, far below what moves a target ``s + delta`` or adds
    to a gradient built from shifts of ordinary size (see ``docs/results/subnormals.md``).
    """
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny ** 0.5


def flush_tiny(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry of magnitude at most :func:`flush_floor` set to zero (one ``hardshrink``; NaN and
    inf pass through). Deterministic, thread- and device-independent, capturable in a CUDA graph.

    Args:
        delta: shifts ``[..., S]``.

    Returns:
        A new tensor of the same shape and dtype.
    """
    return torch.nn.functional.hardshrink(delta, flush_floor(delta.dtype))


def move_training_state(optimizer: torch.optim.Optimizer, generator: torch.Generator, seed: int,
                        like: torch.Tensor) -> torch.Generator:
    """Move a trained feedback's optimizer state to the device and dtype of ``like`` (after its parameters were moved
    in place, so the optimizer keeps the same ``Parameter`` objects), and return its noise generator on that device: a
    generator state does not move between devices, so one on another device is re-created from ``seed``."""
    for buf in optimizer.state.values():
        for key, val in buf.items():
            if torch.is_tensor(val):
                buf[key] = val.to(device=like.device, dtype=like.dtype)
    if generator.device != like.device:
        generator = torch.Generator(device=like.device).manual_seed(seed)
    return generator


CELL_NAMES = {"elman": "Elman", "gru": "GRU", "lstm": "LSTM"}


def check_cell(owner: str, cell: Cell, cells: tuple[str, ...]) -> None:
    """Refuse a cell whose kind is not in ``cells`` (a solver's or a rule's declared cells).

    Raises:
        TypeError: ``"<owner> supports Elman cells only, got a gru cell"``.
    """
    if cell.kind not in cells:
        names = " and ".join(CELL_NAMES.get(k, k) for k in cells)
        raise TypeError(f"{owner} supports {names} cells only, got a {cell.kind} cell")


def check_mode(mode: str | TargetRule) -> str | TargetRule:
    """``mode`` itself if it names a rule of :data:`RULES` or is a :class:`TargetRule` instance.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(mode, TargetRule) and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def get_rule(mode: str | TargetRule) -> TargetRule:
    """The :class:`TargetRule` of ``mode`` (a name of :data:`RULES`, or an instance, returned as it is)."""
    return mode if isinstance(mode, TargetRule) else RULES[check_mode(mode)]


class TargetRule(ABC):
    """A target rule: how a shift ``delta_t`` of the target of ``s_t`` becomes a shift of the target of ``s_{t-1}``
    through a bound inverse ``psi_t`` (an :class:`InverseSolver`); the recursion adds the direct shift
    ``dhat_{t-1}`` and caps the result (:func:`backward_recursion`). Names in :data:`RULES` (the ``mode`` option)."""

    name: ClassVar[str]
    cells: ClassVar[tuple[str, ...]] = ("elman", "gru", "lstm")
    """The cell kinds the rule applies to (``Cell.kind``)."""

    @abstractmethod
    def back(self, solver: InverseSolver, t: int, delta: torch.Tensor) -> torch.Tensor:
        """The shift carried back to step ``t - 1`` ``[B, S]`` from ``delta_t`` ``[B, S]``."""


class LinearizedRule(TargetRule):
    """``J_psi_t(s_t) delta_t``: the first-order change of the inverse (Roulet & Harchaoui's default)."""

    name = "linearized"

    def back(self, solver, t, delta):
        return solver.linearized(t, delta)


class DifferenceRule(TargetRule):
    """``psi_t(s_t + delta_t) - psi_t(s_t)``: difference target propagation's correction (Lee et al. 2015)."""

    name = "difference"

    def back(self, solver, t, delta):
        return solver.difference(t, delta)


class ExactRule(TargetRule):
    """``psi_t(s_t + delta_t) - s_{t-1}``: the target of ``s_{t-1}`` is the inverse of the target of ``s_t``."""

    name = "exact"

    def back(self, solver, t, delta):
        return solver.invert(t, solver.states[:, t] + delta) - solver.states[:, t - 1]


class GaitRule(TargetRule):
    """GAIT-prop's rule (Ahmad, van Gerven & Ambrogioni, NeurIPS 2020), rescaled so that nothing underflows:
    ``[psi_t(s_t + gamma phi'(z_t)^2 delta_t) - psi_t(s_t)] / gamma``, Elman cells (``phi'(z_t)`` from ``h_t``).

    The shifts it carries are GAIT's errors ``eps_t``, of order one; GAIT's targets are ``v_t = h_t + gamma eps_t``
    and its update the local update of ``eps_t`` (that of ``v_t`` divided by ``gamma``). Through the exact inverse
    (:class:`~seqtp.inverses.ExactInverse`) with an orthogonal ``W`` the errors tend to ``target_lr`` times the BPTT
    adjoints as ``gamma -> 0`` (:class:`seqtp.GAITProp` derives it): the square ``phi'^2`` cancels ``a'(h_t) = 1 /
    phi'(z_t)`` once and supplies the ``phi'`` of ``J_t^T = W^T diag(phi')``. The solver's ``difference`` should be
    free of cancellation (the exact inverse's is), or the increments of order ``gamma`` lose ``ulp / gamma`` of
    relative precision.

    Args:
        gamma: ``> 0``, the increment (``RULES["gait"]`` has the default ``1e-3``, the authors' value).

    Raises:
        ValueError: ``gamma <= 0``. (:meth:`InverseSolver.propagate` refuses the cells outside :attr:`cells`.)
    """

    name = "gait"
    cells = ("elman",)

    def __init__(self, gamma: float = 1e-3):
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def back(self, solver, t, delta):
        gate = activation_grad_from_output(solver.states[:, t], solver.cell.output_nonlinearity)  # [B, S]: phi'(z_t)
        return solver.difference(t, self.gamma * gate.square() * delta) / self.gamma


RULES: dict[str, TargetRule] = {rule.name: rule
                                for rule in (LinearizedRule(), DifferenceRule(), ExactRule(), GaitRule())}
"""The target rules by name (a method may pass a :class:`TargetRule` instance instead, e.g. ``GaitRule(gamma)``); a
fast path (the analytic inverse's kernels) may implement some rules itself (:attr:`InverseSolver.fused_rules`)."""
MODES = tuple(RULES)


class InverseSolver(ABC):
    """The regularized inverse of a recurrent step, for propagating targets backwards in time.

    Contract. Once per training iteration, :meth:`bind` gives the solver the cell (its current parameters), the
    inputs ``x`` ``[B, T, D]`` and the forward states ``states`` ``[B, T, S]`` (``s_1 .. s_T``; ``s_0 = 0``). Step
    ``t`` (a 0-based index into ``states``, ``1 <= t < T``) maps a target of ``states[:, t]`` to a target of
    ``states[:, t - 1]``:

    - ``invert(t, v)`` ``[B, S] -> [B, S]``: ``psi_t(v)``, an (approximate) minimizer of a regularized inversion
      problem, e.g. ``argmin_u |f(u, x_t) - v|^2 + r |u - s_{t-1}|^2``, with ``psi_t(s_t) = s_{t-1}``;
    - ``linearized(t, delta)``: the Jacobian of ``psi_t`` at ``s_t`` applied to ``delta`` ``[B, S]``;
    - ``difference(t, delta)``: ``psi_t(s_t + delta) - psi_t(s_t)``;
    - ``propagate(direct, mode=..., shift_cap=...)``: the shifts ``delta = v - s`` ``[B, T, S]`` of the target
      rule ``mode`` from the direct shifts ``direct`` ``[B, T, S]`` (see :func:`seqtp.propagate_targets`).

    ``report()`` returns diagnostics of the last propagation (e.g. iterations, residuals, contraction rates), as
    Python floats. Subclasses implement :meth:`invert` and may override the others with faster or exact forms.

    Optional abilities, declared here and switched on by a subclass (callers test the flags, never ``hasattr``):

    - ``trainable``: :meth:`fit` takes one training step of the inverse on a batch (a learned feedback); a method
      calls it once per batch before :meth:`bind` (TPTT order).
    - ``stateful``: :meth:`state_dict` / :meth:`load_state_dict` carry state across iterations (weights,
      optimizer, noise generator) that a checkpoint must keep.
    - ``fixed_point``: ``psi_t(s_t) = s_{t-1}`` (on by default; off for a learned feedback).
    - ``cells``: the cell kinds it takes; ``fused_rules``: the rules its own :meth:`propagate` runs on a fast path.
    - a fused fast path: :meth:`propagate_local_update` consumes the shifts inside a kernel and returns the local
      update's gradients; the base returns ``None`` (not available), and the caller then uses :meth:`propagate`.

    Args:
        reg: ``r > 0``, the weight of the proximal term.
    """

    cells: tuple[str, ...] = ("elman", "gru", "lstm")
    """The cell kinds the solver takes (``Cell.kind``; a solver built over another may set it per instance);
    :meth:`bind` refuses the others."""
    fused_rules: ClassVar[tuple[str, ...]] = ()
    """The rules :meth:`propagate` runs on its own fast path; every other rule goes through the generic recursion."""
    trainable: bool = False
    stateful: bool = False
    fixed_point: ClassVar[bool] = True
    """``psi_t(s_t) = s_{t-1}``: the regularized inverses reproduce the forward states (a learned feedback does not)."""
    config_options: ClassVar[tuple[str, ...]] = ()
    """Constructor options a training config may set (``seqtp.config`` adds them to the sections of methods that take
    solver options, typed by this constructor's annotations)."""

    def __init__(self, *, reg: float):
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        self.reg = float(reg)
        self._report: dict[str, float] = {}

    def bind(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> InverseSolver:
        """Prepare for one iteration (factorizations, etc.); returns ``self``.

        Raises:
            TypeError: a cell kind not in :attr:`cells`. ValueError: shapes that do not match the cell.
        """
        check_cell(type(self).__name__, cell, self.cells)
        if states.shape[-1] != cell.state_size or x.shape[:2] != states.shape[:2]:
            raise ValueError(
                f"shape mismatch: x {tuple(x.shape)}, states {tuple(states.shape)}; expected [B, T, D] and "
                f"[B, T, {cell.state_size}] for a {cell.kind} cell"
            )
        self.cell, self.x, self.states = cell, x, states
        self._prev: torch.Tensor | None = None
        self._report = {}
        return self

    @property
    def prev(self) -> torch.Tensor:
        """The previous states ``s_0 .. s_{T-1}`` ``[B, T, S]`` (``s_0 = 0``), built at the first use after
        :meth:`bind` (the analytic solver's linearized and difference rules never need them)."""
        if self._prev is None:
            states = self.states
            self._prev = torch.cat([self.cell.initial_state(states).unsqueeze(1), states[:, :-1]], dim=1)
        return self._prev

    @abstractmethod
    def invert(self, t: int, v: torch.Tensor) -> torch.Tensor:
        """``psi_t(v)`` ``[B, S]``."""

    def linearized(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``J_psi_t(s_t) delta`` by forward-mode autodiff of :meth:`invert` (override with a cheaper form)."""
        _, jd = torch.func.jvp(lambda v: self.invert(t, v), (self.states[:, t],), (delta,))
        return jd

    def difference(self, t: int, delta: torch.Tensor) -> torch.Tensor:
        """``psi_t(s_t + delta) - psi_t(s_t)``."""
        h = self.states[:, t]
        return self.invert(t, h + delta) - self.invert(t, h)

    def report(self) -> dict[str, float]:
        return dict(self._report)

    def fit(self, cell: Cell, x: torch.Tensor, states: torch.Tensor) -> float | torch.Tensor:
        """One training step of the inverse on a batch (``trainable`` solvers); returns its loss, a Python float or a
        0-d tensor (which spares a host sync).

        Raises:
            NotImplementedError: the solver is not trainable.
        """
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def state_dict(self) -> dict:
        """The state a checkpoint must keep (``stateful`` solvers); ``{}`` otherwise."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional ability, stateless by default
        """Restore :meth:`state_dict`."""

    def propagate_local_update(
        self, direct: torch.Tensor, *, mode: str | TargetRule = "linearized", shift_cap: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The fused fast path: the local update's gradients ``(dU, dW, db, |delta| [B, T])`` computed without
        storing the shifts, or ``None`` where this solver has none (the base); then call :meth:`propagate`."""
        return None

    def _check_propagate(self, direct: torch.Tensor, mode: str | TargetRule) -> None:
        check_mode(mode)
        if direct.shape != self.states.shape:
            raise ValueError(f"direct shifts {tuple(direct.shape)} must have the states' shape "
                             f"{tuple(self.states.shape)}")

    def propagate(
        self, direct: torch.Tensor, *, mode: str | TargetRule = "linearized", shift_cap: float | None = None
    ) -> torch.Tensor:
        """Shifts ``delta`` ``[B, T, S]`` of rule ``mode`` (a name of :data:`RULES` or a :class:`TargetRule`), from
        ``delta_T = dhat_T`` backwards (call :meth:`bind` first). Each ``delta_t`` is capped by :func:`cap_shift`
        before it is propagated further."""
        self._check_propagate(direct, mode)
        rule = get_rule(mode)
        check_cell(f"the {rule.name} rule", self.cell, rule.cells)

        def step(t: int, delta: torch.Tensor) -> torch.Tensor:  # delta_{t-1} before the cap [B, S]
            return direct[:, t - 1] + rule.back(self, t, delta)

        return backward_recursion(self.states, direct, step, shift_cap=shift_cap)


def backward_recursion(
    states: torch.Tensor,
    direct: torch.Tensor,
    step: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    shift_cap: float | None = None,
) -> torch.Tensor:
    """The backward sweep shared by every target rule: ``delta_T = flush(cap(dhat_T))``, then for ``t = T-1 .. 1``
    (0-based indices into ``states``) ``delta_{t-1} = flush(cap(step(t, delta_t)))``, each capped by
    :func:`cap_shift` against ``s_{t-1}`` and flushed by :func:`flush_tiny` (entries below ``sqrt`` of the smallest
    normal float are zeroed, so decaying shifts never reach subnormal floats) before it is propagated further.

    Args:
        states: ``[B, T, S]``; direct: ``dhat`` ``[B, T, S]``; step: ``(t, delta_t [B, S]) -> delta_{t-1}`` before the
            cap ``[B, S]``; shift_cap: the cap ratio or ``None``.

    Returns:
        ``delta`` ``[B, T, S]``.
    """
    deltas = torch.empty_like(states)  # [B, T, S]
    delta = flush_tiny(cap_shift(direct[:, -1], states[:, -1], shift_cap))  # [B, S]
    deltas[:, -1] = delta
    for t in range(states.shape[1] - 1, 0, -1):
        delta = flush_tiny(cap_shift(step(t, delta), states[:, t - 1], shift_cap))  # [B, S]
        deltas[:, t - 1] = delta
    return deltas
