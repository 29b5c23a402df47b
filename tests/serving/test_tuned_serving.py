"""``spacing: "tuned"`` per request over HTTP, and the tuned settings in ``GET /v1/info``."""

from __future__ import annotations

import numpy as np
import pytest
from live_server import serving
from serving_models import mixture_pipeline

from fastdiff.serving.client import ServerError
from fastdiff.solvers.tuned import TunedGrid, weights_fingerprint

pytestmark = pytest.mark.http


def test_tuned_requests_sample_on_the_tuned_grid_and_info_lists_them():
    pipe = mixture_pipeline()
    pipe.add_tuned(
        TunedGrid(
            sampler="ddim",
            steps=3,
            guidance_scale=1.0,
            times=(999.0, 500.5, 40.25),
            shifts=(0.0, 0.3, -0.2),
            teacher={},
            loss={},
            fingerprint=weights_fingerprint(pipe.model),
        )
    )
    with serving(pipe, max_batch=4) as (client, _):
        got = client.sample(n=3, seed=5, sampler="ddim", steps=3, spacing="tuned")
        want = pipe.sample((3, *pipe.sample_shape), sampler="ddim", steps=3, seed=5, spacing="tuned", progress=False)
        np.testing.assert_array_equal(got, want.numpy())
        default = pipe.sample((3, *pipe.sample_shape), sampler="ddim", steps=3, seed=5, progress=False)
        assert not np.array_equal(got, default.numpy())
        assert client.info()["tuned"] == [{"sampler": "ddim", "steps": 3, "guidance_scale": 1.0}]
        with pytest.raises(ServerError) as exc:
            client.sample(n=1, sampler="ddim", steps=4, spacing="tuned")
        assert exc.value.status == 422 and "tuned settings: (ddim, steps=3, guidance_scale=1)" in str(exc.value)
