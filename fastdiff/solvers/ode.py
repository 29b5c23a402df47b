"""A batched adaptive Dormand–Prince RK45 integrator in plain torch.

``solve_ivp_rk45(f, t0, t1, y0)`` integrates ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` (either
direction) for a batch of states at once. The state is a tensor or a tuple of tensors (for example
``(x, log_density)``), each with the batch as its first dimension; all samples share one time and one
step size, so a step is one call of ``f`` on the whole batch.

The method is Dormand & Prince's RK5(4)7M (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.5): a
5th-order solution propagated, the embedded 4th-order solution used only for the error estimate, and
first-same-as-last (FSAL) so an accepted step costs 6 evaluations of ``f``. Step-size control is the
standard one (as scipy's ``RK45``): the scaled error of a step is

    err = || (y5 - y4) / (atol + rtol * max(|y|, |y_new|)) ||,

the step is accepted when ``err <= 1``, and the next step is ``h * clip(safety * err**(-1/5),
min_factor, max_factor)`` (no growth right after a rejection). The initial step follows Hairer's
algorithm (one extra evaluation of ``f``) unless ``first_step`` is given.

The norm ``|| . ||`` (``norm=``):

* ``"sample"`` (default): for each sample, the root-mean-square over the elements of each state
  tensor, then the maximum over the tensors of the tuple, then the **maximum over the batch**. Every
  sample meets the tolerance on its own, so adding samples to a batch never loosens anyone's accuracy
  (it can only make the shared steps smaller).
* ``"global"``: the root-mean-square over all elements of the batch of each state tensor, then the
  maximum over the tensors of the tuple (torchdiffeq's mixed RMS norm). Cheaper steps on large batches,
  but an outlier sample's error is averaged with the others'.

Taking the maximum over the tuple's tensors keeps a 1-element-per-sample accumulator (a log-density)
from being drowned out by a large state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ODESolution", "ODESolverError", "State", "StepControl", "Tolerances", "solve_ivp_rk45", "NORMS"]

State = torch.Tensor | tuple[torch.Tensor, ...]
"""An ODE state: one tensor or a tuple of tensors, each shaped ``[batch, ...]``."""

NORMS = ("sample", "global")

# Dormand–Prince RK5(4)7M tableau.
_C = (0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0)
_A = (
    (),
    (1.0 / 5.0,),
    (3.0 / 40.0, 9.0 / 40.0),
    (44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0),
    (19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0),
    (9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0),
)
_B = (35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0)  # 5th order (a_7j)
_B4 = (
    5179.0 / 57600.0,
    0.0,
    7571.0 / 16695.0,
    393.0 / 640.0,
    -92097.0 / 339200.0,
    187.0 / 2100.0,
    1.0 / 40.0,
)  # embedded 4th order
_E = tuple((_B + (0.0,))[i] - _B4[i] for i in range(7))  # y5 - y4 = h * sum_i E_i k_i
_ORDER_EXPONENT = -1.0 / 5.0  # the error estimate is O(h^5): the step scales with err^(-1/(4+1))


class ODESolverError(RuntimeError):
    """The integrator could not reach ``t1``: too many steps, a vanishing step or a non-finite state."""


@dataclass(frozen=True)
class Tolerances:
    """How accurately an adaptive solve runs: the error a step may make, and how many steps it may take.

    Attributes:
        rtol, atol: relative and absolute tolerances (see the module docstring for the error norm).
        max_steps: the most steps (accepted plus rejected) before :class:`ODESolverError`.

    Checked where they are used: :func:`solve_ivp_rk45` takes ``atol = 0`` with ``rtol > 0``; the PF-ODE
    solvers (:mod:`fastdiff.solvers.likelihood`, :mod:`fastdiff.solvers.inversion`) want both > 0.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 10_000


@dataclass(frozen=True)
class StepControl:
    """The step-size controller's constants (scipy's defaults): the next step is
    ``h * clip(safety * err**(-1/5), min_factor, max_factor)``. Needs ``0 < safety <= 1`` and
    ``0 < min_factor < 1 < max_factor``."""

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0


@dataclass
class ODESolution:
    """The result of :func:`solve_ivp_rk45`.

    Attributes:
        y: the state at ``t`` (same structure as ``y0``: a tensor or a tuple of tensors).
        t: the time reached (``t1``).
        nfe: number of evaluations of ``f`` (one per batch call).
        steps: number of accepted steps.
        rejected: number of rejected steps.
    """

    y: State
    t: float
    nfe: int
    steps: int
    rejected: int


