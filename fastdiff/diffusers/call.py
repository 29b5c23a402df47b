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
from fastdiff.program import edit_start
from fastdiff.schedule import Grid

INPAINT_CHANNELS = "inpaint_channels"
"""The model keyword :class:`DiffusersModel` concatenates to the input's channels (an inpainting UNet's mask and
masked-image latents, as diffusers' StableDiffusionInpaintPipeline does)."""


class DiffusersModel(torch.nn.Module):
    """Calls a diffusers model (or any callable) as ``model(x, t, **kwargs) -> tensor``.

    The timestep goes in as ``timestep=`` when the model's ``forward`` has that argument (diffusers' UNets and
    transformers; SD3's transformer takes it after ``encoder_hidden_states``), else second. A keyword
    ``inpaint_channels`` (:data:`INPAINT_CHANNELS`) is concatenated to ``x`` along the channels first (a 9-channel
    inpainting UNet's mask and masked-image latents). The output's ``.sample``, or the first element of a tuple, is
    returned; a learned-variance output (twice the input's
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
        extra = kwargs.pop(INPAINT_CHANNELS, None)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        out = self.model(x, timestep=t, **kwargs) if self._keyword_timestep else self.model(x, t, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        channels = x.shape[1] - (0 if extra is None else extra.shape[1]) if x.dim() > 1 else 0
        if isinstance(out, torch.Tensor) and out.dim() > 1 and x.dim() > 1 and out.shape[1] == 2 * channels:
            out = out[:, :channels]
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


@dataclass(frozen=True)
class DiffusersEdit:
    """Image editing as diffusers' img2img and inpainting pipelines run it, in latent space: ``init`` (their
    ``image_latents``), ``strength``, ``mask`` (1 = regenerate; [n, 1, h, w] as their mask latents) and, for a UNet
    that takes them as input channels (``concat``: 9-channel inpainting), ``masked_image_latents``."""

    init: torch.Tensor | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None
    concat: bool = False

    @property
    def noised_start(self) -> bool:
        """Whether the run starts from ``init`` noised at the cut (img2img, inpainting below strength 1) rather than
        from pure noise (inpainting at strength 1, diffusers' ``is_strength_max``)."""
        return self.init is not None and not (self.mask is not None and float(self.strength) == 1.0)

    def channels(self) -> torch.Tensor:
        """What a 9-channel UNet reads beside the latents: the mask, then the masked image latents (default
        ``init`` where the mask keeps it)."""
        if self.mask is None or self.init is None:
            raise ValueError("a UNet that takes the mask as input channels needs init and mask")
        mask = self.mask
        if mask.dim() != self.init.dim() or mask.shape[1] != 1:
            raise ValueError(f"mask must be [n, 1, h, w] for an inpainting UNet, got {tuple(mask.shape)}")
        mask = mask.expand(self.init.shape[0], 1, *self.init.shape[2:])
        masked = self.masked_image_latents
        if masked is None:
            masked = self.init * (mask < 0.5)
        elif tuple(masked.shape) != tuple(self.init.shape):
            raise ValueError(f"masked_image_latents must have init's shape {tuple(self.init.shape)}, got "
                             f"{tuple(masked.shape)}")  # fmt: skip
        return torch.cat([mask.to(self.init.dtype), masked.to(self.init.dtype)], dim=1)


def scheduler_call(
    setup: SchedulerSetup,
    shape: Sequence[int],
    args: DiffusersArgs,
    kwargs: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    edit: DiffusersEdit | None = None,
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
    edit = DiffusersEdit() if edit is None else edit
    if spacing is not None:  # fastdiff's own grid: x_T and the editing arguments mean what Pipeline.sample says
        options.update(_edit_options(edit, None, options))
        return SchedulerCall(
            dict(options, sampler=sampler, steps=steps, x_T=x_T, timesteps=timesteps, sigmas=sigmas, spacing=spacing)
        )
    extra = {"mu": mu} if mu is not None else {}
    grid, scale = scheduler_grid(
        setup, None if (timesteps is not None or sigmas is not None) else steps, timesteps, sigmas, **extra
    )
    noise = x_T
    if x_T is not None:  # a noised init takes diffusers' noise as it is: alpha init + sigma noise, as add_noise
        x_T = x_T * (setup.schedule.prior_std if edit.noised_start else scale)
    options.update(_edit_options(edit, noise, options))
    draws = [setup.noise_draws(float(t), options.get("eta") or 0.0) for t in grid.model_time[:-1]]
    if edit.init is not None:
        draws = draws[edit_start(grid.steps, float(edit.strength)) :]
    if generator is not None and options.get("noise") is None and any(draws):
        options["noise"] = _generator_noise(shape, draws, generator, device, dtype)
    end_alpha = float(grid.alpha[-1])
    # y-space schedulers return x / alpha; only differs when the grid does not end on the clean end.
    return SchedulerCall(dict(options, sampler=sampler, x_T=x_T, grid=grid), end_alpha if setup.spec.y_space else 1.0)


def _edit_options(edit: DiffusersEdit, noise: torch.Tensor | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The plain call's editing arguments: ``init``/``strength``/``mask`` and the known region's noise (diffusers'
    one ``noise`` at every step) for the 4-channel loop; for a UNet taking the mask as input channels, those channels
    in the model kwargs (and the unconditional ones under guidance) and no blend, as diffusers' 9-channel loop."""
    if edit.init is None:
        if edit.mask is not None or edit.masked_image_latents is not None:
            raise ValueError("mask and masked_image_latents need init (the image latents)")
        return {}
    if not edit.concat:
        out: dict[str, Any] = dict(init=edit.init, strength=edit.strength, mask=edit.mask)
        if edit.mask is not None and noise is not None and options.get("init_noise") is None:
            out["init_noise"] = noise
        return out
    channels = edit.channels()
    out = {"model_kwargs": {**dict(options.get("model_kwargs") or {}), INPAINT_CHANNELS: channels}}
    uncond = options.get("uncond_kwargs")
    if uncond is not None or options.get("guidance_scale", 1.0) != 1.0:
        out["uncond_kwargs"] = {**dict(uncond or {}), INPAINT_CHANNELS: channels}
    if edit.noised_start:
        out.update(init=edit.init, strength=edit.strength)
    return out


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
