"""fastdiff with the diffusers ecosystem: the two adoption paths in one place.

1. Own the loop: ``fastdiff.Pipeline.from_diffusers(model, scheduler)`` (also :func:`pipeline_from_diffusers`),
   a :class:`~fastdiff.pipeline.DiffusersPipeline` with the scheduler's schedule, prediction type, timestep
   convention, algorithm and grid.
2. Drop in: ``pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config)``.

Importing this module imports diffusers (it is named after the library but imports it absolutely, so it
never shadows it).
"""
from __future__ import annotations

from fastdiff.diffusers_call import DiffusersModel
from fastdiff.diffusers_scheduler import FastdiffScheduler, FastdiffSchedulerOutput
from fastdiff.diffusers_setup import CLASSES, SchedulerSetup, scheduler_setup
from fastdiff.pipeline import DiffusersPipeline, Pipeline
from fastdiff.x0_clip import X0Clip

pipeline_from_diffusers = Pipeline.from_diffusers
"""``Pipeline.from_diffusers`` by another name."""

__all__ = ["CLASSES", "DiffusersModel", "DiffusersPipeline", "FastdiffScheduler", "FastdiffSchedulerOutput",
           "SchedulerSetup", "X0Clip", "pipeline_from_diffusers", "scheduler_setup"]
