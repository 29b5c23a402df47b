"""Shared fixtures for the schedule, grid and quadrature tests."""
from __future__ import annotations

import os
import sys

import pytest

# tests/ on sys.path so that `import peers` works however pytest was started.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402


@pytest.fixture(scope="session")
def kdiff_sampling():
    """k-diffusion's real ``k_diffusion.sampling`` module (see tests/peers.py for how it is imported)."""
    return peers.k_diffusion_sampling()


@pytest.fixture(scope="session")
def diffusers_schedulers():
    """The diffusers scheduler classes the discrete schedules are compared with."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
