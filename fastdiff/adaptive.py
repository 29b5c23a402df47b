"""Samplers that are not one fixed coefficient program, and the one place Pipeline.sample hands them to.

- ``rk45``: adaptive Dormand–Prince (:func:`fastdiff.ode.solve_ivp_rk45`) on the probability-flow ODE
  (:func:`fastdiff.drift.pf_ode_drift`) from ``t_max`` to ``t_min``; eager only (step-size control
  needs the host). Options ``rtol``, ``atol`` (default 1e-5 each). The number of network evaluations
  of the last run is stored on the pipeline as ``pipe.last_nfe``. Continuous-time schedules only
  (a discrete schedule has no PF-ODE); the result is the state at ``t_min``.
- ``pc``: score-SDE predictor-corrector (:mod:`fastdiff.corrector`); options ``snr`` (0.16), ``n_corrector`` (1).
- ``consistency``: multistep consistency sampling; option ``times`` (a decreasing sequence of schedule
  times; default: the schedule's grid for ``steps``). The output is the x0 of the last evaluation.
  The initial state is the prior noise scaled to ``sigma(times[0])`` (exact when ``alpha(times[0]) x0``
  is negligible, as at ``t_max``).

Every sampler dispatched here also sets ``pipe.last_nfe``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from fastdiff.kernels.philox import derive_seeds
from fastdiff.checks import check_noise
from fastdiff.corrector import run_pc
from fastdiff.drift import pf_ode_drift
from fastdiff.ode import solve_ivp_rk45
from fastdiff.program import build_program
from fastdiff.schedule import Grid, Schedule

SPECIAL_SAMPLERS = ("rk45", "pc", "consistency")


def sample_rk45(pipe: Any, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5,
                model_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, int]:
    """Integrates the PF-ODE from ``t_max`` (state ``x``) to ``t_min``; returns the state and the NFE."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a float > 0, got {v!r}")
    drift = pf_ode_drift(pipe.model, pipe.schedule, pipe.prediction, model_kwargs)
    sch = pipe.schedule
    with torch.no_grad():
        sol = solve_ivp_rk45(lambda t, y: drift(y, t), sch.t_max, sch.t_min, x.float(), rtol=float(rtol),
                             atol=float(atol), norm="sample")
    return sol.y.to(pipe.dtype), int(sol.nfe)


def grid_from_times(schedule: Schedule, times: Sequence[float]) -> Grid:
    """A :class:`Grid` through ``times`` plus the clean end: :meth:`Schedule.grid_from_times`."""
    return schedule.grid_from_times(times)


def run_special(pipe: Any, sampler: str, shape: tuple[int, ...], steps: int, seed: Any, spacing: Optional[str],
                x_T: Optional[torch.Tensor], return_x0: bool, progress: bool, kwargs: dict, noise: Any,
                steps_offset: int, rho: float, options: dict) -> Any:
    """Runs ``rk45``, ``pc`` or ``consistency`` for :meth:`fastdiff.Pipeline.sample` (same arguments)."""
    options = dict(options)
    if sampler == "rk45":
        if return_x0:
            raise ValueError("return_x0 is not available for sampler 'rk45'")
        x = pipe._initial_state(shape, seed, x_T)
        out, nfe = sample_rk45(pipe, x, options.get("rtol", 1e-5), options.get("atol", 1e-5), kwargs)
        pipe.last_nfe = nfe
        return out
    seeds = derive_seeds(seed, shape[0]).to(pipe.device)
    if sampler == "pc":
        snr, n_corr = options.pop("snr", 0.16), options.pop("n_corrector", 1)
        step_rule = options.pop("step_rule", "expected")
        grid = pipe.schedule.grid(steps, spacing=spacing, steps_offset=steps_offset, rho=rho)
        prog = build_program(pipe.schedule, grid, "pc", pipe.prediction, pipe.device, **options)
        check_noise(noise, prog, shape)
        x = pipe._initial_state(shape, seed, x_T)
        out, x0 = run_pc(pipe, prog, x, seeds, kwargs, noise, return_x0, progress, snr=snr, n_corrector=n_corr,
                         step_rule=step_rule)
        pipe.last_nfe = prog.stages * (1 + int(n_corr))
    elif sampler == "consistency":
        times = options.pop("times", None)
        if times is None:
            grid = pipe.schedule.grid(steps, spacing=spacing, steps_offset=steps_offset, rho=rho)
            x = pipe._initial_state(shape, seed, x_T)
        else:
            grid = grid_from_times(pipe.schedule, times)
            x = pipe._initial_state(shape, seed, x_T)
            if x_T is None:  # the prior noise, rescaled to the first time's noise level
                x = (x.float() * (float(grid.sigma[0]) / pipe.schedule.prior_std)).to(pipe.dtype)
        prog = build_program(pipe.schedule, grid, "consistency", pipe.prediction, pipe.device, **options)
        check_noise(noise, prog, shape)
        out, x0 = pipe._run(prog, x, seeds, kwargs, noise, return_x0, progress)
        pipe.last_nfe = prog.stages
    else:
        raise ValueError(f"sampler {sampler!r} is not one of {SPECIAL_SAMPLERS}")
    return (out, x0) if return_x0 else out
