"""``DiffusersPipeline``: a :class:`~fastdiff.pipeline.Pipeline` with a diffusers scheduler's defaults (what
:func:`from_diffusers` returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastdiff.diffusers.call import DiffusersArgs, DiffusersModel, scheduler_call, scheduler_grid
from fastdiff.diffusers.config import SchedulerSetup, scheduler_setup
from fastdiff.pipeline import Pipeline
from fastdiff.program import Program
from fastdiff.schedule import Grid

GRID_CACHE_SIZE = 64


class DiffusersPipeline(Pipeline):
    """A :class:`Pipeline` with a diffusers scheduler's defaults (:func:`from_diffusers`): the sampler that is
    that scheduler class's algorithm, its options, its x0 limit, and its own grid for any step count
    (:mod:`fastdiff.diffusers.call`). ``setup`` is the :class:`~fastdiff.diffusers.config.SchedulerSetup` of the
    scheduler config."""

    @classmethod
    def from_scheduler(cls, model: Any, scheduler: Any, **pipeline_kwargs: Any) -> DiffusersPipeline:
        """The pipeline for ``model`` and ``scheduler`` (a diffusers scheduler, its config, or a
        ``FastdiffScheduler``): :func:`from_diffusers`."""
        return cls(model, scheduler_setup(scheduler), **pipeline_kwargs)

    def __init__(self, model: Callable[..., Any], setup: SchedulerSetup, **pipeline_kwargs: Any):
        pipeline_kwargs.setdefault("x0_clip", setup.x0_clip)
        super().__init__(DiffusersModel(model), setup.schedule, prediction=setup.prediction, **pipeline_kwargs)
        self.setup = setup
        self._grids: dict[int, Grid] = {}  # the scheduler's grid per step count (diffusers' set_timesteps is slow)

    def diffusers_grid(
        self,
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        **set_timesteps_kwargs: Any,
    ) -> tuple[Grid, float]:
        """The scheduler's own grid for ``steps`` (or explicit ``timesteps`` / ``sigmas``) and the factor that
        turns diffusers' ``latents`` into fastdiff's native x_T on it."""
        return scheduler_grid(self.setup, steps, timesteps, sigmas, **set_timesteps_kwargs)

    def program(
        self,
        sampler: str,
        steps: int,
        spacing: str | None = None,
        steps_offset: int = 0,
        rho: float = 7.0,
        grid: Grid | None = None,
        **sampler_options: Any,
    ) -> Program:
        """:meth:`Pipeline.program`; with neither ``grid`` nor ``spacing``, on the scheduler's own grid for ``steps``
        (what :meth:`sample` runs by default), so a request run as it is (the serving engine, ``Pipeline.sample``
        with a :class:`~fastdiff.request.SampleRequest`) runs on the grid diffusers would."""
        if grid is None and spacing is None:
            grid = self._scheduler_grid(steps)
        return super().program(sampler, steps, spacing, steps_offset, rho, grid=grid, **sampler_options)

    def _scheduler_grid(self, steps: int) -> Grid:
        with self._programs_lock:
            grid = self._grids.get(steps)
        if grid is None:
            grid = self.diffusers_grid(steps)[0]
            with self._programs_lock:
                self._grids[steps] = grid
                while len(self._grids) > GRID_CACHE_SIZE:
                    self._grids.pop(next(iter(self._grids)))
        return grid

    def sample(
        self,
        shape: Sequence[int],
        sampler: str | None = None,
        steps: int = 50,
        x_T: torch.Tensor | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        spacing: str | None = None,
        generator: torch.Generator | None = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """:meth:`Pipeline.sample` on the scheduler's own grid, sampler and options by default.

        Args:
            shape, steps, timesteps, sigmas: as diffusers' ``set_timesteps`` takes them (steps when neither
                timesteps nor sigmas is given).
            sampler: default the scheduler class's algorithm (with its config's options; options passed
                here override them).
            x_T: diffusers' ``latents`` (the initial noise before ``init_noise_sigma`` scaling); default the
                seeded Philox noise of :meth:`initial_noise`.
            spacing: instead of the scheduler's grid, fastdiff's own spaced grid (``x_T`` then is the native
                initial state).
            generator: draw the step noise from this generator exactly as the scheduler's ``step`` does
                (same order, same shapes), instead of the seeded Philox noise.
            mu: diffusers' ``mu`` for flow schedulers with ``use_dynamic_shifting``.
            kwargs: the rest of :meth:`Pipeline.sample` (guidance_scale, model_kwargs, uncond_kwargs, eta, seed,
                noise, return_x0, ...).
        """
        args = DiffusersArgs(sampler, steps, x_T, timesteps, sigmas, spacing, generator, mu)
        call = scheduler_call(self.setup, shape, args, kwargs, self.device, self.dtype)
        return call.finish(super().sample(shape, **call.kwargs))

    __call__ = sample


def from_diffusers(model: Any, scheduler: Any, **pipeline_kwargs: Any) -> DiffusersPipeline:
    """A pipeline for a diffusers model (or any callable) and its scheduler (a diffusers scheduler, its config, or a
    ``FastdiffScheduler``): the schedule, prediction type, timestep convention, default sampler and grid of that
    scheduler class; ``pipeline_kwargs`` go to :class:`Pipeline` (device, dtype, max_graphs, sample_shape, ...).
    Also ``fastdiff.from_diffusers``."""
    return DiffusersPipeline.from_scheduler(model, scheduler, **pipeline_kwargs)


__all__ = ["DiffusersPipeline", "from_diffusers"]
