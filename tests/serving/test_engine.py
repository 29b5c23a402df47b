"""The step-level batching engine: a request's samples equal ``Pipeline.sample`` bitwise for a batch-invariant
network (the exact mixture), whatever shares its batch and whenever it joined; guidance; per-request failure;
validation."""

from __future__ import annotations

import random

import pytest
import torch
from serving_models import mixture_pipeline, offline

from fastdiff import Pipeline
from fastdiff.serving import Engine, RequestCancelled, RequestFailed, SampleRequest


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return mixture_pipeline()


def test_mixed_load_equals_offline_sampling_bitwise(pipe):
    rng = random.Random(0)
    samplers = [
        ("ddim", {}),
        ("ddim", {"eta": 1.0}),
        ("ddpm", {}),
        ("dpmpp_2m", {}),
        ("dpmpp_3m_sde", {}),
        ("unipc", {}),
        ("euler_ancestral", {}),
        ("heun", {}),
        ("deis", {}),
    ]
    engine = Engine(pipe, max_batch=12)
    reqs = {}
    for i in range(14):
        sampler, opts = samplers[i % len(samplers)]
        n = rng.randint(1, 5)
        req = SampleRequest(
            n=n,
            sample_shape=(2,),
            sampler=sampler,
            steps=rng.randint(3, 12),
            seed=1000 + i,
            options=opts,
            model_kwargs={"y": torch.arange(n) % 3},
        )
        reqs[engine.submit(req)] = req
        for _ in range(rng.randint(0, 3)):  # requests arrive while others run
            engine.tick()
    assert engine.queued_requests > 0 or engine.running_rows > 0
    engine.run()
    assert engine.ticks > 0
    for rid, req in reqs.items():
        got = engine.result(rid)
        want = offline(pipe, req)
        assert torch.equal(got, want), (req.sampler, req.steps, float((got - want).abs().max()))


def test_guided_and_unguided_rows_share_a_batch(pipe):
    engine = Engine(pipe, max_batch=16)
    y = torch.tensor([0, 1, 2, 1])
    guided = SampleRequest(
        n=4,
        sample_shape=(2,),
        sampler="ddim",
        steps=6,
        seed=[5, 6, 7, 8],
        guidance_scale=3.0,
        model_kwargs={"y": y},
        uncond_kwargs={"y": torch.zeros_like(y)},
    )
    plain = SampleRequest(
        n=3, sample_shape=(2,), sampler="dpmpp_2m", steps=8, seed=9, model_kwargs={"y": torch.tensor([2, 2, 0])}
    )
    a, b = engine.submit(guided), engine.submit(plain)
    engine.run()
    assert torch.equal(engine.result(a), offline(pipe, guided))
    assert torch.equal(engine.result(b), offline(pipe, plain))


def test_a_nan_fails_only_its_request(pipe):
    engine = Engine(pipe, max_batch=16)
    bad = engine.submit(
        SampleRequest(n=2, sample_shape=(2,), steps=5, seed=1, model_kwargs={"y": torch.tensor([0, 99])})
    )
    good_req = SampleRequest(n=2, sample_shape=(2,), steps=5, seed=2, model_kwargs={"y": torch.tensor([1, 1])})
    good = engine.submit(good_req)
    engine.run()
    with pytest.raises(RequestFailed, match="NaN"):
        engine.result(bad)
    assert torch.equal(engine.result(good), offline(pipe, good_req))


