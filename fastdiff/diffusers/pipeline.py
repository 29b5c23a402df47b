"""``DiffusersPipeline``: a :class:`~fastdiff.pipeline.Pipeline` with a diffusers scheduler's defaults (what
:func:`from_diffusers` returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastdiff.diffusers.call import DiffusersArgs, DiffusersEdit, DiffusersModel, scheduler_call, scheduler_grid
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
            grid = self.default_grid(sampler, steps)
        return super().program(sampler, steps, spacing, steps_offset, rho, grid=grid, **sampler_options)

    def default_grid(
        self, sampler: str, steps: int, spacing: str | None = None, steps_offset: int = 0, rho: float = 7.0
    ) -> Grid:
        """:meth:`Pipeline.default_grid`; without ``spacing``, the scheduler's own grid for ``steps``."""
        if spacing is None:
            return self._scheduler_grid(steps)
        return super().default_grid(sampler, steps, spacing, steps_offset, rho)

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
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
        masked_image_latents: torch.Tensor | None = None,
        inpaint_channels: bool | None = None,
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
            init, strength, mask: image-to-image and inpainting as diffusers' StableDiffusionImg2ImgPipeline and
                StableDiffusionInpaintPipeline run them on latents: ``init`` their image latents, ``mask`` their mask
                latents ([n, 1, h, w], 1 = regenerate), the scheduler's grid cut for ``strength``; ``x_T`` is then
                their ``noise`` (added to the image latents, and the initial latents of inpainting at strength 1).
            masked_image_latents, inpaint_channels: a UNet that takes the mask and the masked image latents as
                input channels (9-channel inpainting; ``inpaint_channels`` None: when the model's
                ``config.in_channels`` exceeds the latents' channels) gets them concatenated to every call's input
                and no blend, as diffusers' 9-channel loop; ``masked_image_latents`` default ``init`` where the
                mask is 0.
            kwargs: the rest of :meth:`Pipeline.sample` (guidance_scale, model_kwargs, uncond_kwargs, eta, seed,
                noise, return_x0, ...).
        """
        args = DiffusersArgs(sampler, steps, x_T, timesteps, sigmas, spacing, generator, mu)
        if inpaint_channels is None:
            in_channels = getattr(getattr(self.model.model, "config", None), "in_channels", None)
            inpaint_channels = isinstance(in_channels, int) and len(shape) > 1 and in_channels > shape[1]
        edit = DiffusersEdit(init, strength, mask, masked_image_latents, bool(inpaint_channels))
        call = scheduler_call(self.setup, shape, args, kwargs, self.device, self.dtype, edit)
        return call.finish(super().sample(shape, **call.kwargs))

    __call__ = sample


def from_diffusers(model: Any, scheduler: Any, **pipeline_kwargs: Any) -> DiffusersPipeline:
    """A pipeline for a diffusers model (or any callable) and its scheduler (a diffusers scheduler, its config, or a
    ``FastdiffScheduler``): the schedule, prediction type, timestep convention, default sampler and grid of that
    scheduler class; ``pipeline_kwargs`` go to :class:`Pipeline` (device, dtype, max_graphs, sample_shape, ...).
    Also ``fastdiff.from_diffusers``."""
    return DiffusersPipeline.from_scheduler(model, scheduler, **pipeline_kwargs)


__all__ = ["DiffusersPipeline", "from_diffusers"]
