"""Fits a time grid to one network: ``tune(pipe, sampler, steps)`` returns a :class:`~fastdiff.solvers.tuned.TunedGrid`.

The network is a black box: only forward calls. A teacher (the same network, many steps of an accurate sampler)
maps seeded initial noise x_T to reference samples; the grid of ``steps`` steps whose samples from the same x_T are
closest to the teacher's (mean squared distance) is searched for without gradients:

* the grid's first point stays at ``t_max`` and the last at the schedule's end; the ``steps - 1`` points between are
  parameterised by the softmax of ``steps`` free numbers, the shares of the log-SNR range each gap takes, so every
  parameter value is a strictly decreasing grid;
* the search starts from the best of a few standard spacings (the sampler's default among them) and runs a
  coordinate pattern search (a step that pays is doubled, a sweep with no gain halves the steps);
* optionally (``shifts=True``) a second search moves the time fed to the network at each point, in log-SNR (the
  coefficients keep the grid's own times), and keeps it only if it lowers the tuning loss.

Tuning and evaluation seeds are disjoint; the returned grid records the held-out loss, tuned and default.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.runtime.pipeline_like import PipelineLike
from fastdiff.samplers import EAGER_SAMPLERS, get_sampler
from fastdiff.schedule import Grid
from fastdiff.solvers.tuned import TunedGrid, shifted_grid, weights_fingerprint

START_SPACINGS = ("logsnr", "karras", "quadratic", "uniform", "trailing")
"""Spacings the search may start from (besides the sampler's default): the best on the tuning seeds wins."""

EVAL_SEED_BASE = 1_000_000
"""Evaluation seeds are EVAL_SEED_BASE, EVAL_SEED_BASE + 1, ...; tuning seeds 0, 1, ... (disjoint)."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    """How the reference samples are drawn: ``steps`` steps of ``sampler`` on ``spacing`` (None: its default)."""

    sampler: str = "unipc"
    steps: int = 200
    spacing: str | None = "logsnr"

    def __post_init__(self) -> None:
        if self.sampler in EAGER_SAMPLERS:
            raise ValueError(f"the teacher must be a coefficient-program sampler, got {self.sampler!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"teacher steps must be an int >= 2, got {self.steps!r}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Seeded initial noise, conditioning and the teacher's samples from it (one set for tuning, one for judging)."""

    seeds: list[int]
    x_T: torch.Tensor
    model_kwargs: dict[str, Any]
    uncond_kwargs: dict[str, Any] | None
    target: torch.Tensor


def reference(
    pipe: PipelineLike,
    seeds: Sequence[int],
    guidance_scale: float,
    teacher: Teacher,
    sample_shape: Sequence[int],
    progress: bool = False,
) -> Reference:
    """The teacher's samples for ``seeds`` (one sample per seed). With guidance on a class-conditional network,
    sample i asks for class ``seeds[i] % num_classes`` and the unconditional pass gets the null class."""
    seeds = [int(s) for s in seeds]
    shape = (len(seeds), *sample_shape)
    model_kwargs, uncond = conditioning(pipe, seeds, guidance_scale)
    x_T = pipe.initial_noise(shape, seeds)
    with torch.inference_mode():
        target = pipe.sample(
            shape,
            sampler=teacher.sampler,
            steps=teacher.steps,
            seed=seeds,
            x_T=x_T,
            spacing=teacher.spacing,
            model_kwargs=model_kwargs,
            uncond_kwargs=uncond,
            guidance_scale=guidance_scale,
            progress=progress,
        )
    return Reference(seeds, x_T, model_kwargs, uncond, target.to(torch.float64))


def conditioning(
    pipe: PipelineLike, seeds: Sequence[int], guidance_scale: float
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(model_kwargs, uncond_kwargs) of tuning at ``guidance_scale``: none at all without guidance."""
    if guidance_scale == 1.0:
        return {}, None
    if not pipe.num_classes:
        raise ValueError(
            f"tuning at guidance_scale={guidance_scale} needs a class-conditional network (num_classes > 0)"
        )
    labels = torch.tensor([s % pipe.num_classes for s in seeds])
    return {"y": labels}, {"y": torch.full_like(labels, pipe.num_classes)}


class GridLoss:
    """Mean squared distance to the teacher of ``sampler`` on a candidate grid, counted (``evals``)."""

    def __init__(self, pipe: PipelineLike, sampler: str, ref: Reference, guidance_scale: float) -> None:
        self.pipe, self.sampler, self.ref, self.guidance_scale = pipe, sampler, ref, guidance_scale
        self.evals = 0

    def samples(self, grid: Grid) -> torch.Tensor:
        """The sampler's samples on ``grid`` from the reference's x_T."""
        ref = self.ref
        with torch.inference_mode():
            return self.pipe.sample(
                tuple(ref.x_T.shape),
                sampler=self.sampler,
                steps=grid.steps,
                seed=ref.seeds,
                x_T=ref.x_T,
                grid=grid,
                model_kwargs=ref.model_kwargs,
                uncond_kwargs=ref.uncond_kwargs,
                guidance_scale=self.guidance_scale,
                progress=False,
            )

    def __call__(self, grid: Grid) -> float:
        self.evals += 1
        x = self.samples(grid).to(torch.float64)
        loss = float((x - self.ref.target).square().mean())
        return loss if math.isfinite(loss) else math.inf


class GridParams:
    """The monotone parameterisation: ``theta`` [steps] -> the times between t_max and the end (see module doc)."""

    def __init__(self, pipe: PipelineLike, steps: int) -> None:
        sch = pipe.schedule
        self.schedule, self.steps = sch, steps
        self.t_start = float(sch.t_max)
        self.lam_start, self.lam_stop = float(sch.log_snr(sch.t_max)), float(sch.log_snr(sch.t_min))

    def times(self, theta: np.ndarray) -> np.ndarray:
        """The ``steps`` grid times (t_max first) of ``theta``."""
        shares = np.exp(theta - theta.max())
        fractions = np.cumsum(shares / shares.sum())[:-1]
        lam = self.lam_start + (self.lam_stop - self.lam_start) * fractions
        inner = np.asarray(self.schedule.t_from_log_snr(lam), dtype=np.float64)
        return np.concatenate([[self.t_start], inner])

    def theta(self, times: np.ndarray) -> np.ndarray | None:
        """The ``theta`` of a grid's first ``steps`` times (its first replaced by t_max); None if they are not
        strictly inside the log-SNR range in order."""
        lam = np.asarray(self.schedule.log_snr(np.asarray(times[1 : self.steps])), dtype=np.float64)
        fractions = (lam - self.lam_start) / (self.lam_stop - self.lam_start)
        gaps = np.diff(np.concatenate([[0.0], fractions, [1.0]]))
        if len(gaps) != self.steps or not np.all(gaps > 0) or not np.all(np.isfinite(gaps)):
            return None
        return np.log(gaps)


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` found: the grid, and what it cost."""

    tuned: TunedGrid
    seconds: float
    evals: int
    start: str
    tune_loss: dict[str, float]


def tune(
    pipe: PipelineLike,
    sampler: str,
    steps: int,
    guidance_scale: float = 1.0,
    *,
    teacher: Teacher | None = None,
    n_tune: int = 128,
    n_eval: int = 256,
    sample_shape: Sequence[int] | None = None,
    shifts: bool = False,
    max_evals: int = 300,
    progress: bool = True,
    references: tuple[Reference, Reference] | None = None,
) -> TuneResult:
    """Fits the time grid of ``sampler`` at ``steps`` steps (and ``guidance_scale``) to ``pipe``'s network.

    Args:
        pipe: a pipeline (:class:`fastdiff.Pipeline`) on the network; only its forward calls are used.
        sampler, steps, guidance_scale: the setting the grid is for (a coefficient-program sampler).
        teacher: how reference samples are drawn (default :class:`Teacher`: 200 unipc steps, log-SNR spacing).
        n_tune, n_eval: samples (seeds) that tune and that judge the result; the seeds are disjoint.
        sample_shape: the shape of one sample (default ``pipe.sample_shape``).
        shifts: also fit a per-point shift of the time fed to the network (kept only where it pays).
        max_evals: the most loss evaluations (each is one sampling run of ``n_tune`` samples) of the search.
        progress: a progress bar over the loss evaluations.
        references: precomputed ``(tuning, evaluation)`` references (:func:`reference`), to share the teacher's
            work between settings.

    Returns:
        A :class:`TuneResult`; its ``tuned.loss`` is the held-out loss, tuned and on the sampler's default grid.
    """
    start_time = time.perf_counter()
    info = get_sampler(sampler)
    if sampler in EAGER_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} has no fixed grid to tune; use a coefficient-program sampler")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 to tune a grid, got {steps!r}")
    if min(n_tune, n_eval) < 1 or max_evals < 1:
        raise ValueError(f"n_tune, n_eval and max_evals must be >= 1, got {n_tune}, {n_eval}, {max_evals}")
    teacher = Teacher() if teacher is None else teacher
    shape = tuple(pipe.sample_shape if sample_shape is None else sample_shape)
    if not shape:
        raise ValueError("sample_shape is needed: the pipeline declares none")
    if references is None:
        references = (
            reference(pipe, range(n_tune), guidance_scale, teacher, shape, progress),
            reference(pipe, range(EVAL_SEED_BASE, EVAL_SEED_BASE + n_eval), guidance_scale, teacher, shape, progress),
        )
    tune_ref, eval_ref = references
    if set(tune_ref.seeds) & set(eval_ref.seeds):
        raise ValueError("tuning and evaluation seeds must be disjoint")
    search_start = time.perf_counter()
    loss = GridLoss(pipe, sampler, tune_ref, guidance_scale)
    params = GridParams(pipe, steps)
    default_spacing = info.default_spacing(pipe.schedule)
    default_grid = pipe.schedule.grid(steps, spacing=default_spacing)

    bar = tqdm(total=max_evals, desc=f"fastdiff tune {sampler} {steps}", disable=not progress, leave=False)
    counted = _counting(loss, bar)
    start, theta, best = _best_start(pipe, params, steps, default_spacing, counted)
    zeros = np.zeros(steps)
    theta, best = pattern_search(
        lambda th: counted(shifted_grid(pipe.schedule, params.times(th), zeros)),
        theta,
        best,
        step=0.5,
        min_step=0.02,
        max_evals=max_evals,
        evals=lambda: loss.evals,
    )
    shift = zeros
    if shifts and loss.evals < max_evals:
        times = params.times(theta)
        shift, best = pattern_search(
            lambda d: counted(shifted_grid(pipe.schedule, times, d)),
            zeros,
            best,
            step=0.25,
            min_step=0.01,
            max_evals=max_evals,
            evals=lambda: loss.evals,
        )
    bar.close()
    times = params.times(theta)
    held_out = GridLoss(pipe, sampler, eval_ref, guidance_scale)
    tuned = TunedGrid(
        sampler=sampler,
        steps=steps,
        guidance_scale=guidance_scale,
        times=tuple(times),
        shifts=tuple(shift),
        teacher=dict(
            dataclasses.asdict(teacher),
            n_tune=len(tune_ref.seeds),
            n_eval=len(eval_ref.seeds),
            start=start,
            evals=loss.evals,
            search_seconds=round(time.perf_counter() - search_start, 1),
        ),
        loss=dict(tuned=held_out(shifted_grid(pipe.schedule, times, shift)), default=held_out(default_grid)),
        fingerprint=weights_fingerprint(pipe.model),
    )
    return TuneResult(
        tuned=tuned,
        seconds=time.perf_counter() - start_time,
        evals=loss.evals,
        start=start,
        tune_loss=dict(tuned=best, default=loss(default_grid)),
    )


