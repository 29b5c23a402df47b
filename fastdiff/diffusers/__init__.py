"""fastdiff with the diffusers ecosystem: the two adoption paths in one place.

1. Own the loop: ``fastdiff.from_diffusers(model, scheduler)`` (:func:`fastdiff.diffusers.pipeline.from_diffusers`),
   a :class:`~fastdiff.diffusers.pipeline.DiffusersPipeline` with the scheduler's schedule, prediction type, timestep
   convention, algorithm and grid.
2. Drop in: ``pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config)``.

Importing this module imports diffusers (it is named after the library but imports it absolutely, so it
never shadows it).
"""

from __future__ import annotations

from fastdiff.diffusers.call import DiffusersModel
from fastdiff.diffusers.config import CLASSES, SchedulerSetup, scheduler_setup
from fastdiff.diffusers.pipeline import DiffusersPipeline, from_diffusers
from fastdiff.diffusers.scheduler import FastdiffScheduler, FastdiffSchedulerOutput
from fastdiff.runtime.x0_clip import X0Clip

pipeline_from_diffusers = from_diffusers
""":func:`from_diffusers` by its 0.2 name."""

__all__ = [
    "CLASSES",
    "DiffusersModel",
    "DiffusersPipeline",
    "FastdiffScheduler",
    "FastdiffSchedulerOutput",
    "SchedulerSetup",
    "X0Clip",
    "from_diffusers",
    "pipeline_from_diffusers",
    "scheduler_setup",
]
