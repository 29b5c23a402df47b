"""A sampler's coefficient program, built in C++ in float64 and placed on the device once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastdiff._ext import C
from fastdiff.schedule import Grid, Schedule


@dataclass
class Program:
    """Stage rows (``coef`` [stages, 10] float64), slot/step metadata and model times of one sampler run.

    ``coef_device`` is the same table on the device the kernel reads; ``model_time`` [stages] is what
    the network is fed at each stage; ``meta`` [stages, 6] holds the history slots each stage reads
    and writes, the sampler step it belongs to and whether it calls the network.
    """

    sampler: str
    grid: Grid
    coef: np.ndarray
    meta: np.ndarray
    t: np.ndarray
    model_time: np.ndarray
    slots: int
    coef_device: torch.Tensor

    @property
    def stages(self) -> int:
        """Number of stages (network evaluations)."""
        return len(self.model_time)

    def reads(self, stage: int) -> list[int]:
        """History slots stage ``stage`` reads, in coefficient order."""
        return [int(s) for s in self.meta[stage, :3] if s >= 0]

    def writes(self, stage: int) -> int:
        """History slot stage ``stage`` writes, or -1."""
        return int(self.meta[stage, 3])

    def step_of(self, stage: int) -> int:
        """The sampler step stage ``stage`` belongs to."""
        return int(self.meta[stage, 4])

    def calls_model(self, stage: int) -> bool:
        """Whether the stage calls the network first (stages that do not read m as zero)."""
        return bool(self.meta[stage, 5])

    def uses_noise(self, stage: int) -> bool:
        """Whether the stage's row injects noise (c_z != 0)."""
        return bool(self.coef[stage, 5] != 0.0)


def build_program(schedule: Schedule, grid: Grid, sampler: str, prediction: str, device: torch.device,
                  **options: Any) -> Program:
    """Builds the coefficient program of ``sampler`` on ``grid`` for a network predicting ``prediction``.

    ``options`` are the sampler's named options (numbers or strings), e.g. ``eta`` or ``variance_type``.
    """
    raw = C.make_program(schedule._core, grid.t, sampler, prediction, dict(options))
    coef = raw["coef"]
    return Program(sampler=sampler, grid=grid, coef=coef, meta=raw["meta"], t=raw["t"],
                   model_time=raw["model_time"], slots=int(raw["slots"]),
                   coef_device=torch.as_tensor(coef, dtype=torch.float64).to(device))
