"""The step-level batching engine: a request's samples equal ``Pipeline.sample`` bitwise for a batch-invariant
network (the exact mixture), whatever shares its batch and whenever it joined; guidance; per-request failure;
validation."""
from __future__ import annotations

import random

import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.demo import default_mixture
from fastdiff.serving import Engine, RequestFailed, SampleRequest


class ConditionedMixture:
    """The exact mixture network plus 0.05 * y (elementwise, so batch-invariant); y = 99 poisons a row."""

    def __init__(self, schedule: Schedule):
        self.base = default_mixture().as_model(schedule, "eps")

    def __call__(self, x, t, y=None):
        out = self.base(x, t)
        if y is None:
            return out
        y = y.to(out.dtype)[:, None]
        return torch.where(y == 99, torch.full_like(out, float("nan")), out + 0.05 * y)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    schedule = Schedule.vp_discrete()
    return Pipeline(ConditionedMixture(schedule), schedule, device="cpu")


def _offline(pipe: Pipeline, req: SampleRequest) -> torch.Tensor:
    return pipe.sample((req.n, *req.sample_shape), sampler=req.sampler, steps=req.steps, seed=req.seed,
                       spacing=req.spacing, guidance_scale=req.guidance_scale, model_kwargs=dict(req.model_kwargs),
                       uncond_kwargs=req.uncond_kwargs, progress=False, **dict(req.options))


def test_mixed_load_equals_offline_sampling_bitwise(pipe):
    rng = random.Random(0)
    samplers = [("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {}), ("dpmpp_2m", {}), ("dpmpp_3m_sde", {}),
                ("unipc", {}), ("euler_ancestral", {}), ("heun", {}), ("deis", {})]
    engine = Engine(pipe, max_batch=12)
    reqs = {}
    for i in range(14):
        sampler, opts = samplers[i % len(samplers)]
        n = rng.randint(1, 5)
        req = SampleRequest(n=n, sample_shape=(2,), sampler=sampler, steps=rng.randint(3, 12), seed=1000 + i,
                            options=opts, model_kwargs={"y": torch.arange(n) % 3})
        reqs[engine.submit(req)] = req
        for _ in range(rng.randint(0, 3)):  # requests arrive while others run
            engine.tick()
    assert engine.queued_requests > 0 or engine.running_rows > 0
    engine.run()
    assert engine.ticks > 0
    for rid, req in reqs.items():
        got = engine.result(rid)
        want = _offline(pipe, req)
        assert torch.equal(got, want), (req.sampler, req.steps, float((got - want).abs().max()))


def test_guided_and_unguided_rows_share_a_batch(pipe):
    engine = Engine(pipe, max_batch=16)
    y = torch.tensor([0, 1, 2, 1])
    guided = SampleRequest(n=4, sample_shape=(2,), sampler="ddim", steps=6, seed=[5, 6, 7, 8], guidance_scale=3.0,
                           model_kwargs={"y": y}, uncond_kwargs={"y": torch.zeros_like(y)})
    plain = SampleRequest(n=3, sample_shape=(2,), sampler="dpmpp_2m", steps=8, seed=9,
                          model_kwargs={"y": torch.tensor([2, 2, 0])})
    a, b = engine.submit(guided), engine.submit(plain)
    engine.run()
    assert torch.equal(engine.result(a), _offline(pipe, guided))
    assert torch.equal(engine.result(b), _offline(pipe, plain))


def test_a_nan_fails_only_its_request(pipe):
    engine = Engine(pipe, max_batch=16)
    bad = engine.submit(SampleRequest(n=2, sample_shape=(2,), steps=5, seed=1, model_kwargs={"y": torch.tensor([0, 99])}))
    good_req = SampleRequest(n=2, sample_shape=(2,), steps=5, seed=2, model_kwargs={"y": torch.tensor([1, 1])})
    good = engine.submit(good_req)
    engine.run()
    with pytest.raises(RequestFailed, match="NaN"):
        engine.result(bad)
    assert torch.equal(engine.result(good), _offline(pipe, good_req))


def test_bad_requests(pipe):
    engine = Engine(pipe, max_batch=4)
    for req, match in [(SampleRequest(n=0, sample_shape=(2,)), "n must be"),
                       (SampleRequest(n=1, sample_shape=(2,), sampler="nope"), "unknown sampler"),
                       (SampleRequest(n=1, sample_shape=(2,), sampler="pc"), "cannot be batched"),
                       (SampleRequest(n=1, sample_shape=(2,), options={"bogus": 1}), "does not take"),
                       (SampleRequest(n=2, sample_shape=(2,), model_kwargs={"y": torch.zeros(3)}), "3 rows")]:
        with pytest.raises(ValueError, match=match):
            engine.submit(req)
    too_big = engine.submit(SampleRequest(n=5, sample_shape=(2,), steps=2))
    engine.run()
    with pytest.raises(ValueError, match="max_batch"):
        engine.result(too_big)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(pipe, max_batch=0)
