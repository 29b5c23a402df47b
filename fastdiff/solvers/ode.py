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

__all__ = ["ODESolution", "ODESolverError", "State", "solve_ivp_rk45", "NORMS"]

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
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    first_step: float | None = None,
    max_step: float | None = None,
    norm: str = "sample",
    dtype: torch.dtype | None = None,
    safety: float = 0.9,
    min_factor: float = 0.2,
    max_factor: float = 10.0,
) -> ODESolution:
    """Integrates ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with adaptive Dormand–Prince RK45.

    Args:
        f: ``f(t, y) -> dy/dt``; ``t`` is a Python float, ``y`` has ``y0``'s structure (a tensor or a
            tuple of tensors, each ``[batch, ...]``) and the return value must have the same structure,
            shapes and dtypes.
        t0, t1: start and end times; ``t1 < t0`` integrates backwards. ``t0 == t1`` returns ``y0``.
        y0: the initial state: a tensor or a tuple of tensors sharing the batch dimension 0.
        rtol, atol: relative and absolute tolerances (> 0; ``atol >= 0`` with ``rtol > 0``).
        max_steps: the most steps (accepted plus rejected) before :class:`ODESolverError`.
        first_step: the initial |step|; default: Hairer's estimate (one extra evaluation of ``f``).
        max_step: the largest |step| allowed (default: unbounded, ``|t1 - t0|``).
        norm: ``"sample"`` (per-sample RMS, maximum over the batch) or ``"global"`` (RMS over the batch);
            see the module docstring.
        dtype: integrate in this floating dtype (e.g. ``torch.float64``); default: ``y0``'s dtype.
        safety, min_factor, max_factor: step-size controller constants (scipy's defaults).

    Returns:
        An :class:`ODESolution` with the final state ``y`` (in the integration dtype) and ``nfe``.

    Raises:
        ValueError: bad arguments (naming the argument).
        ODESolverError: ``max_steps`` exceeded, the step size underflowed, or the state became NaN/Inf.
    """
    t0, t1 = _check_time("t0", t0), _check_time("t1", t1)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol must not both be 0")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if first_step is not None and not (math.isfinite(first_step) and first_step > 0):
        raise ValueError(f"first_step must be a finite float > 0, got {first_step!r}")
    if max_step is not None and not (max_step > 0):
        raise ValueError(f"max_step must be > 0, got {max_step!r}")
    if not (0 < safety <= 1 and 0 < min_factor < 1 < max_factor):
        raise ValueError(
            "need 0 < safety <= 1 and 0 < min_factor < 1 < max_factor, got "
            f"safety={safety}, min_factor={min_factor}, max_factor={max_factor}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    is_tuple = isinstance(y0, (tuple, list))
    ys = _as_tuple(y0, dtype)
    if t0 == t1:
        return ODESolution(y=_pack(ys, is_tuple), t=t1, nfe=0, steps=0, rejected=0)

    def call(t: float, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = f(t, _pack(y, is_tuple))
        out_t = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(out_t) != len(y) or any(not isinstance(o, torch.Tensor) or o.shape != v.shape for o, v in zip(out_t, y)):
            raise ValueError(
                "f(t, y) must return the structure and shapes of y: got "
                f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out_t]}"
                f" for {[tuple(v.shape) for v in y]}"
            )
        return tuple(o.to(v.dtype) for o, v in zip(out_t, y))

    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    max_step = span if max_step is None else min(float(max_step), span)
    nfe = 0
    k1 = call(t0, ys)
    nfe += 1
    if not _all_finite(ys) or not _all_finite(k1):
        raise ODESolverError(f"solve_ivp_rk45: y0 or f(t0, y0) is not finite (NaN/Inf) at t0={t0}")
    if first_step is None:
        h_abs = _initial_step(call, t0, ys, k1, direction, rtol, atol, norm)
        nfe += 1
    else:
        h_abs = float(first_step)
    if not (math.isfinite(h_abs) and h_abs > 0):
        h_abs = 1e-6 * span
    h_abs = min(h_abs, max_step)

    t, steps, rejected = t0, 0, 0
    rejected_last = False
    while direction * (t1 - t) > 0:
        if steps + rejected >= max_steps:
            raise ODESolverError(
                f"solve_ivp_rk45 exceeded max_steps={max_steps} at t={t:.6g} "
                f"(from {t0} to {t1}, rtol={rtol}, atol={atol}); loosen the tolerances "
                "or raise max_steps"
            )
        min_step = 10.0 * abs(math.nextafter(t, direction * math.inf) - t)
        if h_abs < min_step:
            raise ODESolverError(
                f"solve_ivp_rk45's step size underflowed at t={t:.6g} (the problem is too "
                "stiff or the right-hand side is discontinuous there)"
            )
        h_abs = min(h_abs, max_step)
        h = direction * h_abs
        t_new = t + h
        if direction * (t_new - t1) > 0 or abs(t1 - t_new) < 1e-12 * max(1.0, abs(t1)):
            t_new = t1  # land exactly on t1
        h = t_new - t
        h_abs = abs(h)

        ks = [k1]
        for i in range(1, 6):
            yi = _axpy(ys, h, _A[i], ks)
            ks.append(call(t + _C[i] * h, yi))
        y_new = _axpy(ys, h, _B, ks)
        k7 = call(t_new, y_new)
        nfe += 6
        ks.append(k7)
        err_vec = tuple(sum(_E[i] * h * ks[i][j] for i in range(7) if _E[i] != 0.0) for j in range(len(ys)))
        err = _error_norm(err_vec, ys, y_new, rtol, atol, norm)
        if not math.isfinite(err):
            err = math.inf  # a NaN/Inf trial state: reject and shrink (until the step underflows)
        if err <= 1.0:
            t, ys, k1 = t_new, y_new, k7
            steps += 1
            factor = max_factor if err == 0 else min(max_factor, safety * err**_ORDER_EXPONENT)
            if rejected_last:
                factor = min(factor, 1.0)
            h_abs *= max(factor, min_factor)
            rejected_last = False
        else:
            rejected += 1
            factor = min_factor if not math.isfinite(err) else max(min_factor, safety * err**_ORDER_EXPONENT)
            h_abs *= factor
            rejected_last = True
    if not _all_finite(ys):
        raise ODESolverError(f"solve_ivp_rk45 produced a non-finite state at t={t:.6g}")
    return ODESolution(y=_pack(ys, is_tuple), t=t1, nfe=nfe, steps=steps, rejected=rejected)


# --------------------------------------------------------------------------- helpers
def _check_time(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


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
