"""Image editing over HTTP (``POST /v1/samples`` with ``init``, ``mask`` and ``strength``; the arrays as base64
``.npy``): concurrent image-to-image, inpainting and plain requests equal offline ``Pipeline.sample`` bitwise on the
exact mixture, and what cannot be served is a 422 naming the field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from live_server import serving
from serving_models import mixture_pipeline

from fastdiff.serving.client import Client, ServerError, npy_base64

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def mixture_server():
    pipe = mixture_pipeline()
    with serving(pipe, max_batch=16) as (client, runner):
        yield pipe, client, runner


def _offline(pipe, n, seed, sampler="ddim", steps=8, init=None, mask=None, strength=1.0):
    return pipe.sample(
        (n, *pipe.sample_shape), sampler=sampler, steps=steps, seed=seed, progress=False,
        init=None if init is None else torch.as_tensor(init).expand(n, *pipe.sample_shape),
        mask=None if mask is None else torch.as_tensor(mask), strength=strength,
    ).numpy()  # fmt: skip


def test_concurrent_edits_equal_offline_sampling(mixture_server):
    pipe, client, _ = mixture_server
    rng = np.random.default_rng(0)
    cases = []
    for i in range(9):
        n = 1 + i % 3
        case = dict(n=n, seed=10 + i, sampler=["ddim", "dpmpp_2m", "euler_ancestral"][i % 3], steps=5 + i)
        if i % 3 != 0:  # image-to-image; one init for all samples on every fourth case
            shape = (2,) if i % 4 == 1 else (n, 2)
            case.update(init=rng.standard_normal(shape).astype(np.float32), strength=[0.4, 0.7, 1.0][i % 3])
        if i % 3 == 2:  # inpainting: keep the first coordinate
            case["mask"] = np.array([0.0, 1.0], dtype=np.float32)
        cases.append(case)
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: Client(client.base_url).sample(**c), cases))
    for case, got in zip(cases, results, strict=True):
        want = _offline(pipe, **case)
        assert got.shape == want.shape and np.array_equal(got, want), {k: v for k, v in case.items() if k != "init"}


def test_bad_edit_fields_are_422_naming_the_field(mixture_server):
    _, client, _ = mixture_server
    good = npy_base64(np.zeros((2, 2)))
    cases = [
        (dict(init="not base64!"), "init", "base64"),
        (dict(init="aGVsbG8="), "init", ".npy"),  # base64, not an array
        (dict(init=npy_base64(np.array([[np.nan, 0.0], [0.0, 0.0]]))), "init", "finite"),
        (dict(init=npy_base64(np.zeros((3, 2)))), "body", "init must have the sample shape"),
        (dict(init=good, mask=npy_base64(np.full((2, 2), 2.0))), "body", "mask values must be in [0, 1]"),
        (dict(init=good, mask=npy_base64(np.zeros(3))), "body", "mask must broadcast"),
        (dict(init=good, strength=0), "body", "strength must be in (0, 1]"),
        (dict(init=good, strength=1.5), "body", "strength must be in (0, 1]"),
        (dict(strength=0.5), "body", "strength needs init"),
        (dict(mask=good), "body", "mask needs init"),
    ]
    for fields, field, message in cases:
        with pytest.raises(ServerError) as info:
            client.sample(n=2, steps=6, **fields)
        assert info.value.status == 422, fields
        detail = info.value.detail[0]
        assert detail["loc"] == ["body", field] and message in detail["msg"], (fields, detail)
