"""Argument checks and helpers the PF-ODE solvers share (likelihood, inversion): what a pipeline, a state, a
tolerance must be, the dtype an integration runs in, and the PF-ODE solved by RK45 from one end to the other."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastdiff.solvers.drift import SCORE_PREDICTIONS, PFODEDrift
from fastdiff.solvers.ode import Tolerances, solve_ivp_rk45

INTEGRATION_DTYPES = (torch.float32, torch.float64)


def check_pipe(pipe: Any) -> None:
    for attr in ("model", "schedule", "prediction", "device", "dtype"):
        if not hasattr(pipe, attr):
            raise TypeError(f"pipe must be a fastdiff Pipeline (missing .{attr}), got {type(pipe).__name__}")
    if pipe.prediction not in SCORE_PREDICTIONS:
        raise ValueError(
            f"the pipeline's prediction must be one of {SCORE_PREDICTIONS} (a prediction with a "
            f"score), got {pipe.prediction!r}"
        )


def check_state(x0: Any, name: str = "x0") -> None:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch, *sample_shape], got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] < 1 or x0[0].numel() < 1:
        raise ValueError(f"{name} must have shape [batch, *sample_shape] with batch >= 1, got {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x0.dtype}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{name} must be finite (found NaN or Inf)")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def check_tolerance(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


def integration_dtype(pipe: Any, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in INTEGRATION_DTYPES:
        raise ValueError(f"dtype must be one of {INTEGRATION_DTYPES} or None (float32), got {dtype!r}")
    return dtype


def first_call_names_x0(drift: PFODEDrift, shape: tuple[int, ...]) -> PFODEDrift:
    """Wraps the model so that a model rejecting x0's shape raises a ValueError naming x0."""
    inner = drift.model
    state = {"first": True}

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not state["first"]:
            return inner(x, t, **kwargs)
        try:
            out = inner(x, t, **kwargs)
            if isinstance(out, torch.Tensor) and out.shape != x.shape:
                raise ValueError(f"it returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        except (ValueError, RuntimeError) as exc:
            text = str(exc).lower()
            if isinstance(exc, ValueError) or any(w in text for w in ("shape", "size", "dimension")):
                raise ValueError(f"x0 of shape {shape} does not fit the model (its first call failed: {exc})") from exc
            raise
        state["first"] = False
        return out

    out = PFODEDrift.__new__(PFODEDrift)
    out.__dict__.update(drift.__dict__)
    out.model = model
    return out


def check_batch_kwargs(kwargs: Mapping[str, Any], batch: int) -> None:
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != batch:
            raise ValueError(f"model_kwargs[{name!r}] has batch size {value.shape[0]}, expected {batch}")


def check_tolerances(tolerances: Any) -> None:
    """A :class:`~fastdiff.solvers.ode.Tolerances` with ``rtol`` and ``atol`` finite and > 0 (the PF-ODE solvers'
    rule, stricter than :func:`~fastdiff.solvers.ode.solve_ivp_rk45`'s) and ``max_steps`` an int >= 1."""
    if not isinstance(tolerances, Tolerances):
        raise TypeError(f"tolerances must be a fastdiff.solvers.ode.Tolerances, got {type(tolerances).__name__}")
    check_tolerance("rtol", tolerances.rtol)
    check_tolerance("atol", tolerances.atol)
    check_positive_int("max_steps", tolerances.max_steps)


def rk45_solve(
    pipe: Any,
    x: torch.Tensor,
    forward: bool,
    tolerances: Tolerances,
    dtype: torch.dtype | None,
    model_kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """The PF-ODE from ``x`` at one end of the schedule to the other (``t_min`` -> ``t_max`` when ``forward``)."""
    check_tolerances(tolerances)
    dtype = integration_dtype(pipe, dtype)
    drift = first_call_names_x0(PFODEDrift(pipe.model, pipe.schedule, pipe.prediction, model_kwargs), tuple(x.shape))
    sch = pipe.schedule
    t0, t1 = (sch.t_min, sch.t_max) if forward else (sch.t_max, sch.t_min)
    y0 = x.detach().to(device=pipe.device, dtype=dtype)
    with torch.no_grad():
        sol = solve_ivp_rk45(lambda t, y: drift(y, t), t0, t1, y0, tolerances=tolerances, norm="sample")
    return sol.y


__all__ = [
    "INTEGRATION_DTYPES",
    "check_batch_kwargs",
    "check_pipe",
    "check_positive_int",
    "check_state",
    "check_tolerance",
    "check_tolerances",
    "first_call_names_x0",
    "integration_dtype",
    "rk45_solve",
]
