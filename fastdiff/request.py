"""What to sample, as one object: :class:`SampleRequest`, shared by :meth:`fastdiff.Pipeline.sample` (which builds
one from its arguments, or takes one), the serving engine and the HTTP API (which parses its JSON into one).
Its checks live here, so every entry point refuses the same requests with the same messages. How
:meth:`~fastdiff.Pipeline.sample` runs a request (grids, explicit noise, what it records, CUDA graphs) is
:class:`SampleOptions`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fastdiff.program import Program, cut_grid, edit_start, resampled
from fastdiff.runtime.checks import check_class_labels, check_model_accepts, check_model_kwargs, check_shape
from fastdiff.runtime.guidance import make_guidance
from fastdiff.runtime.pipeline_like import PipelineLike
from fastdiff.samplers import EAGER_SAMPLERS, get_sampler
from fastdiff.schedule import Grid

SeedLike = int | Sequence[int] | torch.Tensor


@dataclass
class SampleRequest:
    """``n`` samples of ``sample_shape`` with ``sampler`` over ``steps`` steps (see :meth:`Pipeline.sample` for
    every field's meaning).

    ``seed`` is an int (sample i gets the seed :func:`~fastdiff.kernels.philox.derive_seeds` derives for index i)
    or one int per sample. ``model_kwargs`` / ``uncond_kwargs`` hold per-sample tensors (one row per sample) or
    shared values; ``guidance_scale != 1`` (or ``uncond_kwargs``) turns classifier-free guidance on. ``options``
    are the sampler's own options (``eta``, ``variance_type``, ``s_churn``, ...).

    Editing: ``init`` [n, *sample_shape] (the images to edit, clean, in the state's space) turns the request into
    image-to-image: the grid is cut where diffusers cuts it for ``strength`` in (0, 1] (:func:`edit_start`) and
    the run starts from ``init`` noised to that point. ``mask`` (broadcastable to ``init``; 1 = regenerate, 0 = keep,
    as diffusers) makes it inpainting: every step's known region is ``init`` noised to the step's end; ``jumps`` adds
    RePaint's resampling (:func:`fastdiff.program.resampled`). Each row has its own init and mask row, so rows of
    different requests can share a batch.
    """

    n: int
    sample_shape: Sequence[int]
    sampler: str = "ddim"
    steps: int = 50
    seed: SeedLike = 0
    spacing: str | None = None
    steps_offset: int = 0
    rho: float = 7.0
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    uncond_kwargs: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    init: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    strength: float = 1.0
    jumps: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n, *sample_shape)``."""
        return (self.n, *self.sample_shape)

    @property
    def guided(self) -> bool:
        """Whether the request uses classifier-free guidance."""
        return self.guidance_scale != 1.0 or self.uncond_kwargs is not None

    def validate(self, pipe: PipelineLike, serving: bool = False) -> None:
        """Raises ValueError/TypeError naming the field for anything ``pipe`` cannot sample: the shape and steps, the
        sampler and the types of its options, the conditioning's batch rows, the guidance settings, and what the
        pipeline declares about its network (its sample shape, its class labels). With ``serving``, also what
        step-level batching cannot run (samplers that are not one fixed coefficient program, guidance rescaling),
        the program's own checks (the ranges of the sampler's options) and conditioning names the network's signature
        cannot take (refused here rather than failing in a batch), so every entry point refuses the same requests
        before any work starts."""
        check_shape(self.shape)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {type(self.steps).__name__} {self.steps!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {self.steps!r}")
        info = get_sampler(self.sampler)
        if pipe.prediction not in info.predictions:
            raise ValueError(
                f"sampler {self.sampler!r} cannot use prediction {pipe.prediction!r}; it accepts {info.predictions}"
            )
        info.check_options(dict(self.options))
        for what, kwargs in (("model_kwargs", self.model_kwargs), ("uncond_kwargs", self.uncond_kwargs)):
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise TypeError(f"{what} must be a mapping of argument names to values, got {type(kwargs).__name__}")
        check_model_kwargs(dict(self.model_kwargs), self.n)
        if self.uncond_kwargs is not None:
            check_model_kwargs(dict(self.uncond_kwargs), self.n, "uncond_kwargs")
        make_guidance(self.guidance_scale, self.guidance_rescale, "double", self.uncond_kwargs)  # its checks
        self._check_edit()
        self._check_network_inputs(pipe)
        if serving:
            self._check_batchable(pipe)

    @property
    def edits(self) -> bool:
        """Whether the request edits images (``init`` given: image-to-image, with ``mask`` inpainting)."""
        return self.init is not None

    def _check_edit(self) -> None:
        """``strength`` and ``jumps`` in range and only with what they act on; then ``init`` and ``mask``."""
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real):
            raise TypeError(f"strength must be a number in (0, 1], got {type(self.strength).__name__}")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        if isinstance(self.jumps, bool) or not isinstance(self.jumps, numbers.Integral) or self.jumps < 0:
            raise ValueError(f"jumps must be an int >= 0, got {self.jumps!r}")
        if self.jumps and self.mask is None:
            raise ValueError("jumps (RePaint resampling) needs init and mask: it resamples inpainting's steps")
        if self.init is None:
            if self.mask is not None:
                raise ValueError("mask needs init: the image whose known region (mask 0) it keeps")
            if float(self.strength) != 1.0:
                raise ValueError("strength needs init: the image to start from")
            return
        self._check_init()
        if self.mask is not None:
            self._check_mask()

    def _check_init(self) -> None:
        """A floating-point tensor of the sample shape, a sampler that is one coefficient program, a strength that
        leaves a step to run."""
        if not isinstance(self.init, torch.Tensor):
            raise TypeError(f"init must be a tensor, got {type(self.init).__name__}")
        if tuple(self.init.shape) != self.shape:
            raise ValueError(f"init must have the sample shape {self.shape}, got {tuple(self.init.shape)}")
        if not self.init.is_floating_point():
            raise TypeError(f"init must be a floating-point tensor, got {self.init.dtype}")
        if self.sampler in EAGER_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} cannot edit images (init); use a coefficient-program sampler")
        edit_start(self.steps, float(self.strength))  # ValueError when strength leaves no step

    def _check_mask(self) -> None:
        """A tensor that broadcasts to the sample shape, with values in [0, 1]."""
        if not isinstance(self.mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(self.mask).__name__}")
        try:
            broadcast = torch.broadcast_shapes(tuple(self.mask.shape), self.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != self.shape:
            raise ValueError(f"mask must broadcast to the sample shape {self.shape}, got {tuple(self.mask.shape)}")
        values = self.mask.detach().float()
        if not bool(((values >= 0) & (values <= 1)).all()):
            raise ValueError("mask values must be in [0, 1] (1 = regenerate, 0 = keep)")

    def inpaint_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Inpainting's image and mask as the state is (``device``, ``dtype``, the mask expanded to the request's
        shape), what the fused step blends with; None unless the request inpaints."""
        if self.mask is None:
            return None
        as_state = dict(device=device, dtype=dtype)
        init = self.init.detach().to(**as_state).contiguous()
        return init, self.mask.detach().to(**as_state).expand(self.shape).contiguous()

    def edit_grid(self, grid: Grid) -> Grid:
        """``grid`` as this request runs it: cut where ``strength`` starts when it edits images (:func:`edit_start`),
        else ``grid`` itself."""
        return grid if self.init is None else cut_grid(grid, edit_start(grid.steps, float(self.strength)))

    def _check_network_inputs(self, pipe: PipelineLike) -> None:
        """What a pipeline declares about its network: the sample shape, and the class labels ``y`` it takes."""
        if pipe.sample_shape is not None and tuple(self.sample_shape) != tuple(pipe.sample_shape):
            raise ValueError(
                f"sample_shape must be {tuple(pipe.sample_shape)} for this network, got {tuple(self.sample_shape)}"
            )
        num_classes = pipe.num_classes
        for what, kwargs in (("model_kwargs", self.model_kwargs), ("uncond_kwargs", self.uncond_kwargs or {})):
            if num_classes and "y" in kwargs:
                check_class_labels(kwargs["y"], num_classes, f"{what}['y']")

    def _check_batchable(self, pipe: PipelineLike) -> None:
        """What step-level batching cannot run, and the program's own checks (ranges of its options)."""
        if self.sampler in EAGER_SAMPLERS:
            raise ValueError(
                f"sampler {self.sampler!r} is not a fixed coefficient program and cannot be batched per step"
            )
        if self.guidance_rescale != 0.0:
            raise ValueError("guidance_rescale is not available with step-level batching")
        if self.jumps:
            raise ValueError("jumps (RePaint resampling) is not available with step-level batching")
        self.program(pipe)  # built (and cached) now, so an option out of its range is refused at validation
        check_model_accepts(pipe.model, dict(self.model_kwargs))
        if self.uncond_kwargs is not None:
            check_model_accepts(pipe.model, dict(self.uncond_kwargs), "uncond_kwargs")

    def program(self, pipe: PipelineLike, grid: Any = None) -> Program:
        """The coefficient program this request runs on ``pipe`` (:meth:`Pipeline.program`): on ``grid`` (default the
        spaced grid of ``steps``; ``spacing="tuned"``: the pipeline's tuned grid for the request's sampler, steps and
        guidance scale), cut for ``strength`` when the request edits images."""
        if grid is None and self.spacing == TUNED_SPACING:
            grid = pipe.tuned_grid(self.sampler, self.steps, self.guidance_scale)
        if self.init is not None:
            if grid is None:
                grid = pipe.default_grid(self.sampler, self.steps, self.spacing, self.steps_offset, self.rho)
            grid = self.edit_grid(grid)
        prog = pipe.program(
            self.sampler, self.steps, self.spacing, self.steps_offset, self.rho, grid=grid, **dict(self.options)
        )
        return resampled(prog, int(self.jumps)) if self.jumps else prog

    def program_key(self) -> tuple:
        """Requests with equal keys run the same program (the engine shares one per key)."""
        return (
            self.sampler,
            self.steps,
            self.spacing,
            self.steps_offset,
            self.rho,
            tuple(sorted(dict(self.options).items())),
            self.guidance_scale if self.spacing == TUNED_SPACING else None,  # a tuned grid is per guidance scale too
            None if self.init is None else float(self.strength),
            int(self.jumps),
        )


TUNED_SPACING = "tuned"
"""The ``spacing`` that samples on a pipeline's tuned grid for the request's (sampler, steps, guidance scale)."""

MAX_STEPS = 100_000
"""The most steps a request may take (a bound on the memory of its program; schedules may allow fewer)."""


def check_switch(name: str, value: Any) -> None:
    """A yes/no argument is a bool (a tensor or a string there is a TypeError, never read as true or false)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")


REQUEST_FIELDS = ("spacing", "steps_offset", "rho", "guidance_rescale", "init", "mask", "strength", "jumps")
"""The keyword arguments of :meth:`fastdiff.Pipeline.sample` that are :class:`SampleRequest` fields."""


@dataclass(frozen=True)
class SampleOptions:
    """How :meth:`fastdiff.Pipeline.sample` runs a request: every switch beside what to sample, with its default.

    Args:
        timesteps: run on these network times instead of a spaced grid (diffusers' meaning: what the network is
            fed at each step, noisiest first; :meth:`Schedule.grid_from_timesteps`); ``steps`` and ``spacing`` are
            then unused (``spacing`` must be None).
        sigmas: run on these k-diffusion/diffusers sigmas (``sigma / alpha``, noisiest first, an optional final 0;
            :meth:`Schedule.grid_from_sigmas`). At most one of ``timesteps``, ``sigmas`` and ``grid``.
        grid: run on this :class:`Grid` (e.g. a diffusers scheduler's own, :mod:`fastdiff.diffusers`).
        noise: explicit noise instead of Philox noise, indexable by stage: ``noise[k]`` shaped like the state
            (for parity with other libraries' generators).
        init_noise: inpainting: the known region's noise at every step, shaped like the state, instead of fresh
            Philox noise per step (diffusers' inpainting loop adds one noise tensor at every step).
        return_x0: also return the x0 estimate of every step, stacked as [steps, *shape].
        return_trajectory: also return the state at every step boundary, stacked as [steps + 1, *shape] (x_T
            first, the samples last).
        callback: ``callback(step, x, x0_hat)`` after every sampler step with ``step % callback_steps == 0`` (as
            diffusers); ``x`` is the state after the step and ``x0_hat`` that step's x0 estimate, both buffers the
            loop reuses (clone to keep).
        callback_steps: see ``callback`` (an int >= 1).
        cuda_graph: ``"auto"`` runs the whole loop as one replayed CUDA graph where that applies (CUDA, fixed-step
            sampler, no explicit noise list, no callback) and eagerly otherwise; ``True`` insists (ValueError where
            it cannot apply); ``False`` is always eager. Graph and eager give the same samples for the same seeds.
        guidance_batching: ``"double"`` (one model call on the doubled batch, conditional rows first) or
            ``"separate"`` (two calls); see :mod:`fastdiff.runtime.guidance`.
    """

    timesteps: Sequence[float] | None = None
    sigmas: Sequence[float] | None = None
    grid: Grid | None = None
    noise: Any = None
    init_noise: torch.Tensor | None = None
    return_x0: bool = False
    return_trajectory: bool = False
    callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None
    callback_steps: int = 1
    cuda_graph: str | bool = "auto"
    guidance_batching: str = "double"

    def __post_init__(self) -> None:
        for name in ("return_x0", "return_trajectory"):
            check_switch(name, getattr(self, name))
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"callback must be callable as callback(step, x, x0_hat) or None, got "
                            f"{type(self.callback).__name__}")  # fmt: skip

    @classmethod
    def split(cls, options: Mapping[str, Any]) -> tuple[SampleOptions, dict[str, Any], dict[str, Any]]:
        """:meth:`fastdiff.Pipeline.sample`'s keyword arguments as (these options, :class:`SampleRequest` fields,
        the sampler's own options). ``eta=None`` and ``variance_type="fixed_small"`` are the defaults and left out,
        so they reach no sampler that does not take them."""
        names = {f.name for f in fields(cls)}
        run = cls(**{k: v for k, v in options.items() if k in names})
        request = {k: v for k, v in options.items() if k in REQUEST_FIELDS}
        sampler = {k: v for k, v in options.items() if k not in names and k not in REQUEST_FIELDS}
        if sampler.get("eta", 0.0) is None:
            del sampler["eta"]
        if sampler.get("variance_type") == "fixed_small":
            del sampler["variance_type"]
        return run, request, sampler


__all__ = ["REQUEST_FIELDS", "SampleOptions", "SampleRequest", "SeedLike"]
