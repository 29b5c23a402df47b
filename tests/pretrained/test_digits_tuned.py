"""The tuned grids the digits network ships (docs/tune.md): every promised setting, fitted to the shipped weights,
and closer to a many-step reference than the default grid on seeds the tuning never saw."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastdiff.pretrained import digits


@pytest.fixture(scope="module")
def pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grid refused for its fingerprint would warn
        return digits(device="cpu")


def test_the_promised_settings_are_shipped(pipe):
    want = {(s, k, 1.0) for s in ("dpmpp_2m", "unipc", "ddim") for k in (4, 5, 6, 8, 10)}
    assert want <= set(pipe.tuned.settings())
    for tuned in pipe.tuned:
        assert tuned.loss["tuned"] < tuned.loss["default"], tuned.key  # held-out, as recorded when tuned
        assert tuned.teacher["n_tune"] >= 128 and tuned.teacher["n_eval"] >= 256


def test_a_tuned_grid_beats_the_default_on_fresh_seeds(pipe):
    seeds = list(range(7_000_000, 7_000_064))
    shape = (len(seeds), *pipe.sample_shape)
    with torch.inference_mode():
        ref = pipe.sample(shape, sampler="unipc", steps=100, spacing="logsnr", seed=seeds, progress=False)
        kw = dict(sampler="dpmpp_2m", steps=5, seed=seeds, progress=False)
        tuned = pipe.sample(shape, spacing="tuned", **kw)
        default = pipe.sample(shape, **kw)
    # per-sample errors, compared by their median: a few samples whose digit flips dominate a mean of 64
    tuned_err, default_err = ((x - ref).square().mean((1, 2, 3)).median() for x in (tuned, default))
    assert tuned_err < 0.5 * default_err
