"""Shared fixtures: peers (k-diffusion, diffusers) and one torch thread for the whole session."""

from __future__ import annotations

import os
import sys

import pytest

# tests/ on sys.path so that `import peers` works however pytest was started.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402

PEER_MODULES = {"diffusers", "k_diffusion"}

# Read before any test module sets it: under TRITON_INTERPRET=1 (`make test`) Triton interprets the kernels on the
# host, copying CUDA arguments there, so the CUDA tests would not test the CUDA paths; `make gpu-test` runs them.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        help="the fuzz suite's long run (10,000 cases per property instead of a few hundred)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis profiles for tests/fuzz: seeded (derandomized) and bounded in ``make test``; long with
    ``--fuzz-long``."""
    from hypothesis import HealthCheck, settings

    common = dict(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    settings.register_profile("fastdiff", max_examples=300, **common)
    settings.register_profile("fastdiff-long", max_examples=10_000, **common)
    settings.load_profile("fastdiff-long" if config.getoption("--fuzz-long") else "fastdiff")


PEER_FIXTURES = {"kdiff_sampling", "diffusers_schedulers", "tiny_pipelines"}


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random SD, SDXL and SD3 pipelines saved once per test run (tests/tiny_pipelines.py): name -> folder."""
    from tiny_pipelines import write_pipelines

    return write_pipelines(str(tmp_path_factory.mktemp("tiny-pipelines")))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """``cuda`` tests skip (saying so) without a CUDA device or under TRITON_INTERPRET=1 (``make gpu-test`` runs
    them); tests that compare with a peer library (a module that imports diffusers or k-diffusion, or a peer fixture)
    are marked ``peers``. ``-m "not peers"`` and the like
    select by them; ``ray`` and ``http`` are set by their files."""
    import torch

    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        elif item.get_closest_marker("cuda") and TRITON_INTERPRETED:
            item.add_marker(pytest.mark.skip(reason="TRITON_INTERPRET=1 interprets the kernels: run `make gpu-test`"))
        module = getattr(item, "module", None)
        if PEER_MODULES & set(vars(module) if module else ()) or PEER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.peers)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests' tensors are tiny: OpenMP hand-offs cost far more than the arithmetic on a shared
    # 2-core runner (softmax of a [128, 3] tensor: 12 ms with 2 threads under load, 11 us with 1).
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def kdiff_sampling():
    """k-diffusion's real ``k_diffusion.sampling`` module (see tests/peers.py for how it is imported)."""
    return peers.k_diffusion_sampling()


@pytest.fixture(scope="session")
def diffusers_schedulers():
    """The diffusers scheduler classes the discrete schedules are compared with."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
