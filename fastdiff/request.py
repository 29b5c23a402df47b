"""What to sample, as one object: :class:`SampleRequest`, shared by :meth:`fastdiff.Pipeline.sample` (which builds
one from its arguments, or takes one), the serving engine and the HTTP API (which parses its JSON into one).
Its checks live here, so every entry point refuses the same requests with the same messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from fastdiff.adaptive import SPECIAL_SAMPLERS
from fastdiff.checks import check_model_kwargs, check_shape
from fastdiff.pipeline_like import PipelineLike
from fastdiff.program import Program
from fastdiff.samplers import get_sampler


SeedLike = Union[int, Sequence[int], torch.Tensor]


@dataclass
class SampleRequest:
    """``n`` samples of ``sample_shape`` with ``sampler`` over ``steps`` steps (see :meth:`Pipeline.sample` for
    every field's meaning).

    ``seed`` is an int (sample i gets the seed :func:`~fastdiff.kernels.philox.derive_seeds` derives for index i)
    or one int per sample. ``model_kwargs`` / ``uncond_kwargs`` hold per-sample tensors (one row per sample) or
    shared values; ``guidance_scale != 1`` (or ``uncond_kwargs``) turns classifier-free guidance on. ``options``
    are the sampler's own options (``eta``, ``variance_type``, ``s_churn``, ...).
    """

    n: int
    sample_shape: Sequence[int]
    sampler: str = "ddim"
    steps: int = 50
    seed: SeedLike = 0
    spacing: Optional[str] = None
    steps_offset: int = 0
    rho: float = 7.0
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    uncond_kwargs: Optional[Mapping[str, Any]] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, ...]:
        """``(n, *sample_shape)``."""
        return (self.n, *self.sample_shape)

    @property
    def guided(self) -> bool:
        """Whether the request uses classifier-free guidance."""
        return self.guidance_scale != 1.0 or self.uncond_kwargs is not None

    def validate(self, pipe: PipelineLike, serving: bool = False) -> None:
        """Raises ValueError/TypeError naming the field for anything ``pipe`` cannot sample. With ``serving``, also
        what step-level batching cannot run: samplers that are not one fixed coefficient program, guidance
        rescaling, a sample shape other than the network's own (and steps are checked here rather than by the
        schedule's grid)."""
        check_shape(self.shape)
        info = get_sampler(self.sampler)
        if pipe.prediction not in info.predictions:
            raise ValueError(f"sampler {self.sampler!r} cannot use prediction {pipe.prediction!r}; "
                             f"it accepts {info.predictions}")
        info.check_options(dict(self.options))
        for what, kwargs in (("model_kwargs", self.model_kwargs), ("uncond_kwargs", self.uncond_kwargs)):
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise TypeError(f"{what} must be a mapping of argument names to values, got {type(kwargs).__name__}")
        check_model_kwargs(dict(self.model_kwargs), self.n)
        if self.uncond_kwargs is not None:
            check_model_kwargs(dict(self.uncond_kwargs), self.n, "uncond_kwargs")
        if serving:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
            if self.sampler in SPECIAL_SAMPLERS:
                raise ValueError(f"sampler {self.sampler!r} is not a fixed coefficient program and cannot be "
                                 "batched per step")
            if self.guidance_rescale != 0.0:
                raise ValueError("guidance_rescale is not available with step-level batching")
            if pipe.sample_shape is not None and tuple(self.sample_shape) != tuple(pipe.sample_shape):
                raise ValueError(f"sample_shape must be {tuple(pipe.sample_shape)} for this network, "
                                 f"got {tuple(self.sample_shape)}")

    def program(self, pipe: PipelineLike, grid: Any = None) -> Program:
        """The coefficient program this request runs on ``pipe`` (:meth:`Pipeline.program`)."""
        return pipe.program(self.sampler, self.steps, self.spacing, self.steps_offset, self.rho, grid=grid,
                            **dict(self.options))

    def program_key(self) -> tuple:
        """Requests with equal keys run the same program (the engine shares one per key)."""
        return (self.sampler, self.steps, self.spacing, self.steps_offset, self.rho,
                tuple(sorted(dict(self.options).items())))


def fold_sampler_options(eta: Optional[float], variance_type: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """:meth:`Pipeline.sample`'s ``eta`` and ``variance_type`` folded into the sampler options (an explicit
    ``eta=0.0`` must reach samplers whose default is 1)."""
    options = dict(options)
    if eta is not None:
        options["eta"] = eta
    if variance_type != "fixed_small":
        options["variance_type"] = variance_type
    return options
