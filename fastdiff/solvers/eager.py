"""The eager samplers: those that are not one fixed coefficient program (:data:`fastdiff.samplers.EAGER_SAMPLERS`),
run for :meth:`fastdiff.Pipeline.sample` by :func:`run_eager_sampler`.

- ``rk45``: adaptive Dormand–Prince (:func:`fastdiff.solvers.ode.solve_ivp_rk45`) on the probability-flow ODE
  (:func:`fastdiff.solvers.drift.pf_ode_drift`) from ``t_max`` to ``t_min``; eager only (step-size control
  needs the host). Options ``rtol``, ``atol`` (default 1e-5 each). Continuous-time schedules only (a discrete
  schedule has no PF-ODE); the result is the state at ``t_min``.
- ``pc``: score-SDE predictor-corrector (:mod:`fastdiff.solvers.corrector`); options ``snr`` (0.16),
  ``n_corrector`` (1).
- ``consistency``: multistep consistency sampling; option ``times`` (a decreasing sequence of schedule
  times; default: the schedule's grid for ``steps``). The output is the x0 of the last evaluation.
  The initial state is the prior noise scaled to ``sigma(times[0])`` (exact when ``alpha(times[0]) x0``
  is negligible, as at ``t_max``).

Each returns the network evaluations it spent with its result (``Pipeline.last_nfe``).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdiff.kernels.philox import derive_seeds
from fastdiff.program import Program, build_program
from fastdiff.request import SampleRequest
from fastdiff.runtime.checks import NonFiniteError, check_noise
from fastdiff.runtime.loop import Conditioning, Loop, Recording
from fastdiff.runtime.pipeline_like import PipelineLike
from fastdiff.samplers import EAGER_SAMPLERS
from fastdiff.solvers.corrector import run_pc
from fastdiff.solvers.drift import pf_ode_drift
from fastdiff.solvers.ode import Tolerances, solve_ivp_rk45

EagerResult = tuple[Any, int]
"""(the samples, or (samples, x0 estimates) with ``return_x0``; the network evaluations spent)."""


def sample_rk45(
    pipe: PipelineLike, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5, model_kwargs: dict | None = None
) -> tuple[torch.Tensor, int]:
    """Integrates the PF-ODE from ``t_max`` (state ``x``) to ``t_min``; returns the state and the NFE."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a float > 0, got {v!r}")
    bad = (~torch.isfinite(x.float()).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:  # as the fixed-step samplers say it: no solver step can start from NaN/Inf
        raise NonFiniteError(0, bad)
    drift = pf_ode_drift(pipe.model, pipe.schedule, pipe.prediction, model_kwargs)
    sch = pipe.schedule
    with torch.no_grad():
        sol = solve_ivp_rk45(
            lambda t, y: drift(y, t),
            sch.t_max,
            sch.t_min,
            x.float(),
            tolerances=Tolerances(rtol=float(rtol), atol=float(atol)),
            norm="sample",
        )
    return sol.y.to(pipe.dtype), int(sol.nfe)


def run_eager_sampler(
    pipe: PipelineLike,
    request: SampleRequest,
    x: torch.Tensor,
    x_T_given: bool,
    return_x0: bool = False,
    progress: bool = False,
    noise: Any = None,
) -> EagerResult:
    """Runs ``request`` (sampler ``rk45``, ``pc`` or ``consistency``) from the initial state ``x`` (``x_T`` when
    ``x_T_given``, else the pipeline's initial noise for the request's seeds)."""
    options, kwargs = dict(request.options), dict(request.model_kwargs)
    if request.sampler == "rk45":
        if return_x0:
            raise ValueError("return_x0 is not available for sampler 'rk45'")
        return sample_rk45(pipe, x, options.get("rtol", 1e-5), options.get("atol", 1e-5), kwargs)
    seeds = derive_seeds(request.seed, request.n).to(pipe.device)
    if request.sampler == "pc":
        snr, n_corr = options.pop("snr", 0.16), options.pop("n_corrector", 1)
        step_rule = options.pop("step_rule", "expected")
        prog = build_program(pipe.schedule, _spaced_grid(pipe, request), "pc", pipe.prediction, pipe.device, **options)
        check_noise(noise, prog, request.shape)
        out, x0 = run_pc(
            pipe, prog, x, seeds, kwargs, noise, return_x0, progress, snr=snr, n_corrector=n_corr, step_rule=step_rule
        )
        nfe = prog.stages * (1 + int(n_corr))
    elif request.sampler == "consistency":
        out, x0, prog = _consistency(pipe, request, options, x, x_T_given, seeds, noise, return_x0, progress)
        nfe = prog.stages
    else:
        raise ValueError(f"sampler {request.sampler!r} is not one of {EAGER_SAMPLERS}")
    return ((out, x0) if return_x0 else out), nfe


def _spaced_grid(pipe: PipelineLike, request: SampleRequest) -> Any:
    return pipe.schedule.grid(
        request.steps, spacing=request.spacing, steps_offset=request.steps_offset, rho=request.rho
    )


def _consistency(
    pipe: PipelineLike,
    request: SampleRequest,
    options: dict,
    x: torch.Tensor,
    x_T_given: bool,
    seeds: torch.Tensor,
    noise: Any,
    return_x0: bool,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, Program]:
    times = options.pop("times", None)
    if times is None:
        grid = _spaced_grid(pipe, request)
    else:
        grid = pipe.schedule.grid_from_times(times)
        if not x_T_given:  # the prior noise, rescaled to the first time's noise level
            x = (x.float() * (float(grid.sigma[0]) / pipe.schedule.prior_std)).to(pipe.dtype)
    prog = build_program(pipe.schedule, grid, "consistency", pipe.prediction, pipe.device, **options)
    check_noise(noise, prog, request.shape)
    loop = Loop(pipe.model, Conditioning(dict(request.model_kwargs)), Recording(return_x0, progress=progress))
    result = loop.run_eager(prog, x, seeds, noise)
    return result.samples, result.x0, prog


__all__ = ["EagerResult", "run_eager_sampler", "sample_rk45"]
