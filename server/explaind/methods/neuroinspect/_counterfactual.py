"""Counterfactual feature shifts ω: the smallest change of the penultimate features that
flips a mistake to its true label (NeuroInspect, Eq. 1).

For each sample the solvers minimise, from ω = 0,

    CE(W (f + ω) + b, y) + λ1 ‖ω‖₁ / D + λ2 ‖ω‖₂ / D

where the norms are divided by D as in the authors' code and the L2 term is the plain
(non-squared) norm of Eq. 1. All samples are solved in one batch: per-sample state
(ω, momentum) lives in (N, D) tensors and a sample that is done is retired from the
batch, so each sample follows the trajectory it would follow alone (up to rounding:
batched matrix products may sum in another order, about 1e-6 relative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ._checks import callback_or_none, count, finite_head, finite_rows, labels_tensor, number, require_step_fits, tensor_argument

# Progress hook: (step, max_iterations, samples still running) -> True to stop now.
SolverCallback = Callable[[int, int, int], "bool | None"]


class ShiftsOverflowed(ArithmeticError):
    """The shifts ω became NaN or infinite: l1, l2 or the learning rate are too large for
    the head (a head of huge weights overflows even the defaults)."""


@dataclass
class CounterfactualSolution:
    """Per-sample result of a solve; row i belongs to input sample i."""

    omega: torch.Tensor  # (N, D) feature shift
    converged: torch.Tensor  # (N,) bool: the prediction at f + ω equals the label
    iterations: torch.Tensor  # (N,) int64: update steps taken
    cancelled: bool = False  # the callback asked to stop before every sample finished


class _BatchState:
    """Rows still being solved, with their original indices; retires finished rows.

    The running rows' features are gathered from the caller's where they are shifted,
    not kept as a copy: the caller holds its own to the end, and a copy made at the first
    retirement stayed beside it (156 MB for 20,000 mistakes of D = 2048)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(features)
        self.rows = torch.arange(n, device=features.device)
        self.all_features = features
        self.labels = labels
        self.omega_out = torch.zeros_like(features)
        self.converged = torch.zeros(n, dtype=torch.bool, device=features.device)
        self.iterations = torch.zeros(n, dtype=torch.long, device=features.device)

    def retire(self, finished: torch.Tensor, flipped: torch.Tensor, omega: torch.Tensor, step: int) -> torch.Tensor:
        """Write out rows where ``finished``; returns the keep-mask for the caller's own state."""
        rows = self.rows[finished]
        self.omega_out[rows] = omega[finished]
        self.converged[rows] = flipped[finished]
        self.iterations[rows] = step
        keep = ~finished
        self.rows, self.labels = self.rows[keep], self.labels[keep]
        return keep

    def shifted(self, omega: torch.Tensor) -> torch.Tensor:
        """The running rows' features plus ``omega``, in a new tensor."""
        return self.all_features.index_select(0, self.rows).add_(omega)

    def cancel(self, omega: torch.Tensor, step: int, weight: torch.Tensor, bias: torch.Tensor) -> CounterfactualSolution:
        """Retire every running row (converged if its last update flipped it) and return the
        partial solution."""
        flipped = F.linear(self.shifted(omega), weight, bias).argmax(1) == self.labels
        self.retire(torch.ones_like(flipped), flipped, omega, step)
        return self.solution(cancelled=True)

    def solution(self, cancelled: bool = False) -> CounterfactualSolution:
        """The solution, unless a shift overflowed: a NaN ω row's logits argmax to class 0,
        so it would count as converged where its label is 0."""
        if not torch.isfinite(self.omega_out).all():
            raise ShiftsOverflowed(f"l1, l2 or the solver's learning_rate are too large for this head: the shifts ω overflowed "
                             f"{self.omega_out.dtype} to NaN or infinity; lower them")
        return CounterfactualSolution(self.omega_out, self.converged, self.iterations, cancelled)


