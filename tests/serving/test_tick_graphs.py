"""The engine's tick on a bucket's static buffers (CUDA graphs on CUDA): buckets, the coefficient table, padding
and buffers checked on the CPU by running the static path eagerly (``tick_graphs="static"``) against the eager
tick; the capture itself, and that a tick makes no host sync, on CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from serving_models import mixture_pipeline

from fastdiff.serving import Engine, SampleRequest
from fastdiff.serving.tick_graphs import CoefficientTable, bucket_for, buckets

SAMPLERS = [
    ("ddim", {}),
    ("ddpm", {}),
    ("dpmpp_2m", {}),
    ("unipc", {}),
    ("euler_ancestral", {}),
    ("ddim", {"eta": 1.0}),
]


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert buckets(1) == (1,)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(r, 12) for r in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError):
        bucket_for(13, 12)


def test_the_coefficient_table_appends_programs_and_keeps_row_zero_zero():
    pipe = mixture_pipeline()
    table = CoefficientTable(pipe.device, capacity=8)
    a, b = pipe.program("ddim", 4), pipe.program("dpmpp_2m", 6)
    assert table.offset(a) == 1 and table.offset(a) == 1 and table.version == 0
    assert table.offset(b) == 1 + a.stages and table.version == 1  # grew past its room: a new buffer
    assert torch.equal(table.buffer[0], torch.zeros_like(table.buffer[0]))
    assert torch.equal(table.buffer[1 : 1 + a.stages], a.coef_device)
    assert torch.equal(table.buffer[1 + a.stages : 1 + a.stages + b.stages], b.coef_device)


def _requests(count: int, guided: bool, seed: int) -> list[SampleRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        sampler, options = SAMPLERS[i % len(SAMPLERS)]
        n = rng.randint(1, 3)
        kw = dict(n=n, sample_shape=(2,), sampler=sampler, steps=rng.randint(2, 7), seed=rng.randrange(1000),
                  options=options, model_kwargs={"y": torch.tensor([rng.randrange(3) for _ in range(n)])})  # fmt: skip
        if guided:
            kw.update(guidance_scale=1.5 + i % 3, uncond_kwargs={"y": torch.full((n,), 2)})
        out.append(SampleRequest(**kw))
    return out


def _serve(pipe, requests: list[SampleRequest], mode: str, joins: list[int]) -> tuple[list[torch.Tensor], Engine]:
    """Runs the requests, request i submitted before tick joins[i]."""
    engine = Engine(pipe, max_batch=16, tick_graphs=mode)
    ids: list[int | None] = [None] * len(requests)
    tick = 0
    while tick < 200 and (not engine.idle or any(i is None for i in ids)):
        for k, req in enumerate(requests):
            if ids[k] is None and joins[k] <= tick:
                ids[k] = engine.submit(req)
        engine.tick()
        tick += 1
    return [engine.result(i) for i in ids], engine


@pytest.mark.parametrize("guided", [False, True])
def test_the_static_tick_equals_the_eager_tick(guided):
    """Rows joining and leaving at every tick (row counts between buckets, so padding rows run), history samplers,
    noise, guidance: the static buffers give the eager tick's samples bitwise (the mixture is batch-invariant)."""
    pipe = mixture_pipeline()
    requests = _requests(10, guided, seed=3)
    rng = random.Random(5)
    joins = [rng.randrange(12) for _ in requests]
    eager, e_engine = _serve(pipe, requests, "off", joins)
    static, s_engine = _serve(pipe, requests, "static", joins)
    assert e_engine.static_ticks == 0 and s_engine.static_ticks == s_engine.ticks > 0
    assert len({key[0] for key in s_engine._statics}) >= 3  # several buckets, most with padding rows
    for a, b in zip(eager, static):
        assert torch.equal(a, b)


def test_ticks_the_static_buffers_cannot_hold_run_eagerly():
    """Guided and unguided rows together (one call each), or a NaN row: eager ticks, the same results."""
    pipe = mixture_pipeline()
    requests = _requests(4, False, seed=1) + _requests(4, True, seed=2)
    joins = [0] * len(requests)
    eager, _ = _serve(pipe, requests, "off", joins)
    static, engine = _serve(pipe, requests, "static", joins)
    assert engine.static_ticks < engine.ticks
    for a, b in zip(eager, static):
        assert torch.equal(a, b)


def test_a_nan_row_fails_its_request_on_the_static_path():
    pipe = mixture_pipeline()
    engine = Engine(pipe, max_batch=8, tick_graphs="static")
    bad = engine.submit(
        SampleRequest(n=2, sample_shape=(2,), steps=4, seed=1, model_kwargs={"y": torch.tensor([0, 99])})
    )
    good = engine.submit(SampleRequest(n=1, sample_shape=(2,), steps=4, seed=2, model_kwargs={"y": torch.tensor([1])}))
    engine.run()
    with pytest.raises(Exception, match="NaN/Inf at stage 0"):
        engine.result(bad)
    assert torch.isfinite(engine.result(good)).all() and engine.static_ticks == engine.ticks


def test_tick_graph_mode_is_checked():
    with pytest.raises(ValueError, match="tick_graphs"):
        Engine(mixture_pipeline(), tick_graphs=True)


@pytest.mark.cuda
def test_cuda_tick_graphs_equal_eager_ticks_and_make_no_host_sync():
    """On CUDA: ticks captured per bucket and replayed equal the eager ticks; a tick in which no row ends makes no
    synchronizing call (torch's sync debug mode raises on one)."""
    from fastdiff import Pipeline, Schedule
    from fastdiff.demos.mixture import default_mixture

    schedule = Schedule.vp_discrete()
    model = default_mixture().as_model(schedule, "eps")
    pipe = Pipeline(lambda x, t, y: model(x, t) + 0.05 * y.to(x.dtype)[:, None], schedule, device="cuda")
    requests = [
        SampleRequest(
            n=2, sample_shape=(2,), sampler=s, steps=6, seed=i, options=o, model_kwargs={"y": torch.tensor([i % 3, 1])}
        )
        for i, (s, o) in enumerate(SAMPLERS)
    ]
    joins = [0] * len(requests)
    eager, _ = _serve(pipe, requests, "off", joins)
    graphed, engine = _serve(pipe, requests, "auto", joins)
    assert engine.static_ticks > 0
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    engine = Engine(pipe, max_batch=16)
    for req in requests:
        engine.submit(SampleRequest(**{**req.__dict__, "steps": 20}))
    engine.tick()  # admission, capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            engine.tick()
    finally:
        torch.cuda.set_sync_debug_mode("default")