def solve_ivp_rk45(
    f: Callable[[float, State], State],
    t0: float,
    t1: float,
    y0: State,
    *,
    tolerances: Tolerances = Tolerances(),
    first_step: float | None = None,
    max_step: float | None = None,
    norm: str = "sample",
    dtype: torch.dtype | None = None,
    control: StepControl = StepControl(),
) -> ODESolution:
    """Integrates ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with adaptive Dormand–Prince RK45.

    Args:
        f: ``f(t, y) -> dy/dt``; ``t`` is a Python float, ``y`` has ``y0``'s structure (a tensor or a
            tuple of tensors, each ``[batch, ...]``) and the return value must have the same structure,
            shapes and dtypes.
        t0, t1: start and end times; ``t1 < t0`` integrates backwards. ``t0 == t1`` returns ``y0``.
        y0: the initial state: a tensor or a tuple of tensors sharing the batch dimension 0.
        tolerances: ``rtol``, ``atol`` (finite, >= 0, not both 0) and ``max_steps`` (an int >= 1); default
            ``Tolerances()``: 1e-5, 1e-5, 10 000.
        first_step: the initial |step|; default: Hairer's estimate (one extra evaluation of ``f``).
        max_step: the largest |step| allowed (default: unbounded, ``|t1 - t0|``).
        norm: ``"sample"`` (per-sample RMS, maximum over the batch) or ``"global"`` (RMS over the batch);
            see the module docstring.
        dtype: integrate in this floating dtype (e.g. ``torch.float64``); default: ``y0``'s dtype.
        control: the step-size controller's constants (:class:`StepControl`, scipy's defaults).

    Returns:
        An :class:`ODESolution` with the final state ``y`` (in the integration dtype) and ``nfe``.

    Raises:
        TypeError: ``tolerances`` or ``control`` of the wrong type.
        ValueError: bad arguments (naming the argument).
        ODESolverError: ``max_steps`` exceeded, the step size underflowed, or the state became NaN/Inf.
    """
    t0, t1 = _check_time("t0", t0), _check_time("t1", t1)
    _check_tolerances(tolerances)
    _check_step_options(first_step, max_step, norm, dtype, control)
    is_tuple = isinstance(y0, (tuple, list))
    ys = _as_tuple(y0, dtype)
    if t0 == t1:
        return ODESolution(y=_pack(ys, is_tuple), t=t1, nfe=0, steps=0, rejected=0)
    run = _DormandPrince(_shape_checked(f, is_tuple), t1, tolerances, norm, control)
    run.start(t0, ys, first_step, max_step)
    while run.direction * (t1 - run.t) > 0:
        run.check_can_step(t0)
        run.attempt_step()
    if not _all_finite(run.ys):
        raise ODESolverError(f"solve_ivp_rk45 produced a non-finite state at t={run.t:.6g}")
    return ODESolution(y=_pack(run.ys, is_tuple), t=t1, nfe=run.nfe, steps=run.steps, rejected=run.rejected)


# --------------------------------------------------------------------------- the integration loop
_Tensors = tuple[torch.Tensor, ...]


