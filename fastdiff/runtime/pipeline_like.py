"""``PipelineLike``: what the modules below :mod:`fastdiff.pipeline` (the request checks, likelihoods and
inversion) read from a pipeline, as a protocol, so they take a :class:`fastdiff.Pipeline` without importing it
(the pipeline imports them: layers import downward only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from fastdiff.program import Program
from fastdiff.schedule import Schedule


class PipelineLike(Protocol):
    """The attributes and methods of :class:`fastdiff.Pipeline` that lower layers use."""

    model: Callable[..., torch.Tensor]
    schedule: Schedule
    prediction: str
    device: torch.device
    dtype: torch.dtype
    sample_shape: tuple[int, ...] | None
    num_classes: int

    def program(
        self,
        sampler: str,
        steps: int,
        spacing: str | None = None,
        steps_offset: int = 0,
        rho: float = 7.0,
        grid: Any = None,
        **sampler_options: Any,
    ) -> Program:
        """The coefficient program of a request (:meth:`fastdiff.Pipeline.program`)."""
        ...

    def default_grid(self, sampler: str, steps: int, spacing: Any, steps_offset: int, rho: float) -> Any:
        """The grid a program runs when given none (:meth:`fastdiff.Pipeline.default_grid`)."""
        ...

    def tuned_grid(self, sampler: str, steps: int, guidance_scale: float) -> Any:
        """The tuned grid of these settings (:meth:`fastdiff.Pipeline.tuned_grid`)."""
        ...

    def sample(self, shape: Any, *args: Any, **kwargs: Any) -> Any:
        """Draws samples (:meth:`fastdiff.Pipeline.sample`)."""
        ...
