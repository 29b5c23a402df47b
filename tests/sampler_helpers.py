"""Shared helpers of the sampler tests: peer inputs, grids through given times, convergence order."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp as scipy_solve_ivp

from fastdiff.eval.exact import GaussianMixture
from fastdiff.program import Program, build_program
from fastdiff.schedule import Grid, Schedule
from fastdiff.solvers.ode import Tolerances, solve_ivp_rk45

CPU = torch.device("cpu")


def grid_from_t(schedule: Schedule, t) -> Grid:
    """A fastdiff grid through the given schedule times (e.g. a peer's own timesteps)."""
    t = np.asarray(t, dtype=np.float64)
    return Grid(
        t=t,
        alpha=schedule.alpha(t),
        sigma=schedule.sigma(t),
        log_snr=schedule.log_snr(t),
        model_time=schedule.model_time(t),
    )


def x_T(n: int = 64, dim: int = 2, seed: int = 0) -> torch.Tensor:
    """Initial states shared by a fastdiff run and its peer."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def noises(count: int, n: int = 64, dim: int = 2, seed: int = 1) -> list[torch.Tensor]:
    """Explicit per-step noise shared by a fastdiff run and its peer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for _ in range(count)]


def run_float64(prog: Program, model, x: torch.Tensor) -> torch.Tensor:
    """A deterministic program applied in float64 (the same rows the fused kernel applies in float32)."""
    x = x.double()
    slots: dict[int, torch.Tensor] = {}
    for k in range(prog.stages):
        c = prog.coef[k]
        assert c[5] == 0.0
        mt = torch.full((x.shape[0],), float(prog.model_time[k]), dtype=torch.float64)
        m = model(x, mt) if prog.calls_model(k) else torch.zeros_like(x)
        nxt = c[0] * x + c[1] * m
        for j, slot in enumerate(prog.reads(k)):
            nxt = nxt + c[2 + j] * slots[slot]
        if prog.writes(k) >= 0:
            slots[prog.writes(k)] = c[6] * x + c[7] * m
        x = nxt
    return x


def edm_reference_solution(gmm) -> tuple[Schedule, torch.Tensor, torch.Tensor]:
    """x at sigma_max and the PF-ODE solution dx/dsigma = (x - D(x, sigma)) / sigma at sigma_min (EDM)."""
    schedule = Schedule.edm()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0
    sol = solve_ivp_rk45(
        lambda s, y: (y - gmm.posterior_mean(y, 1.0, s)) / s,
        80.0,
        0.002,
        x,
        tolerances=Tolerances(rtol=1e-10, atol=1e-10),
        dtype=torch.float64,
    )
    return schedule, x, sol.y


def convergence_slope(gmm, edm_reference, sampler: str, steps, **options) -> tuple[float, list[float]]:
    """Fitted slope of log RMS error against log steps on Karras grids ending at sigma_min."""
    schedule, x, ref = edm_reference
    model = gmm.as_model(schedule, "eps")
    errors = []
    for n in steps:
        grid = grid_from_t(schedule, schedule.grid(n + 1, spacing="karras").t[:-1])  # n steps, no clean end
        out = run_float64(build_program(schedule, grid, sampler, "eps", CPU, **options), model, x)
        errors.append(float((out - ref).square().sum(1).mean().sqrt()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return float(slope), errors


def pf_ode_reference(gmm: GaussianMixture, sch: Schedule, x: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """PF-ODE solution by scipy's DOP853 at rtol 1e-11 with the exact GMM score (independent of fastdiff)."""
    shape = x.shape

    def f(t, y):
        xt = torch.as_tensor(y.reshape(shape))
        score = gmm.score_noised(xt, float(sch.alpha(t)), float(sch.sigma(t))).numpy()
        return (float(sch.drift_coef(t)) * y.reshape(shape) - 0.5 * float(sch.g2(t)) * score).ravel()

    return scipy_solve_ivp(f, (t0, t1), x.ravel(), method="DOP853", rtol=1e-11, atol=1e-11).y[:, -1].reshape(shape)