class _DormandPrince:
    """The integration from one start to ``t1``: the current time, state, FSAL derivative, step size and counts."""

    def __init__(
        self,
        call: Callable[[float, _Tensors], _Tensors],
        t1: float,
        tolerances: Tolerances,
        norm: str,
        control: StepControl,
    ):
        self.call, self.t1, self.tol, self.norm, self.control = call, t1, tolerances, norm, control
        self.nfe = self.steps = self.rejected = 0
        self.rejected_last = False

    def start(self, t0: float, ys: _Tensors, first_step: float | None, max_step: float | None) -> None:
        """Evaluates ``f(t0, y0)`` (checked finite) and picks the first step size (Hairer's unless given)."""
        self.t, self.ys = t0, ys
        self.direction = 1.0 if self.t1 > t0 else -1.0
        span = abs(self.t1 - t0)
        self.max_step = span if max_step is None else min(float(max_step), span)
        self.k1 = self.call(t0, ys)
        self.nfe += 1
        if not _all_finite(ys) or not _all_finite(self.k1):
            raise ODESolverError(f"solve_ivp_rk45: y0 or f(t0, y0) is not finite (NaN/Inf) at t0={t0}")
        if first_step is None:
            tol = self.tol
            h_abs = _initial_step(self.call, t0, ys, self.k1, self.direction, tol.rtol, tol.atol, self.norm)
            self.nfe += 1
        else:
            h_abs = float(first_step)
        if not (math.isfinite(h_abs) and h_abs > 0):
            h_abs = 1e-6 * span
        self.h_abs = min(h_abs, self.max_step)

    def check_can_step(self, t0: float) -> None:
        """Raises :class:`ODESolverError` when the step budget is spent or the step has become too small."""
        t, tol = self.t, self.tol
        if self.steps + self.rejected >= tol.max_steps:
            raise ODESolverError(
                f"solve_ivp_rk45 exceeded max_steps={tol.max_steps} at t={t:.6g} "
                f"(from {t0} to {self.t1}, rtol={tol.rtol}, atol={tol.atol}); loosen the tolerances "
                "or raise max_steps"
            )
        min_step = 10.0 * abs(math.nextafter(t, self.direction * math.inf) - t)
        if self.h_abs < min_step:
            raise ODESolverError(
                f"solve_ivp_rk45's step size underflowed at t={t:.6g} (the problem is too "
                "stiff or the right-hand side is discontinuous there)"
            )

    def attempt_step(self) -> None:
        """One trial step: accepted (time and state advance) or rejected; the step size adapts either way."""
        t = self.t
        t_new = self._step_end(min(self.h_abs, self.max_step))
        h = t_new - t
        self.h_abs = abs(h)
        y_new, k7, err_vec = _dopri_trial(self.call, t, t_new, self.ys, self.k1)
        self.nfe += 6
        err = _error_norm(err_vec, self.ys, y_new, self.tol.rtol, self.tol.atol, self.norm)
        if not math.isfinite(err):
            err = math.inf  # a NaN/Inf trial state: reject and shrink (until the step underflows)
        if err <= 1.0:
            self.t, self.ys, self.k1 = t_new, y_new, k7
            self.steps += 1
            self.h_abs *= _growth_factor(err, self.control, self.rejected_last)
            self.rejected_last = False
        else:
            self.rejected += 1
            self.h_abs *= _shrink_factor(err, self.control)
            self.rejected_last = True

    def _step_end(self, h_abs: float) -> float:
        """``t + direction * h_abs``, landing exactly on ``t1`` when it would pass it or come within rounding."""
        t1 = self.t1
        t_new = self.t + self.direction * h_abs
        if self.direction * (t_new - t1) > 0 or abs(t1 - t_new) < 1e-12 * max(1.0, abs(t1)):
            t_new = t1
        return t_new


def _dopri_trial(
    call: Callable[[float, _Tensors], _Tensors], t: float, t_new: float, ys: _Tensors, k1: _Tensors
) -> tuple[_Tensors, _Tensors, _Tensors]:
    """One Dormand–Prince step from ``(t, ys)`` to ``t_new`` given ``k1 = f(t, ys)`` (FSAL): the 5th-order state,
    ``f`` there (the next step's ``k1``) and the error estimate ``y5 - y4``."""
    h = t_new - t
    ks = [k1]
    for i in range(1, 6):
        yi = _axpy(ys, h, _A[i], ks)
        ks.append(call(t + _C[i] * h, yi))
    y_new = _axpy(ys, h, _B, ks)
    k7 = call(t_new, y_new)
    ks.append(k7)
    err_vec = tuple(sum(_E[i] * h * ks[i][j] for i in range(7) if _E[i] != 0.0) for j in range(len(ys)))
    return y_new, k7, err_vec


def _growth_factor(err: float, control: StepControl, after_rejection: bool) -> float:
    """The step-size factor after an accepted step (no growth right after a rejection)."""
    factor = control.max_factor if err == 0 else min(control.max_factor, control.safety * err**_ORDER_EXPONENT)
    if after_rejection:
        factor = min(factor, 1.0)
    return max(factor, control.min_factor)


def _shrink_factor(err: float, control: StepControl) -> float:
    """The step-size factor after a rejected step (the smallest one for a non-finite error)."""
    if not math.isfinite(err):
        return control.min_factor
    return max(control.min_factor, control.safety * err**_ORDER_EXPONENT)


# --------------------------------------------------------------------------- helpers
def _check_time(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _check_tolerances(tolerances: Tolerances) -> None:
    """rtol and atol finite and >= 0, not both 0; max_steps an int >= 1."""
    if not isinstance(tolerances, Tolerances):
        raise TypeError(f"tolerances must be a fastdiff.solvers.ode.Tolerances, got {type(tolerances).__name__}")
    rtol, atol, max_steps = tolerances.rtol, tolerances.atol, tolerances.max_steps
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol must not both be 0")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")


