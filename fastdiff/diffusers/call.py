"""How a diffusers model is called and how a diffusers scheduler's loop maps onto a fastdiff sample call.

What :class:`fastdiff.diffusers.pipeline.DiffusersPipeline` (``fastdiff.from_diffusers``) uses, below the pipeline (this
module imports no pipeline): :class:`DiffusersModel` calls the network with the scheduler's timestep convention,
and :func:`scheduler_call` turns a ``sample`` call into the plain one on the scheduler's own grid, sampler and
options. ``x_T`` means what diffusers' ``latents=`` means (before its ``init_noise_sigma`` scaling), and the
result is what the diffusers loop returns, so ``pipe.sample(shape, steps, x_T=latents, ...)`` equals the diffusers
pipeline's denoising loop on the same latents (and, for stochastic schedulers, the same ``generator``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.diffusers.config import SchedulerSetup, initial_state_scale
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


def scheduler_grid(
    setup: SchedulerSetup,
    steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    **set_timesteps_kwargs: Any,
) -> tuple[Grid, float]:
    """The scheduler's own grid for ``steps`` (or explicit ``timesteps`` / ``sigmas``) and the factor that turns
    diffusers' ``latents`` into fastdiff's native x_T on it."""
    peer = setup.peer()
    grid = setup.grid(steps, timesteps, sigmas, peer=peer, **set_timesteps_kwargs)
    return grid, initial_state_scale(setup, peer, grid)


@dataclass
class SchedulerCall:
    """A diffusers-style sample call turned into the plain one: ``kwargs`` for ``Pipeline.sample`` (after the
    shape), and :meth:`finish` for what it returns."""

    kwargs: dict[str, Any]
    end_alpha: float = 1.0  # y-space schedulers return x / alpha at the grid's end

    def finish(self, result: Any) -> Any:
        """The diffusers loop's result from the plain call's."""
        if self.end_alpha == 1.0:
            return result
        if isinstance(result, tuple):
            return (result[0] / self.end_alpha, *result[1:])
        return result / self.end_alpha


@dataclass(frozen=True)
class DiffusersArgs:
    """The arguments of ``DiffusersPipeline.sample`` that mean what they mean in diffusers (see there)."""

    sampler: str | None = None
    steps: int = 50
    x_T: torch.Tensor | None = None
    timesteps: Sequence[float] | None = None
    sigmas: Sequence[float] | None = None
    spacing: str | None = None
    generator: torch.Generator | None = None
    mu: float | None = None


def scheduler_call(
    setup: SchedulerSetup,
    shape: Sequence[int],
    args: DiffusersArgs,
    kwargs: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> SchedulerCall:
    """The plain call for a sample call on a scheduler's pipeline: the scheduler's sampler and options unless given
    (``kwargs``, the rest of ``Pipeline.sample``'s arguments, override the options), and unless ``args.spacing``
    asks for fastdiff's own grid, the scheduler's grid with ``x_T`` scaled from diffusers' latents and, with a
    ``generator``, the step noise drawn as the scheduler's ``step`` draws it."""
    sampler, steps, x_T, timesteps, sigmas = args.sampler, args.steps, args.x_T, args.timesteps, args.sigmas
    spacing, generator, mu = args.spacing, args.generator, args.mu
    sampler = setup.sampler if sampler is None else sampler
    options = dict(setup.options) if sampler == setup.sampler else {}
    options.update(kwargs)
    if spacing is not None:
        return SchedulerCall(
            dict(options, sampler=sampler, steps=steps, x_T=x_T, timesteps=timesteps, sigmas=sigmas, spacing=spacing)
        )
    extra = {"mu": mu} if mu is not None else {}
    grid, scale = scheduler_grid(
        setup, None if (timesteps is not None or sigmas is not None) else steps, timesteps, sigmas, **extra
    )
    if x_T is not None:
        x_T = x_T * scale
    draws = [setup.noise_draws(float(t), options.get("eta") or 0.0) for t in grid.model_time[:-1]]
    if generator is not None and options.get("noise") is None and any(draws):
        options["noise"] = _generator_noise(shape, draws, generator, device, dtype)
    end_alpha = float(grid.alpha[-1])
    # y-space schedulers return x / alpha; only differs when the grid does not end on the clean end.
    return SchedulerCall(dict(options, sampler=sampler, x_T=x_T, grid=grid), end_alpha if setup.spec.y_space else 1.0)


def _generator_noise(
    shape: Sequence[int], draws: Sequence[bool], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """One noise tensor per step, drawn from ``generator`` where the scheduler's step draws (zeros elsewhere)."""
    from diffusers.utils.torch_utils import randn_tensor

    return [
        randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        if draw
        else torch.zeros(tuple(shape), device=device, dtype=dtype)
        for draw in draws
    ]
