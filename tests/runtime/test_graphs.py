"""The CUDA-graph runner: cache keys, LRU eviction, static buffers and argument checks on the CPU; capture,
replay, cache hits and the absence of host syncs on CUDA (skipped without CUDA)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch

import fastdiff.pipeline as pipeline_mod
import fastdiff.runtime.graphs as graphs_mod
import fastdiff.runtime.loop as loop_mod
from fastdiff import Pipeline, Schedule
from fastdiff.bench.throughput import TimeMLP
from fastdiff.runtime.graphs import (
    CapturedLoop,
    GraphCache,
    StaticBuffers,
    capture,
    graph_key,
    kwargs_spec,
    resolve_cuda_graph,
)
from fastdiff.runtime.guidance import make_guidance
from fastdiff.runtime.tree import to_device
from fastdiff.runtime.x0_clip import X0Clip

CUDA = torch.cuda.is_available()


MODEL, SCHEDULE = TimeMLP(2, hidden=4), Schedule.vp_discrete()


def _key(**over):
    base = dict(
        model=MODEL,
        schedule=SCHEDULE,
        prediction="eps",
        shape=(4, 2),
        dtype=torch.float32,
        device=torch.device("cuda"),
        sampler="ddim",
        steps=10,
        options={"eta": 0.5},
        guidance=None,
        model_kwargs=(),
        uncond_kwargs=None,
        return_x0=False,
        return_trajectory=False,
    )
    base.update(over)
    return graph_key(**base)


# ---------------------------------------------------------------- keys
def test_graph_key_changes_with_everything_the_graph_depends_on():
    base = _key()
    assert base == _key() and hash(base) == hash(_key())
    variants = [
        _key(shape=(8, 2)),
        _key(dtype=torch.float16),
        _key(sampler="ddpm"),
        _key(steps=11),
        _key(options={"eta": 0.25}),
        _key(options={"eta": 0.5, "spacing": "trailing"}),
        _key(guidance=(3.0, 0.0, "double")),
        _key(guidance=(3.0, 0.0, "separate")),
        _key(model_kwargs=kwargs_spec({"y": torch.zeros(4, dtype=torch.long)})[0]),
        _key(uncond_kwargs=()),
        _key(return_x0=True),
        _key(return_trajectory=True),
        _key(device=torch.device("cuda", 1)),
        _key(model=TimeMLP(2, hidden=4)),  # a new network: a replay would run the old weights
        _key(schedule=Schedule.vp_discrete()),  # a new schedule: the old coefficients
        _key(prediction="v"),
    ]
    keys = {base, *variants}
    assert len(keys) == len(variants) + 1


def test_kwargs_spec_describes_tensors_by_shape_and_values_by_value():
    a, bad = kwargs_spec({"y": torch.zeros(4, dtype=torch.long), "scale": 2.0})
    b, _ = kwargs_spec({"scale": 2.0, "y": torch.ones(4, dtype=torch.long)})  # other values, same spec
    assert a == b and bad == ()
    y4 = kwargs_spec({"y": torch.zeros(4, dtype=torch.long)})[0]
    assert kwargs_spec({"y": torch.zeros(5, dtype=torch.long)})[0] != y4
    assert kwargs_spec({"y": torch.zeros(4, dtype=torch.int32)})[0] != y4
    assert kwargs_spec({"scale": 2.0})[0] != kwargs_spec({"scale": 3.0})[0]
    assert kwargs_spec({"opts": {1, 2}})[1] == ("opts",)  # unhashable: cannot key a graph


def test_kwargs_spec_describes_containers_of_tensors_by_structure():
    def spec(**kw):
        return kwargs_spec(kw)

    ctx = spec(ctx=[torch.zeros(4, 3), {"mask": torch.ones(4, dtype=torch.bool)}], pair=(torch.zeros(4), 2))
    # new tensors of the same shapes: the same key (before: hashed by identity, a new graph every call)
    assert ctx == spec(ctx=[torch.ones(4, 3), {"mask": torch.zeros(4, dtype=torch.bool)}], pair=(torch.ones(4), 2))
    assert ctx[1] == () and hash(ctx) == hash(
        spec(ctx=[torch.ones(4, 3), {"mask": torch.ones(4, dtype=torch.bool)}], pair=(torch.ones(4), 2))
    )
    assert ctx != spec(ctx=[torch.zeros(4, 5), {"mask": torch.ones(4, dtype=torch.bool)}], pair=(torch.zeros(4), 2))
    assert ctx != spec(ctx=(torch.zeros(4, 3), {"mask": torch.ones(4, dtype=torch.bool)}), pair=(torch.zeros(4), 2))
    assert ctx != spec(ctx=[torch.zeros(4, 3), {"other": torch.ones(4, dtype=torch.bool)}], pair=(torch.zeros(4), 2))
    assert ctx != spec(ctx=[torch.zeros(4, 3), {"mask": torch.ones(4, dtype=torch.bool)}], pair=(torch.zeros(4), 3))
    assert spec(opts=[1, 2])[1] == ()  # a list of plain values is described too
    assert spec(opts=[1, {2}])[1] == ("opts",)


def test_graph_key_holds_the_model_by_identity():
    class ValueEqual(torch.nn.Module):  # equal to every other instance, and unhashable
        __eq__ = lambda self, other: True  # noqa: E731
        __hash__ = None

    a, b = ValueEqual(), ValueEqual()
    assert _key(model=a) == _key(model=a) and _key(model=a) != _key(model=b)
    assert _key(model=MODEL.forward) == _key(model=MODEL.forward)  # a bound method: its instance and function


# ---------------------------------------------------------------- LRU
def test_graph_cache_lru_eviction_and_counters():
    cache = GraphCache(maxsize=2)
    made = []
    for k in ("a", "b"):
        cache.get_or_create(k, lambda k=k: made.append(k) or k.upper())
    assert cache.get("a") == "A"  # "a" is now most recently used
    cache.put("c", "C")  # evicts "b", the least recently used
    assert cache.keys() == ("a", "c") and "b" not in cache
    assert cache.evictions == 1 and cache.hits == 1 and cache.misses == 2
    assert cache.get_or_create("b", lambda: "B2") == "B2" and cache.keys() == ("c", "b")
    assert made == ["a", "b"] and cache.misses == 3 and cache.evictions == 2
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_graph_cache_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="maxsize"):
        GraphCache(maxsize=bad)


# ---------------------------------------------------------------- static buffers
def test_static_buffers_copy_without_aliasing_and_validate():
    x = torch.arange(6.0).reshape(3, 2)
    buf = StaticBuffers({"x": x, "seeds": torch.tensor([1, 2, 3])})
    assert buf["x"].data_ptr() != x.data_ptr() and torch.equal(buf["x"], x)
    ptr = buf["x"].data_ptr()
    new = torch.full((3, 2), 7.0)
    buf.copy_in({"x": new, "seeds": torch.tensor([4, 5, 6])})
    assert buf["x"].data_ptr() == ptr and torch.equal(buf["x"], new)  # same storage, new values
    assert buf.nbytes() == 6 * 4 + 3 * 8
    with pytest.raises(ValueError, match="built for"):
        buf.copy_in({"x": torch.zeros(4, 2), "seeds": torch.tensor([4, 5, 6])})
    with pytest.raises(ValueError, match="built for"):
        buf.copy_in({"x": torch.zeros(3, 2, dtype=torch.float16), "seeds": torch.tensor([4, 5, 6])})
    with pytest.raises(ValueError, match="missing"):
        buf.copy_in({"x": new})
    with pytest.raises(TypeError):
        StaticBuffers({"x": [1.0]})


# ---------------------------------------------------------------- when a graph applies
def test_resolve_cuda_graph_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graph("auto", cuda) is True
    assert resolve_cuda_graph(False, cuda) is False
    for kwargs in (
        {},
        {"adaptive": True},
        {"explicit_noise": True},
        {"callback": True},
        {"unhashable_kwargs": ("opts",)},
    ):
        dev = cpu if not kwargs else cuda
        assert resolve_cuda_graph("auto", dev, **kwargs) is False  # silent fallback
        with pytest.raises(ValueError, match="cuda_graph=True cannot apply"):
            resolve_cuda_graph(True, dev, **kwargs)
    for bad in ("yes", 1, None, "graph"):
        with pytest.raises(ValueError, match="cuda_graph must be"):
            resolve_cuda_graph(bad, cuda)


@pytest.fixture(scope="module")
def mlp_pipe():
    sched = Schedule.vp_discrete()
    return Pipeline(TimeMLP(8, hidden=16), sched, prediction="eps", device="cpu")


def test_sample_cuda_graph_true_on_cpu_is_a_clear_error(mlp_pipe):
    with pytest.raises(ValueError, match="not CUDA"):
        mlp_pipe.sample((2, 8), steps=3, progress=False, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        mlp_pipe.sample((2, 8), steps=3, progress=False, cuda_graph="always")
    auto = mlp_pipe.sample((2, 8), steps=3, progress=False, cuda_graph="auto")
    eager = mlp_pipe.sample((2, 8), steps=3, progress=False, cuda_graph=False)
    assert torch.equal(auto, eager) and len(mlp_pipe.graphs) == 0


def _fake_capture(loop, inputs, warmup=1, keep_alive=(), pool=None):
    """Stands in for CUDA capture on the CPU: 'replay' re-runs the loop on the static inputs and copies
    into the outputs of the first run, so the Pipeline's buffer plumbing is exercised exactly as with a
    real graph (a replay that missed the new inputs would return the old results)."""
    outputs = loop(inputs)

    class Graph:
        def replay(self):
            for dst, src in zip(outputs, loop(inputs)):
                if dst is not None:
                    dst.copy_(src)

    return CapturedLoop(graph=Graph(), inputs=inputs, outputs=tuple(outputs), keep_alive=keep_alive)


def test_graph_path_buffer_management_on_cpu(monkeypatch, mlp_pipe):
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu", max_graphs=2)
    y = torch.tensor([0, 1, 2, 3])
    model = pipe.model

    def cond_model(x, t, y=None):
        return model(x, t) + 0.1 * y[:, None].to(x.dtype)

    pipe.model = cond_model
    kw = dict(steps=4, sampler="ddim", eta=0.7, progress=False)
    for seed in (0, 1, 2):  # one capture, then replays with new seeds and new conditioning
        cond = {"y": (y + seed) % 3}
        g, g_x0, g_tr = pipe.sample(
            (4, 8), seed=seed, model_kwargs=cond, cuda_graph=True, return_x0=True, return_trajectory=True, **kw
        )
        e, e_x0, e_tr = pipe.sample(
            (4, 8), seed=seed, model_kwargs=cond, cuda_graph=False, return_x0=True, return_trajectory=True, **kw
        )
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        torch.testing.assert_close(g_x0, e_x0, rtol=0, atol=0)
        torch.testing.assert_close(g_tr, e_tr, rtol=0, atol=0)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 2 and len(pipe.graphs) == 1
    # an explicit x_T is copied in too
    x_T = torch.randn(4, 8)
    a = pipe.sample(
        (4, 8), x_T=x_T, model_kwargs={"y": y}, cuda_graph=True, return_x0=True, return_trajectory=True, **kw
    )
    assert torch.equal(a[2][0], x_T)
    # returned tensors are fresh: a later replay does not overwrite them
    first = pipe.sample((4, 8), seed=5, model_kwargs={"y": y}, cuda_graph=True, **dict(kw))
    kept = first.clone()
    pipe.sample((4, 8), seed=6, model_kwargs={"y": y}, cuda_graph=True, **kw)
    assert torch.equal(first, kept)
    # new keys evict the least recently used graph (max_graphs=2)
    pipe.sample((4, 8), seed=0, model_kwargs={"y": y}, cuda_graph=True, **kw)
    pipe.sample((2, 8), seed=0, model_kwargs={"y": y[:2]}, cuda_graph=True, **kw)
    assert len(pipe.graphs) == 2 and pipe.graphs.evictions == 1
    pipe.clear_graphs()
    assert len(pipe.graphs) == 0


def test_one_graph_serves_every_guidance_scale_and_rescale(monkeypatch, mlp_pipe):
    """The guidance scale is a static buffer (one weight per row), not part of the key: scales 2, 7.5 and 1 (guidance
    still on through uncond_kwargs) replay one graph and each equals the eager run bit for bit, with and without
    guidance_rescale (formed before the op from the buffer) and both batchings."""
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    model = mlp_pipe.model

    def cond_model(x, t, y=None):
        return model(x, t) + 0.3 * y[:, None].to(x.dtype)

    pipe = Pipeline(cond_model, mlp_pipe.schedule, prediction="eps", device="cpu")
    y, null = torch.tensor([0, 1, 2, 1]), torch.zeros(4, dtype=torch.long)
    for rescale, batching in ((0.0, "double"), (0.7, "separate")):
        pipe.clear_graphs()
        pipe.graphs.misses = pipe.graphs.hits = 0
        for scale in (2.0, 7.5, 1.0):
            kw = dict(steps=4, sampler="dpmpp_2m", seed=3, progress=False, model_kwargs={"y": y},
                      uncond_kwargs={"y": null}, guidance_scale=scale, guidance_rescale=rescale,
                      guidance_batching=batching)  # fmt: skip
            g = pipe.sample((4, 8), cuda_graph=True, **kw)
            torch.testing.assert_close(g, pipe.sample((4, 8), cuda_graph=False, **kw), rtol=0, atol=0)
        assert pipe.graphs.misses == 1 and pipe.graphs.hits == 2 and len(pipe.graphs) == 1
    assert make_guidance(2.0, 0.0, "double", None).key() == make_guidance(7.5, 0.0, "double", None).key()


def test_guided_graph_with_dynamic_thresholding_equals_eager(monkeypatch, mlp_pipe):
    """Dynamic thresholding forms the guided output itself from the per-row weight buffer of a captured loop: each
    sample's own weight, broadcast over the sample (a [B] weight against [B, 4, 4] outputs would not broadcast)."""
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    model = mlp_pipe.model

    def cond_model(x, t, y=None):
        return model(x, t) + 0.3 * y[:, None].to(x.dtype)

    clip = X0Clip(threshold_ratio=0.9, sample_max_value=1.5)
    pipe = Pipeline(cond_model, mlp_pipe.schedule, prediction="eps", device="cpu", x0_clip=clip)
    y, null = torch.tensor([0, 1, 2, 1]), torch.zeros(4, dtype=torch.long)
    for scale in (3.0, 6.0):
        kw = dict(steps=4, sampler="ddim", seed=2, progress=False, model_kwargs={"y": y}, uncond_kwargs={"y": null},
                  guidance_scale=scale)  # fmt: skip
        g = pipe.sample((4, 8), cuda_graph=True, **kw)
        torch.testing.assert_close(g, pipe.sample((4, 8), cuda_graph=False, **kw), rtol=0, atol=0)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 1