def _counting(loss: GridLoss, bar: Any) -> Callable[[Grid], float]:
    def evaluate(grid: Grid) -> float:
        value = loss(grid)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3g}", refresh=False)
        return value

    return evaluate


def _best_start(
    pipe: PipelineLike, params: GridParams, steps: int, default_spacing: str | None, loss: Callable[[Grid], float]
) -> tuple[str, np.ndarray, float]:
    """(spacing, theta, tuning loss) of the best standard spacing to start from (the default spacing first)."""
    best: tuple[str, np.ndarray, float] | None = None
    zeros = np.zeros(steps)
    for spacing in dict.fromkeys((default_spacing, *START_SPACINGS)):
        try:
            theta = params.theta(pipe.schedule.grid(steps, spacing=spacing).t)
        except ValueError:  # a spacing this schedule does not offer
            continue
        if theta is None:
            continue
        value = loss(shifted_grid(pipe.schedule, params.times(theta), zeros))
        if best is None or value < best[2]:
            best = (str(spacing), theta, value)
    if best is None:  # no standard spacing fits the parameterisation: start evenly in log-SNR
        theta = np.zeros(steps)
        best = ("even log-SNR", theta, loss(shifted_grid(pipe.schedule, params.times(theta), zeros)))
    return best


def pattern_search(
    f: Callable[[np.ndarray], float],
    x: np.ndarray,
    fx: float,
    step: float,
    min_step: float,
    max_evals: int,
    evals: Callable[[], int],
) -> tuple[np.ndarray, float]:
    """Minimises ``f`` from ``x`` (where it is ``fx``) coordinate by coordinate: each coordinate tries +-its step, a
    move that pays is repeated with the step doubled, a sweep without gain halves every step; stops when the steps
    are below ``min_step`` or ``evals()`` reaches ``max_evals``. Returns the best point and its value."""
    x = np.array(x, dtype=np.float64, copy=True)
    steps = np.full(len(x), float(step))
    while steps.max() >= min_step and evals() < max_evals:
        improved = False
        for i in range(len(x)):
            if steps[i] < min_step:
                continue
            for direction in (1.0, -1.0):
                if evals() >= max_evals:
                    return x, fx
                trial = x.copy()
                trial[i] += direction * steps[i]
                value = f(trial)
                if value < fx:
                    x, fx, improved = trial, value, True
                    while evals() < max_evals:  # keep going that way, faster
                        trial = x.copy()
                        trial[i] += 2 * direction * steps[i]
                        value = f(trial)
                        if value >= fx:
                            break
                        x, fx = trial, value
                        steps[i] *= 2
                    break
        if not improved:
            steps /= 2
    return x, fx