def _check_step_options(
    first_step: float | None, max_step: float | None, norm: str, dtype: torch.dtype | None, control: StepControl
) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if first_step is not None and not (math.isfinite(first_step) and first_step > 0):
        raise ValueError(f"first_step must be a finite float > 0, got {first_step!r}")
    if max_step is not None and not (max_step > 0):
        raise ValueError(f"max_step must be > 0, got {max_step!r}")
    if not isinstance(control, StepControl):
        raise TypeError(f"control must be a fastdiff.solvers.ode.StepControl, got {type(control).__name__}")
    safety, min_factor, max_factor = control.safety, control.min_factor, control.max_factor
    if not (0 < safety <= 1 and 0 < min_factor < 1 < max_factor):
        raise ValueError(
            "need 0 < safety <= 1 and 0 < min_factor < 1 < max_factor, got "
            f"safety={safety}, min_factor={min_factor}, max_factor={max_factor}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _shape_checked(f: Callable[[float, State], State], is_tuple: bool) -> Callable[[float, _Tensors], _Tensors]:
    """``f`` on tuples of tensors: the state packed as the caller gave it, the result checked against it."""

    def call(t: float, y: _Tensors) -> _Tensors:
        out = f(t, _pack(y, is_tuple))
        out_t = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(out_t) != len(y) or any(not isinstance(o, torch.Tensor) or o.shape != v.shape for o, v in zip(out_t, y)):
            raise ValueError(
                "f(t, y) must return the structure and shapes of y: got "
                f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out_t]}"
                f" for {[tuple(v.shape) for v in y]}"
            )
        return tuple(o.to(v.dtype) for o, v in zip(out_t, y))

    return call


def _as_tuple(y0: State, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    ys = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not ys:
        raise ValueError("y0 must be a tensor or a non-empty tuple of tensors")
    out = []
    for i, y in enumerate(ys):
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y0[{i}] must be a torch.Tensor, got {type(y).__name__}")
        if y.ndim < 1:
            raise ValueError(f"y0[{i}] must have a batch dimension (shape [batch, ...]), got a scalar")
        if not y.is_floating_point():
            raise ValueError(f"y0[{i}] must be a floating tensor, got {y.dtype}")
        if y.shape[0] != ys[0].shape[0]:
            raise ValueError(f"every tensor of y0 must share the batch size {ys[0].shape[0]}, y0[{i}] has {y.shape[0]}")
        out.append(y.detach().to(dtype) if dtype is not None else y.detach())
    return tuple(out)


def _pack(ys: tuple[torch.Tensor, ...], is_tuple: bool) -> State:
    return ys if is_tuple else ys[0]


def _axpy(
    ys: tuple[torch.Tensor, ...], h: float, coefs: Sequence[float], ks: Sequence[tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """y + h * sum_i coefs[i] * ks[i], per tensor of the tuple."""
    out = []
    for j, y in enumerate(ys):
        acc = y
        for c, k in zip(coefs, ks):
            if c != 0.0:
                acc = acc + (h * c) * k[j]
        out.append(acc)
    return tuple(out)


def _all_finite(ys: tuple[torch.Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(y).all()) for y in ys)


def _rms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample RMS [batch] ("sample") or the RMS over everything (a scalar, "global")."""
    if norm == "sample":
        return x.reshape(x.shape[0], -1).square().mean(dim=1).sqrt()
    return x.square().mean().sqrt()


def _error_norm(
    err: tuple[torch.Tensor, ...],
    y: tuple[torch.Tensor, ...],
    y_new: tuple[torch.Tensor, ...],
    rtol: float,
    atol: float,
    norm: str,
) -> float:
    per_tensor = []
    for e, a, b in zip(err, y, y_new):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        per_tensor.append(_rms(e / scale, norm))
    total = torch.stack(per_tensor).amax(dim=0)  # max over the tuple's tensors
    return float(total.max()) if norm == "sample" else float(total)


def _initial_step(
    call: Callable,
    t0: float,
    y0: tuple[torch.Tensor, ...],
    f0: tuple[torch.Tensor, ...],
    direction: float,
    rtol: float,
    atol: float,
    norm: str,
) -> float:
    """Hairer, Nørsett & Wanner's starting step (II.4), as scipy's ``select_initial_step``."""
    scale = tuple(atol + rtol * y.abs() for y in y0)
    d0 = max(float(_rms(y / s, norm).max()) for y, s in zip(y0, scale))
    d1 = max(float(_rms(f / s, norm).max()) for f, s in zip(f0, scale))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = tuple(y + direction * h0 * f for y, f in zip(y0, f0))
    f1 = call(t0 + direction * h0, y1)
    d2 = max(float(_rms((b - a) / s, norm).max()) for a, b, s in zip(f0, f1, scale)) / h0
    if not math.isfinite(d2):
        return h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / 5.0)
    return min(100.0 * h0, h1)