def test_graphs_of_one_cache_share_one_memory_pool(monkeypatch, mlp_pipe):
    """Every capture of a pipeline's graph cache is given the cache's one pool (made once), not a pool of its own."""
    pools, made = [], []
    monkeypatch.setattr(graphs_mod, "new_graph_pool", lambda: made.append(object()) or made[-1])

    def recording_capture(loop, inputs, warmup=1, keep_alive=(), pool=None):
        pools.append(pool)
        return _fake_capture(loop, inputs, warmup, keep_alive)

    monkeypatch.setattr(loop_mod, "capture", recording_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    for shape in ((4, 8), (2, 8), (3, 8)):
        pipe.sample(shape, steps=3, seed=0, cuda_graph=True, progress=False)
    assert len(made) == 1 and pools == [made[0]] * 3


def test_graph_path_with_image_editing_on_cpu(monkeypatch, mlp_pipe):
    """Image-to-image and inpainting through the graph path (a fake capture that re-runs the loop on replay): init and
    mask are static buffers a replay refreshes, and strength and the mask's presence are in the key."""
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    gen = torch.Generator().manual_seed(0)
    kw = dict(steps=6, sampler="ddpm", progress=False, return_trajectory=True)
    for seed in (0, 1, 2):  # new init, mask and seed each call: one capture per edit kind, then replays
        init = torch.randn(4, 8, generator=gen)
        mask = (torch.rand(4, 8, generator=gen) > 0.5).float()
        for edit in (
            dict(init=init, strength=0.5),
            dict(init=init, strength=0.5, mask=mask),
            dict(init=init, mask=mask),
        ):
            g = pipe.sample((4, 8), seed=seed, cuda_graph=True, **edit, **kw)
            e = pipe.sample((4, 8), seed=seed, cuda_graph=False, **edit, **kw)
            for a, b in zip(g, e):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            if "mask" in edit:
                keep = mask == 0
                assert torch.equal(g[0][keep], init[keep])
    assert pipe.graphs.misses == 3 and pipe.graphs.hits == 6


def test_model_kwargs_batch_validation(mlp_pipe):
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has batch size 3, expected 2"):
        mlp_pipe.sample((2, 8), steps=2, progress=False, model_kwargs={"y": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"uncond_kwargs\['y'\] has batch size 5, expected 2"):
        mlp_pipe.sample(
            (2, 8),
            steps=2,
            progress=False,
            guidance_scale=2.0,
            model_kwargs={"y": torch.zeros(2)},
            uncond_kwargs={"y": torch.zeros(5)},
        )


# ---------------------------------------------------------------- CUDA only: the shipped digits U-Net
SHAPE = (8, 1, 8, 8)


def _cuda_pipe(dtype=torch.float32):
    from fastdiff.pretrained import digits

    return digits(device="cuda", dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("sampler,opts", [("ddim", {}), ("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_cuda_graph_replay_equals_eager(sampler, opts):
    pipe = _cuda_pipe()
    shape = SHAPE
    for seed in (0, 1):
        g = pipe.sample(shape, sampler=sampler, steps=12, seed=seed, progress=False, cuda_graph=True, **opts)
        e = pipe.sample(shape, sampler=sampler, steps=12, seed=seed, progress=False, cuda_graph=False, **opts)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 1
    other = pipe.sample(shape, sampler=sampler, steps=12, seed=2, progress=False, cuda_graph=True, **opts)
    assert not torch.allclose(other, g)  # new seeds really reach the graph


@pytest.mark.cuda
def test_cuda_graph_guidance_trajectory_and_conditioning_equal_eager():
    pipe = _cuda_pipe()
    y = torch.arange(6, device="cuda")
    kw = dict(
        steps=10,
        sampler="ddim",
        progress=False,
        guidance_scale=4.0,
        model_kwargs={"y": y},
        uncond_kwargs={"y": torch.full_like(y, pipe.num_classes)},
        return_x0=True,
        return_trajectory=True,
    )
    for batching in ("double", "separate"):
        g = pipe.sample((6, 1, 8, 8), cuda_graph=True, guidance_batching=batching, **kw)
        e = pipe.sample((6, 1, 8, 8), cuda_graph=False, guidance_batching=batching, **kw)
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kw["model_kwargs"] = {"y": y.flip(0)}
    g = pipe.sample((6, 1, 8, 8), cuda_graph=True, **kw)
    e = pipe.sample((6, 1, 8, 8), cuda_graph=False, **kw)
    torch.testing.assert_close(g[0], e[0], rtol=1e-5, atol=1e-5)
    assert pipe.graphs.hits >= 1


@pytest.mark.cuda
def test_cuda_graph_serves_every_guidance_scale_from_one_capture():
    pipe = _cuda_pipe()
    y = torch.arange(6, device="cuda")
    kw = dict(steps=8, sampler="dpmpp_2m", progress=False, seed=1, model_kwargs={"y": y},
              uncond_kwargs={"y": torch.full_like(y, pipe.num_classes)})  # fmt: skip
    for scale in (2.0, 7.5, 1.0):
        g = pipe.sample((6, 1, 8, 8), cuda_graph=True, guidance_scale=scale, **kw)
        e = pipe.sample((6, 1, 8, 8), cuda_graph=False, guidance_scale=scale, **kw)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 2


@pytest.mark.cuda
def test_cuda_graph_inpainting_equals_eager():
    pipe = _cuda_pipe()
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 8, 8, device="cuda")
    mask[..., 4:, :] = 1.0
    for seed in (0, 1):
        init = torch.randn(SHAPE, generator=gen).cuda()
        kw = dict(sampler="ddpm", steps=12, seed=seed, progress=False, init=init, mask=mask, strength=0.8)
        g = pipe.sample(SHAPE, cuda_graph=True, **kw)
        e = pipe.sample(SHAPE, cuda_graph=False, **kw)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert torch.equal(g[..., :4, :], init[..., :4, :])
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 1


@pytest.mark.cuda
def test_cuda_graph_replay_makes_no_host_sync():
    pipe = _cuda_pipe()
    pipe.sample(SHAPE, sampler="ddpm", steps=8, progress=False, cuda_graph=True)
    (entry,) = [pipe.graphs.get(k) for k in pipe.graphs.keys()]
    values = {"x": pipe.initial_noise(SHAPE, seed=3), "seeds": entry.inputs["seeds"].clone() + 1}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        entry.replay(values)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_true_rejects_callback_and_noise_list():
    pipe = _cuda_pipe()
    with pytest.raises(ValueError, match="callback"):
        pipe.sample((2, 1, 8, 8), steps=3, progress=False, cuda_graph=True, callback=lambda *a: None)
    noise = [torch.randn(2, 1, 8, 8, device="cuda") for _ in range(3)]
    with pytest.raises(ValueError, match="noise"):
        pipe.sample((2, 1, 8, 8), sampler="ddpm", steps=3, progress=False, cuda_graph=True, noise=noise)
    # "auto" falls back to the eager loop and still runs the callback
    seen = []
    pipe.sample((2, 1, 8, 8), steps=3, progress=False, cuda_graph="auto", callback=lambda s, x, x0: seen.append(s))
    assert seen == [0, 1, 2]


# ---------------------------------------------------------------- auto fallback, callbacks, trajectories
def test_auto_falls_back_when_capture_fails(monkeypatch, mlp_pipe):
    calls = []

    def failing_capture(*a, **k):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(loop_mod, "capture", failing_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is not False)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    eager = pipe.sample((2, 8), steps=3, progress=False, cuda_graph=False)
    for _ in range(2):
        torch.testing.assert_close(pipe.sample((2, 8), steps=3, progress=False, cuda_graph="auto"), eager)
    assert len(calls) == 1  # the failure is remembered for the key
    with pytest.raises(ValueError, match="could not be captured"):
        pipe.sample((2, 8), steps=3, progress=False, cuda_graph=True)
    with pytest.raises(RuntimeError, match="capturing"):
        pipe.sample((3, 8), steps=3, progress=False, cuda_graph=True)


def test_callback_and_trajectory_follow_ddim_by_hand():
    """With eps = c constant, DDIM is x0 = (x - sigma c) / alpha, x_next = alpha' x0 + sigma' c: computed here
    independently from the schedule's grid and compared with the callback's and the trajectory's tensors."""
    sched = Schedule.vp_discrete()
    c = torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=torch.float64)
    pipe = Pipeline(lambda x, t: c.to(x.dtype), sched, prediction="eps", device="cpu")
    steps = 7
    seen = []
    out, x0s, traj = pipe.sample(
        (2, 2),
        steps=steps,
        seed=4,
        progress=False,
        return_x0=True,
        return_trajectory=True,
        callback=lambda s, x, x0: seen.append((s, x.clone(), x0.clone())),
        callback_steps=3,
    )
    grid = sched.grid(steps)
    x = pipe.initial_noise((2, 2), seed=4).double()
    assert traj.shape == (steps + 1, 2, 2) and torch.equal(traj[0], x.float()) and torch.equal(traj[-1], out)
    for s in range(steps):
        x0 = (x - grid.sigma[s] * c) / grid.alpha[s]
        x = grid.alpha[s + 1] * x0 + grid.sigma[s + 1] * c
        torch.testing.assert_close(x0s[s].double(), x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traj[s + 1].double(), x, rtol=1e-5, atol=1e-5)
    assert [s for s, _, _ in seen] == [0, 3, 6]
    for s, xs, x0 in seen:
        assert torch.equal(xs, traj[s + 1]) and torch.equal(x0, x0s[s])
    with pytest.raises(ValueError, match="callback_steps"):
        pipe.sample((2, 2), steps=2, progress=False, callback=lambda *a: None, callback_steps=0)
    with pytest.raises(TypeError, match="callback must be callable"):
        pipe.sample((2, 2), steps=2, progress=False, callback=3)


def test_cached_graph_serves_inference_mode_and_grad_mode_callers(monkeypatch, mlp_pipe):
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    with torch.inference_mode():
        a = pipe.sample((2, 8), steps=3, seed=1, progress=False, cuda_graph=True)
    b = pipe.sample((2, 8), steps=3, seed=2, progress=False, cuda_graph=True)  # same graph, outside the mode
    assert pipe.graphs.hits == 1 and not b.requires_grad
    torch.testing.assert_close(b, pipe.sample((2, 8), steps=3, seed=2, progress=False, cuda_graph=False).detach())
    assert not torch.equal(a, b)


def test_non_program_samplers_refuse_cuda_graph_true(mlp_pipe):
    from fastdiff.samplers import SAMPLERS

    if "rk45" not in SAMPLERS:
        pytest.skip("rk45 is not registered")
    with pytest.raises(ValueError, match="not one fixed coefficient program"):
        mlp_pipe.sample((2, 8), sampler="rk45", progress=False, cuda_graph=True)


# ---------------------------------------------------------------- conditioning on the pipeline's device
def test_to_device_moves_every_tensor_in_kwargs():
    y, ctx = torch.zeros(4, dtype=torch.long), torch.ones(4, 3)
    moved = to_device({"y": y, "ctx": [ctx, {"m": ctx}], "pair": (ctx, 2), "scale": 2.0}, torch.device("meta"))
    assert moved["y"].device.type == "meta" and moved["y"].dtype == torch.long
    assert moved["ctx"][0].is_meta and moved["ctx"][1]["m"].is_meta and moved["pair"][0].is_meta
    assert moved["pair"][1] == 2 and moved["scale"] == 2.0 and isinstance(moved["pair"], tuple)
    same = to_device({"y": y}, torch.device("cpu"))
    assert same["y"] is y  # already there: no copy


def test_sample_hands_the_network_its_kwargs_on_the_pipeline_device(monkeypatch, mlp_pipe):
    """The move happens before the loop, for the eager and the graph path: the spy sees every kwargs dict go
    through ``to_device(..., pipe.device)`` and the network only the moved tensors."""
    moved_to, seen = [], []
    real = pipeline_mod.to_device

    def spy(value, device):
        moved_to.append(torch.device(device))
        return real(value, device)

    monkeypatch.setattr(pipeline_mod, "to_device", spy)
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    model = mlp_pipe.model

    def cond_model(x, t, y=None):
        seen.append(y.device)
        return model(x, t) + 0.1 * y[:, None].to(x.dtype)

    pipe = Pipeline(cond_model, mlp_pipe.schedule, prediction="eps", device="cpu")
    y = torch.tensor([0, 1])
    for graph in (False, True):
        pipe.sample((2, 8), steps=2, progress=False, model_kwargs={"y": y}, uncond_kwargs={"y": y},
                    guidance_scale=2.0, cuda_graph=graph)  # fmt: skip
    assert moved_to == [pipe.device] * 4 and set(seen) == {pipe.device}


# ---------------------------------------------------------------- x0 limits: constants made before the loop
def test_x0_clip_bounds_are_one_preallocated_tensor():
    bounds = X0Clip(clip_range=1.5).bounds(3, torch.device("cpu"))
    a, b = bounds(None, None, None, 1.0, None), bounds(None, None, None, 2.0, None)
    assert a is b and torch.equal(a, torch.tensor([[1.5, 1.0]] * 3))


def _capture_without_host_data(loop, inputs, warmup=1, keep_alive=(), pool=None):
    """:func:`_fake_capture` where the captured run may not make tensors from host data (illegal in a CUDA capture:
    a copy from pageable memory) nor build x0 bounds (they must be made before the loop)."""

    def refuse(*a, **k):
        raise AssertionError("a tensor made from host data inside the captured loop")

    loop(inputs)  # the warm-up, outside the capture
    with (
        mock.patch.object(torch, "tensor", refuse),
        mock.patch.object(torch, "as_tensor", refuse),
        mock.patch.object(X0Clip, "bounds", refuse),
    ):
        return _fake_capture(loop, inputs, warmup, keep_alive)


@pytest.mark.parametrize("clip", [X0Clip(clip_range=1.0), X0Clip(threshold_ratio=0.9, sample_max_value=2.0)])
def test_x0_clip_bounds_are_made_before_the_captured_loop(monkeypatch, mlp_pipe, clip):
    monkeypatch.setattr(loop_mod, "capture", _capture_without_host_data)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    calls = []
    real = X0Clip.bounds
    monkeypatch.setattr(X0Clip, "bounds", lambda self, *a: calls.append(a) or real(self, *a))
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu", x0_clip=clip)
    for seed in (0, 1):
        g = pipe.sample((2, 8), steps=4, seed=seed, progress=False, cuda_graph=True)
        torch.testing.assert_close(g, pipe.sample((2, 8), steps=4, seed=seed, progress=False, cuda_graph=False))
    assert len(calls) == 3  # once for the capture, once per eager run: never per stage
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 1


# ---------------------------------------------------------------- a failed capture restores the stream
class _FakeCuda:
    """torch.cuda's streams and graphs as far as :func:`capture` uses them: a current stream that
    ``torch.cuda.stream`` switches and restores, and graphs that record their capture calls."""

    def __init__(self, fail_end: bool = False):
        self.default = self.Stream()
        self.current = self.default
        self.fail_end = fail_end
        self.graphs = []

    class Stream:
        def wait_stream(self, other):
            pass

    def install(self, monkeypatch):
        fake = self

        class Graph:
            def __init__(self):
                self.calls = []
                fake.graphs.append(self)

            def capture_begin(self, pool=None, capture_error_mode="global"):
                self.calls.append(("begin", capture_error_mode, fake.current))

            def capture_end(self):
                self.calls.append(("end", fake.current))
                if fake.fail_end:
                    raise RuntimeError("operation failed due to a previous error during capture")

        @contextlib.contextmanager
        def stream(s):
            prev, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = prev

        for name, value in dict(
            is_available=lambda: True,
            Stream=self.Stream,
            current_stream=lambda: fake.current,
            stream=stream,
            CUDAGraph=Graph,
            synchronize=lambda: None,
            empty_cache=lambda: None,
        ).items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("failure", ["none", "loop", "capture_end"])
def test_capture_restores_the_callers_stream(monkeypatch, failure):
    fake = _FakeCuda(fail_end=failure == "capture_end")
    fake.install(monkeypatch)
    runs = []

    def loop(buf):
        runs.append(fake.current)
        if failure == "loop" and len(runs) == 2:  # the warm-up passes, the captured run syncs with the host
            raise RuntimeError("operation not permitted when stream is capturing")
        return (buf["x"] * 2,)

    inputs = StaticBuffers({"x": torch.ones(2)})
    if failure == "none":
        captured = capture(loop, inputs)
        assert torch.equal(captured.outputs[0], torch.full((2,), 2.0))
    else:
        with pytest.raises(RuntimeError, match="capturing" if failure == "loop" else "previous error"):
            capture(loop, inputs)
    assert fake.current is fake.default  # the caller is back on its stream: "auto" then runs eagerly there
    (graph,) = fake.graphs
    side = runs[1]
    assert side is not fake.default
    assert graph.calls == [("begin", "thread_local", side), ("end", side)]  # ended on the stream it began on


# ---------------------------------------------------------------- stale graphs: model, schedule, containers
def test_new_model_or_schedule_is_a_new_graph(monkeypatch, mlp_pipe):
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    kw = dict(steps=3, seed=1, progress=False)
    first = pipe.sample((2, 8), cuda_graph=True, **kw)
    pipe.model = TimeMLP(8, hidden=12)  # other weights
    for misses in (2, 3):
        g = pipe.sample((2, 8), cuda_graph=True, **kw)
        torch.testing.assert_close(g, pipe.sample((2, 8), cuda_graph=False, **kw), rtol=0, atol=0)
        assert not torch.equal(g, first) and pipe.graphs.misses == misses
        pipe.schedule = Schedule.vp_discrete(beta_end=0.012)
    assert pipe.graphs.hits == 0


def test_containers_of_tensors_go_through_static_buffers(monkeypatch, mlp_pipe):
    monkeypatch.setattr(loop_mod, "capture", _fake_capture)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    model = mlp_pipe.model

    def ctx_model(x, t, ctx=None):
        return model(x, t) + ctx[0] * ctx[1]["w"][:, None]

    pipe = Pipeline(ctx_model, mlp_pipe.schedule, prediction="eps", device="cpu")
    for i in range(3):
        ctx = [torch.full((2, 8), 0.1 * i), {"w": torch.tensor([1.0, -1.0]) * i}]
        kw = dict(steps=3, seed=i, progress=False, model_kwargs={"ctx": ctx})
        g = pipe.sample((2, 8), cuda_graph=True, **kw)
        torch.testing.assert_close(g, pipe.sample((2, 8), cuda_graph=False, **kw), rtol=0, atol=0)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 2  # new tensors, same structure: one graph


# ---------------------------------------------------------------- threads share a pipeline
def test_threads_share_a_pipeline_graph_without_overlapping_replays(monkeypatch, mlp_pipe):
    active, overlaps = [0], []

    def capture_tracking_overlap(loop, inputs, warmup=1, keep_alive=(), pool=None):
        captured = _fake_capture(loop, inputs, warmup, keep_alive)
        replay = captured.graph.replay

        def guarded():
            active[0] += 1
            overlaps.append(active[0] > 1)
            time.sleep(0.005)  # a window for another thread's copy-in or replay
            replay()
            active[0] -= 1

        captured.graph.replay = guarded
        return captured

    monkeypatch.setattr(loop_mod, "capture", capture_tracking_overlap)
    monkeypatch.setattr(pipeline_mod, "resolve_cuda_graph", lambda mode, *a, **k: mode is True)
    pipe = Pipeline(mlp_pipe.model, mlp_pipe.schedule, prediction="eps", device="cpu")
    seeds = list(range(8))
    expected = {s: pipe.sample((2, 8), steps=3, seed=s, progress=False, cuda_graph=False) for s in seeds}
    start = threading.Barrier(4)

    def worker(ss):
        start.wait()
        return [(s, pipe.sample((2, 8), steps=3, seed=s, progress=False, cuda_graph=True)) for s in ss]

    with ThreadPoolExecutor(4) as pool:
        results = [r for f in [pool.submit(worker, seeds[i::4]) for i in range(4)] for r in f.result()]
    for s, out in results:
        torch.testing.assert_close(out, expected[s], rtol=0, atol=0)
    assert pipe.graphs.misses == 1 and pipe.graphs.hits == 7  # captured once despite four first calls at once
    assert len(overlaps) == 8 and not any(overlaps)


# ---------------------------------------------------------------- CUDA only: the findings on a real device
@pytest.mark.cuda
def test_cuda_graph_takes_host_labels_and_containers():
    pipe = _cuda_pipe()
    y = torch.arange(4)  # on the CPU, as the README's guided example builds them
    kw = dict(steps=6, progress=False, guidance_scale=3.0, model_kwargs={"y": y},
              uncond_kwargs={"y": torch.full_like(y, pipe.num_classes)})  # fmt: skip
    g = pipe.sample((4, 1, 8, 8), cuda_graph=True, **kw)
    torch.testing.assert_close(g, pipe.sample((4, 1, 8, 8), cuda_graph=False, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("clip", [X0Clip(clip_range=1.0), X0Clip(threshold_ratio=0.95, sample_max_value=1.5)])
def test_cuda_graph_with_x0_clip_equals_eager(clip):
    from fastdiff.pretrained import digits

    base = digits(device="cuda")
    pipe = Pipeline(base.model, base.schedule, prediction=base.prediction, device="cuda", x0_clip=clip)
    for seed in (0, 1):
        g = pipe.sample(SHAPE, steps=8, seed=seed, progress=False, cuda_graph=True)
        e = pipe.sample(SHAPE, steps=8, seed=seed, progress=False, cuda_graph=False)
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert pipe.graphs.hits == 1


@pytest.mark.cuda
def test_cuda_failed_capture_falls_back_on_the_callers_stream():
    pipe = _cuda_pipe()
    model = pipe.model

    def syncing(x, t, **kw):
        float(x.sum())  # a host sync: cannot be captured
        return model(x, t, **kw)

    pipe.model = syncing
    before = torch.cuda.current_stream()
    out = pipe.sample((2, 1, 8, 8), steps=3, progress=False, cuda_graph="auto")
    assert torch.cuda.current_stream() == before and torch.isfinite(out).all()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    from fastdiff.pretrained import digits

    torch.cuda.set_device(0)
    pipe = digits(device="cuda:1")
    g = pipe.sample(SHAPE, steps=6, progress=False, cuda_graph=True)
    e = pipe.sample(SHAPE, steps=6, progress=False, cuda_graph=False)
    assert g.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_shared_between_threads():
    pipe = _cuda_pipe()
    expected = {s: pipe.sample(SHAPE, steps=6, seed=s, progress=False, cuda_graph=False) for s in range(8)}
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda s: pipe.sample(SHAPE, steps=6, seed=s, progress=False, cuda_graph=True), range(8)))
    for s, out in enumerate(outs):
        torch.testing.assert_close(out, expected[s], rtol=1e-5, atol=1e-5)
    assert pipe.graphs.misses == 1