def _cross_entropy_gradient(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(softmax(logits) − one-hot(labels)) @ weight, the gradient of CE in the features,
    without an (N, C) one-hot: only each label's column moves, by the same subtraction.
    With the one-hot and its difference, 2 (N, C) tensors more (160 MB for 20,000
    mistakes of a 1000-class head)."""
    probabilities = logits.softmax(1)
    probabilities[torch.arange(len(labels), device=labels.device), labels] -= 1
    return probabilities @ weight


def _penalised_gradient(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, omega: torch.Tensor,
                        l1: float, l2: float, tiny: float) -> torch.Tensor:
    """The gradient of Eq. 1 in ω at ``omega``, ``l1`` and ``l2`` already divided by D. Each
    penalty's term is scaled where it was made: a scaled copy was one (N, D) tensor more."""
    gradient = _cross_entropy_gradient(logits, labels, weight)
    gradient += omega.sign().mul_(l1)
    # ω / ‖ω‖, and 0 at ω = 0 (a zero row over the clamped norm is exactly 0).
    gradient += (omega / omega.norm(dim=1, keepdim=True).clamp_min(tiny)).mul_(l2)
    return gradient


def _tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``, a floor for norms divided by: 1e-30
    is 0 in float16, where a zero row's 0 / 0 made its ω NaN."""
    return torch.finfo(dtype).tiny


def _checked_inputs(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *,
                    l1: float, l2: float, max_iterations: int,
                    callback_on_step_end: SolverCallback | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``features`` in the head's dtype and int64 ``labels``, after checking their shapes,
    that they and the head are finite, and the settings and the callback (a solver may be
    called without the ranker's checks). A NaN logit row would count as a flip to class 0."""
    finite_head(weight, bias)
    if tensor_argument(features, "features").ndim != 2 or features.shape[1] != weight.shape[1] or not features.is_floating_point():
        raise ValueError(f"features must be floating-point (N, {weight.shape[1]}), got {features.dtype} {tuple(features.shape)}")
    number(l1, "l1")
    number(l2, "l2")
    count(max_iterations, "max_iterations")
    labels = labels_tensor(labels, "labels", count=len(features), num_classes=weight.shape[0], device=weight.device)
    features = finite_rows(features.to(weight.device, weight.dtype), "features")
    callback_or_none(callback_on_step_end, "callback_on_step_end")
    return features, labels


@dataclass(frozen=True)
class FaithfulSGD:
    """The authors' solver, batched: SGD with momentum on ω, one sample at a time semantics.

    A sample stops at the first step whose prediction already equals y (checked before
    the step) or after ``max_iterations`` steps. Its momentum buffer is per-sample and
    freezes with it, so results match a per-sample ``torch.optim.SGD`` loop.
    """

    learning_rate: float = 0.01
    momentum: float = 0.9
    name: str = "faithful"

    def __post_init__(self) -> None:
        number(self.learning_rate, "learning_rate", low_open=True)  # ≤ 0 climbs the loss instead
        if not 0 <= number(self.momentum, "momentum") < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")

    @torch.no_grad()
    def solve(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        l1: float = 0.1,
        l2: float = 0.01,
        max_iterations: int = 1000,
        callback_on_step_end: SolverCallback | None = None,
    ) -> CounterfactualSolution:
        """ω (N, D) for features (N, D), labels (N,) under head ``weight`` (C, D), ``bias`` (C,)."""
        features, labels = _checked_inputs(weight, bias, features, labels, l1=l1, l2=l2, max_iterations=max_iterations,
                                           callback_on_step_end=callback_on_step_end)
        require_step_fits(self.learning_rate, "learning_rate", features.dtype)
        state = _BatchState(features, labels)
        dim = features.shape[1]
        tiny = _tiny(features.dtype)
        omega = torch.zeros_like(features)
        velocity = torch.zeros_like(features)
        for step in range(max_iterations + 1):
            logits = F.linear(state.shifted(omega), weight, bias)
            flipped = logits.argmax(1) == state.labels
            finished = flipped if step < max_iterations else torch.ones_like(flipped)
            if finished.any():
                keep = state.retire(finished, flipped, omega, step)
                # One at a time, so each old tensor is freed before the next is copied.
                omega = omega[keep]
                velocity = velocity[keep]
                logits = logits[keep]
            if len(omega) == 0:
                break
            # The gradient is a temporary of the statement: held by a name, it stayed beside
            # the next step's, 156 MB for 20,000 mistakes of D = 2048.
            velocity.mul_(self.momentum).add_(_penalised_gradient(logits, state.labels, weight, omega, l1 / dim, l2 / dim, tiny))
            omega.add_(velocity, alpha=-self.learning_rate)  # retire copied the rows it writes out
            if callback_on_step_end is not None and callback_on_step_end(step + 1, max_iterations, len(omega)):
                return state.cancel(omega, step + 1, weight, bias)
        return state.solution()


def _fista_step(state: _BatchState, omega: torch.Tensor, lookahead: torch.Tensor, t: float, weight: torch.Tensor, bias: torch.Tensor, *,
                step_size: float, l1_threshold: float, l2_threshold: float,
                tiny: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One step of :class:`ProximalGradient` from ω = ``omega`` and the extrapolated point
    ``lookahead`` (overwritten: the gradient step is taken in its storage): the new ω, the
    new extrapolated point, each row's largest coordinate change, and the next t.

    A function so that its (N, D) temporaries end with it: held by names in the solver's
    loop, they stayed beside the next step's, 156 MB each for 20,000 mistakes of D = 2048.
    In place where nothing reads a tensor again, for the same reason."""
    logits = F.linear(state.shifted(lookahead), weight, bias)
    descent = lookahead.sub_(_cross_entropy_gradient(logits, state.labels, weight).mul_(step_size))
    new_omega = F.softshrink(descent, l1_threshold)
    norms = new_omega.norm(dim=1, keepdim=True)
    new_omega.mul_((1 - l2_threshold / norms.clamp_min(tiny)).clamp_min(0))
    t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
    difference = new_omega - omega
    change = torch.linalg.vector_norm(difference, ord=math.inf, dim=1)  # max |difference| without an (N, D) |difference|
    return new_omega, difference.mul_((t - 1) / t_next).add_(new_omega), change, t_next  # new ω + that, as addition commutes


@dataclass(frozen=True)
class ProximalGradient:
    """Accelerated proximal gradient (FISTA) on ω with the exact prox of the penalty.

    The CE term is smooth with gradient Lipschitz constant ‖W‖₂² / 2 (the softmax
    Hessian has norm ≤ 1/2), which fixes the step. The prox of a‖ω‖₁ + b‖ω‖₂ is
    soft-thresholding followed by group shrinkage, so coordinates the mistake does not
    need are exactly zero. A sample stops at the flip (checked before the step), when
    an update moves no coordinate by more than ``tolerance``, or at the cap.
    """

    tolerance: float = 1e-6
    name: str = "proximal"

    def __post_init__(self) -> None:
        number(self.tolerance, "tolerance")

    @torch.no_grad()
    def solve(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        l1: float = 0.1,
        l2: float = 0.01,
        max_iterations: int = 1000,
        callback_on_step_end: SolverCallback | None = None,
    ) -> CounterfactualSolution:
        """ω (N, D) for features (N, D), labels (N,) under head ``weight`` (C, D), ``bias`` (C,)."""
        features, labels = _checked_inputs(weight, bias, features, labels, l1=l1, l2=l2, max_iterations=max_iterations,
                                           callback_on_step_end=callback_on_step_end)
        state = _BatchState(features, labels)
        dim = features.shape[1]
        # At least float32: there is no half-precision matrix norm.
        lipschitz = float(torch.linalg.matrix_norm(weight.to(torch.promote_types(weight.dtype, torch.float32)), ord=2)) ** 2 / 2
        step_size = 1.0 / lipschitz if lipschitz > 0 else 1.0  # an all-zero head: no step moves a prediction
        require_step_fits(l1, "l1", features.dtype, factor=step_size / dim)  # the soft threshold; softshrink refuses more
        l1_threshold, l2_threshold = step_size * l1 / dim, step_size * l2 / dim
        tiny = _tiny(features.dtype)
        omega = torch.zeros_like(features)  # x_k
        lookahead = torch.zeros_like(features)  # y_k, the extrapolated point
        change = torch.full((len(features),), float("inf"), dtype=features.dtype, device=features.device)
        t = 1.0
        for step in range(max_iterations + 1):
            flipped = F.linear(state.shifted(omega), weight, bias).argmax(1) == state.labels
            finished = flipped | (change <= self.tolerance) if step < max_iterations else torch.ones_like(flipped)
            if finished.any():
                keep = state.retire(finished, flipped, omega, step)
                omega = omega[keep]  # one at a time, as above
                lookahead = lookahead[keep]
                change = change[keep]
            if len(omega) == 0:
                break
            omega, lookahead, change, t = _fista_step(state, omega, lookahead, t, weight, bias, step_size=step_size,
                                                      l1_threshold=l1_threshold, l2_threshold=l2_threshold, tiny=tiny)
            if callback_on_step_end is not None and callback_on_step_end(step + 1, max_iterations, len(omega)):
                return state.cancel(omega, step + 1, weight, bias)
        return state.solution()


class CounterfactualSolver(Protocol):
    """Anything that solves Eq. 1 for a batch; :class:`FaithfulSGD` and :class:`ProximalGradient`."""

    @property
    def name(self) -> str:
        """What the ranking reports as its solver. Read-only: frozen dataclasses qualify."""
        ...

    def solve(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *,
              l1: float, l2: float, max_iterations: int,
              callback_on_step_end: SolverCallback | None = None) -> CounterfactualSolution: ...


SOLVERS: dict[str, Callable[[], CounterfactualSolver]] = {"faithful": FaithfulSGD, "proximal": ProximalGradient}


def make_solver(solver: str | CounterfactualSolver) -> CounterfactualSolver:
    """A solver from its name (default settings) or a configured solver instance."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
        return SOLVERS[solver]()
    if isinstance(solver, type):  # its solve would take the head's weight as self
        raise TypeError(f"solver must be a name or a solver instance, got the class {solver.__name__}; "
                        f"call it: {solver.__name__}()")
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(f"solver must be a name or have a solve method, got {type(solver).__name__}")
    return solver
