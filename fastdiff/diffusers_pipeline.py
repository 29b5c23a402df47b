"""``Pipeline.from_diffusers``: a fastdiff pipeline that runs a diffusers model the way its scheduler would.

:class:`DiffusersPipeline` is a :class:`fastdiff.Pipeline` whose defaults come from the scheduler config
(:mod:`fastdiff.diffusers_setup`): the sampler that is that scheduler class's algorithm, its options, its x0
limit, and its own grid for any step count. ``x_T`` means what diffusers' ``latents=`` means (before its
``init_noise_sigma`` scaling), and the result is what the diffusers loop returns, so
``pipe.sample(shape, steps, x_T=latents, ...)`` equals the diffusers pipeline's denoising loop on the same
latents (and, for stochastic schedulers, the same ``generator``).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from fastdiff.diffusers_setup import SchedulerSetup, initial_state_scale, scheduler_setup
from fastdiff.pipeline import Pipeline
from fastdiff.schedule import Grid


class DiffusersModel(torch.nn.Module):
    """Calls a diffusers model (or any callable) as ``model(x, t, **kwargs) -> tensor``.

    The timestep goes in as ``timestep=`` when the model's ``forward`` has that argument (diffusers' UNets and
    transformers; SD3's transformer takes it after ``encoder_hidden_states``), else second. The output's
    ``.sample``, or the first element of a tuple, is returned; a learned-variance output (twice the input's
    channels, e.g. DiT with ``learn_sigma``) is cut to its first half, as diffusers' pipelines do.
    """

    def __init__(self, model: Callable[..., Any]):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a diffusers model or a callable, got {type(model).__name__}")
        self.model = model
        forward = getattr(model, "forward", model)
        try:
            self._keyword_timestep = "timestep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            self._keyword_timestep = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(x, timestep=t, **kwargs) if self._keyword_timestep else self.model(x, t, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, torch.Tensor) and out.dim() > 1 and x.dim() > 1 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out


class DiffusersPipeline(Pipeline):
    """A :class:`Pipeline` with a diffusers scheduler's defaults (see the module docstring).

    ``setup`` is the :class:`~fastdiff.diffusers_setup.SchedulerSetup` of the scheduler config.
    """

    def __init__(self, model: Callable[..., Any], setup: SchedulerSetup, **pipeline_kwargs: Any):
        pipeline_kwargs.setdefault("x0_clip", setup.x0_clip)
        super().__init__(DiffusersModel(model), setup.schedule, prediction=setup.prediction, **pipeline_kwargs)
        self.setup = setup

    def diffusers_grid(self, steps: Optional[int] = None, timesteps: Optional[Sequence[float]] = None,
                       sigmas: Optional[Sequence[float]] = None, **set_timesteps_kwargs: Any) -> tuple[Grid, float]:
        """The scheduler's own grid for ``steps`` (or explicit ``timesteps`` / ``sigmas``) and the factor that
        turns diffusers' ``latents`` into fastdiff's native x_T on it."""
        peer = self.setup.peer()
        grid = self.setup.grid(steps, timesteps, sigmas, peer=peer, **set_timesteps_kwargs)
        return grid, initial_state_scale(self.setup, peer, grid)

    def sample(self, shape: Sequence[int], sampler: Optional[str] = None, steps: int = 50,
               x_T: Optional[torch.Tensor] = None, timesteps: Optional[Sequence[float]] = None,
               sigmas: Optional[Sequence[float]] = None, spacing: Optional[str] = None,
               generator: Optional[torch.Generator] = None, mu: Optional[float] = None,
               **kwargs: Any) -> Any:
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
        setup = self.setup
        sampler = setup.sampler if sampler is None else sampler
        options = dict(setup.options) if sampler == setup.sampler else {}
        options.update(kwargs)
        if spacing is not None:
            return super().sample(shape, sampler=sampler, steps=steps, x_T=x_T, timesteps=timesteps, sigmas=sigmas,
                                  spacing=spacing, **options)
        extra = {"mu": mu} if mu is not None else {}
        grid, scale = self.diffusers_grid(None if (timesteps is not None or sigmas is not None) else steps,
                                          timesteps, sigmas, **extra)
        if x_T is not None:
            x_T = x_T * scale
        draws = [self.setup.noise_draws(float(t), options.get("eta") or 0.0) for t in grid.model_time[:-1]]
        if generator is not None and options.get("noise") is None and any(draws):
            options["noise"] = self._generator_noise(shape, draws, generator)
        result = super().sample(shape, sampler=sampler, x_T=x_T, grid=grid, **options)
        end_alpha = float(grid.alpha[-1])
        if not setup.spec.y_space or end_alpha == 1.0:
            return result
        # y-space schedulers return x / alpha; only differs when the grid does not end on the clean end.
        if isinstance(result, tuple):
            return (result[0] / end_alpha, *result[1:])
        return result / end_alpha

    def _generator_noise(self, shape: Sequence[int], draws: Sequence[bool],
                         generator: torch.Generator) -> list[torch.Tensor]:
        """One noise tensor per step, drawn from ``generator`` where the scheduler's step draws (zeros elsewhere)."""
        from diffusers.utils.torch_utils import randn_tensor

        return [randn_tensor(tuple(shape), generator=generator, device=self.device, dtype=self.dtype) if draw
                else torch.zeros(tuple(shape), device=self.device, dtype=self.dtype) for draw in draws]


def pipeline_from_diffusers(model: Callable[..., Any], scheduler: Any, **pipeline_kwargs: Any) -> DiffusersPipeline:
    """A :class:`DiffusersPipeline` for ``model`` (a diffusers model or any callable) and ``scheduler`` (a
    diffusers scheduler, its config, or a ``FastdiffScheduler``); ``pipeline_kwargs`` go to
    :class:`fastdiff.Pipeline` (device, dtype, max_graphs, sample_shape, ...)."""
    return DiffusersPipeline(model, scheduler_setup(scheduler), **pipeline_kwargs)