def test_bad_requests(pipe):
    engine = Engine(pipe, max_batch=4)
    for req, match in [
        (SampleRequest(n=0, sample_shape=(2,)), "every size >= 1"),
        (SampleRequest(n=1, sample_shape=(2,), sampler="nope"), "unknown sampler"),
        (SampleRequest(n=1, sample_shape=(2,), sampler="pc"), "cannot be batched"),
        (SampleRequest(n=1, sample_shape=(2,), options={"bogus": 1}), "does not take"),
        (SampleRequest(n=2, sample_shape=(2,), model_kwargs={"y": torch.zeros(3)}), "batch size 3"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.submit(req)
    too_big = engine.submit(SampleRequest(n=5, sample_shape=(2,), steps=2))
    engine.run()
    with pytest.raises(ValueError, match="max_batch"):
        engine.result(too_big)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(pipe, max_batch=0)


def test_cancel_drops_queued_and_running_requests(pipe):
    engine = Engine(pipe, max_batch=4)
    keep_req = SampleRequest(n=2, sample_shape=(2,), steps=6, seed=3)
    running = engine.submit(SampleRequest(n=2, sample_shape=(2,), steps=6, seed=1))
    keep = engine.submit(keep_req)
    queued = engine.submit(SampleRequest(n=2, sample_shape=(2,), steps=6, seed=2))
    report = engine.tick()
    assert report.admitted == [running, keep] and report.rows == 4 and engine.queued_requests == 1
    engine.cancel(running)
    engine.cancel(queued)
    assert engine.queued_requests == 0
    report = engine.tick()
    assert report.rows == 2  # the cancelled rows left before the network call
    engine.run()
    for rid in (running, queued):
        with pytest.raises(RequestCancelled):
            engine.result(rid)
    assert torch.equal(engine.result(keep), offline(pipe, keep_req))
    engine.cancel(keep)  # finished and forgotten: nothing happens


def test_drain_admission_runs_each_batch_to_its_end(pipe):
    engine = Engine(pipe, max_batch=8, admission="drain")
    first = [engine.submit(SampleRequest(n=1, sample_shape=(2,), steps=s, seed=s)) for s in (3, 5)]
    engine.tick()
    late = engine.submit(SampleRequest(n=1, sample_shape=(2,), steps=2, seed=9))
    finished = []
    for _ in range(4):  # the first batch's last 4 ticks: the late request waits although there is room
        report = engine.tick()
        assert late not in report.admitted and report.rows >= 1
        finished += report.finished
    assert sorted(finished) == sorted(first) and engine.running_rows == 0
    assert engine.tick().admitted == [late]


def test_single_admission_takes_one_request_at_a_time(pipe):
    engine = Engine(pipe, max_batch=8, admission="drain", max_requests=1)
    reqs = [SampleRequest(n=2, sample_shape=(2,), sampler="dpmpp_2m", steps=4, seed=s) for s in range(3)]
    ids = [engine.submit(r) for r in reqs]
    rows = []
    while not engine.idle:
        rows.append(engine.tick().rows)
    assert rows == [2] * 12
    for rid, req in zip(ids, reqs):
        assert torch.equal(engine.result(rid), offline(pipe, req))


def test_engine_arguments_are_checked(pipe):
    with pytest.raises(ValueError, match="admission"):
        Engine(pipe, admission="eager")
    with pytest.raises(ValueError, match="max_requests"):
        Engine(pipe, max_requests=0)
    with pytest.raises(ValueError, match="steps must be"):
        Engine(pipe).submit(SampleRequest(n=1, sample_shape=(2,), steps=0))
    with pytest.raises(ValueError, match="sample_shape must be"):
        Engine(pipe).submit(SampleRequest(n=1, sample_shape=(3,)))


def test_stages_without_a_network_call_skip_the_network_for_their_rows():
    from fastdiff import Schedule
    from fastdiff.demos.mixture import default_mixture

    schedule = Schedule.edm()
    base = default_mixture().as_model(schedule, "eps")
    batches = []

    def model(x, t):
        batches.append(x.shape[0])
        return base(x, t)

    pipe = Pipeline(model, schedule, device="cpu")
    churn = SampleRequest(
        n=2, sample_shape=(2,), sampler="euler", steps=6, seed=4, options={"s_churn": 20.0, "s_tmax": 50.0}
    )
    plain = SampleRequest(n=1, sample_shape=(2,), sampler="heun", steps=4, seed=5)
    prog = pipe.program("euler", 6, s_churn=20.0, s_tmax=50.0)
    no_call = [k for k in range(prog.stages) if not prog.calls_model(k)]
    assert no_call  # EDM churn adds stages that only add noise
    engine = Engine(pipe, max_batch=8)
    a = engine.submit(churn)
    engine.run()
    assert len(batches) == prog.stages - len(no_call)  # alone, its churn stages make no call at all
    b, c = engine.submit(churn), engine.submit(plain)
    engine.run()
    for rid, req in ((a, churn), (b, churn), (c, plain)):
        assert torch.equal(engine.result(rid), offline(pipe, req))


def test_pipeline_sample_takes_the_same_request(pipe):
    req = SampleRequest(
        n=3,
        sample_shape=(2,),
        sampler="dpmpp_2m_sde",
        steps=7,
        seed=[4, 5, 6],
        guidance_scale=2.5,
        model_kwargs={"y": torch.tensor([0, 1, 2])},
        uncond_kwargs={"y": torch.zeros(3, dtype=torch.long)},
        options={"eta": 0.5},
    )
    assert torch.equal(pipe.sample(req, progress=False), offline(pipe, req))
    with pytest.raises(ValueError, match="does not take"):
        pipe.sample(SampleRequest(n=1, sample_shape=(2,), options={"bogus": 1}), progress=False)
    with pytest.raises(ValueError, match="cannot be batched"):  # what the engine refuses, the pipeline runs
        SampleRequest(n=1, sample_shape=(2,), sampler="rk45").validate(pipe, serving=True)
    SampleRequest(n=1, sample_shape=(2,), sampler="rk45").validate(pipe)
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        pipe.sample((1, 2), model_kwargs=[1], progress=False)


def _guided(n: int, seed: int, y: list[int], uncond_y: int = 0, **kw) -> SampleRequest:
    return SampleRequest(
        n=n,
        sample_shape=(2,),
        seed=seed,
        guidance_scale=2.0,
        model_kwargs={"y": torch.tensor(y)},
        uncond_kwargs={"y": torch.full((n,), uncond_y)},
        **kw,
    )


def test_a_network_error_fails_only_the_requests_it_comes_from(pipe):
    engine = Engine(pipe, max_batch=32)
    samplers = ["ddim", "dpmpp_2m", "ddpm", "unipc", "heun", "ddim"]
    good = [
        SampleRequest(
            n=1 + i % 3,
            sample_shape=(2,),
            sampler=sampler,
            steps=4 + i,
            seed=200 + i,
            model_kwargs={"y": torch.full((1 + i % 3,), i % 3)},
        )
        for i, sampler in enumerate(samplers)
    ]
    good.append(_guided(2, 250, [0, 2], sampler="dpmpp_2m", steps=7))
    bad = [
        SampleRequest(n=2, sample_shape=(2,), steps=6, seed=300, model_kwargs={"y": torch.tensor([1, 77])}),
        _guided(1, 301, [2], uncond_y=77, steps=5),  # only its unconditional input makes the network raise
        SampleRequest(n=1, sample_shape=(2,), steps=9, seed=302, model_kwargs={"y": torch.tensor([77])}),
    ]
    ids = {}
    for i, req in enumerate(good + bad):  # everything shares the batch; requests join at different ticks
        ids[engine.submit(req)] = req
        if i % 3 == 2:
            engine.tick()
    engine.admit()  # the last bad request joins; the next tick's call raises on it
    rows_before, calls_before = engine.running_rows, pipe.model.calls
    report = engine.tick()
    assert report.admitted == [] and report.rows == rows_before
    left = sum(ids[rid].n for rid in report.finished)
    assert engine.running_rows == rows_before - left  # the failed request's rows left, no other row did
    assert pipe.model.calls - calls_before <= 8  # one call, then bisected: not one call per request
    engine.run()
    assert engine.idle and engine.running_rows == 0
    for rid, req in ids.items():
        if any(r is req for r in bad):
            with pytest.raises(RequestFailed, match="network raised.*label 77") as info:
                engine.result(rid)
            assert isinstance(info.value.__cause__, RuntimeError)
        else:
            assert torch.equal(engine.result(rid), offline(pipe, req)), (req.sampler, req.steps)


def test_conditioning_that_cannot_be_stacked_is_called_apart(pipe):
    engine = Engine(pipe, max_batch=16)
    reqs = [
        SampleRequest(n=1, sample_shape=(2,), steps=6, seed=1, model_kwargs={"c": torch.tensor([[1.0, 2.0]])}),
        SampleRequest(n=1, sample_shape=(2,), steps=6, seed=2, model_kwargs={"c": torch.tensor([[1.0, 2.0, 3.0]])}),
        SampleRequest(
            n=2, sample_shape=(2,), steps=6, seed=3, model_kwargs={"c": torch.tensor([[1, 2, 3], [4, 5, 6]])}
        ),  # same width, other dtype
        SampleRequest(n=2, sample_shape=(2,), steps=6, seed=4, model_kwargs={"c": torch.tensor([[0.5, 1.0]] * 2)}),
        SampleRequest(n=1, sample_shape=(2,), steps=6, seed=5),
    ]
    ids = [engine.submit(r) for r in reqs]
    calls = pipe.model.calls
    engine.tick()
    assert pipe.model.calls - calls == 4  # widths 2 and 3 in float, width 3 in int64, no c: one call each
    engine.run()
    for rid, req in zip(ids, reqs):
        assert torch.equal(engine.result(rid), offline(pipe, req))


def test_bad_rows_of_every_kind_beside_innocent_ones(pipe):
    engine = Engine(pipe, max_batch=24)
    rng = random.Random(2)
    kinds = {
        "ok": lambda n: {"y": torch.tensor([rng.randint(0, 2) for _ in range(n)])},
        "raises": lambda n: {"y": torch.tensor([77] * n)},
        "nan": lambda n: {"y": torch.tensor([99] + [0] * (n - 1))},
        "wide": lambda n: {"c": torch.rand(n, rng.randint(1, 4))},
    }
    reqs = {}
    for i in range(16):
        kind = ["ok", "ok", "raises", "nan", "wide", "ok"][i % 6]
        n = rng.randint(1, 3)
        req = SampleRequest(
            n=n,
            sample_shape=(2,),
            sampler=rng.choice(["ddim", "dpmpp_2m", "euler_ancestral"]),
            steps=rng.randint(3, 8),
            seed=400 + i,
            model_kwargs=kinds[kind](n),
        )
        reqs[engine.submit(req)] = (kind, req)
        for _ in range(rng.randint(0, 2)):
            engine.tick()
    engine.run()
    for rid, (kind, req) in reqs.items():
        if kind in ("ok", "wide"):
            assert torch.equal(engine.result(rid), offline(pipe, req)), (kind, req.sampler)
        else:
            with pytest.raises(RequestFailed, match="label 77" if kind == "raises" else "NaN"):
                engine.result(rid)


def test_conditioning_names_the_network_cannot_take_are_refused_at_submission(pipe):
    engine = Engine(pipe)
    with pytest.raises(ValueError, match=r"model_kwargs\['z'\].*takes no argument"):
        engine.submit(SampleRequest(n=1, sample_shape=(2,), model_kwargs={"z": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"uncond_kwargs\['q'\]"):
        engine.submit(SampleRequest(n=1, sample_shape=(2,), guidance_scale=2.0, uncond_kwargs={"q": 1}))


def test_a_program_with_more_history_than_a_row_holds_is_refused(pipe):
    """PNDM's Runge-Kutta warm-up keeps four history slots; a serving row holds three: refused at submission."""
    engine = Engine(pipe)
    with pytest.raises(ValueError, match="keeps 4 history slots; a serving row holds 3"):
        engine.submit(SampleRequest(n=1, sample_shape=(2,), sampler="pndm_prk", steps=10))
