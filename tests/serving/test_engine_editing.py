"""Image editing in the step-level engine: image-to-image and inpainting requests share running batches with plain
requests (a row's cut program, start state, image, mask and blend rows are per-row data) and each request's samples
equal ``Pipeline.sample`` bitwise on the exact (batch-invariant) mixture, whatever shares its batch and whenever it
joined."""

from __future__ import annotations

import random

import pytest
import torch
from serving_models import mixture_pipeline, offline

from fastdiff import Pipeline
from fastdiff.serving import Engine, SampleRequest


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return mixture_pipeline()


def _request(i: int, n: int, kind: str, sampler: str, steps: int, strength: float = 1.0, **options) -> SampleRequest:
    g = torch.Generator().manual_seed(i)
    edit = {}
    if kind != "plain":
        edit["init"] = torch.randn(n, 2, generator=g)
        edit["strength"] = strength
    if kind == "inpaint":
        edit["mask"] = torch.tensor([[1.0, 0.0]]).expand(n, 2) if i % 2 else torch.tensor([0.0, 1.0])
    return SampleRequest(
        n=n, sample_shape=(2,), sampler=sampler, steps=steps, seed=500 + i, options=options,
        model_kwargs={"y": torch.arange(n) % 3}, **edit,
    )  # fmt: skip


def test_edits_and_plain_requests_share_batches_and_equal_offline_bitwise(pipe):
    rng = random.Random(1)
    kinds = ["plain", "img2img", "inpaint"]
    samplers = [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m", {}), ("euler_ancestral", {}), ("unipc", {})]
    engine = Engine(pipe, max_batch=12)
    reqs = {}
    for i in range(18):
        sampler, opts = samplers[i % len(samplers)]
        kind = kinds[i % 3]
        strength = rng.choice([0.3, 0.6, 1.0])
        req = _request(i, rng.randint(1, 4), kind, sampler, rng.randint(4, 10), strength, **opts)
        reqs[engine.submit(req)] = req
        for _ in range(rng.randint(0, 3)):  # requests arrive while others run: batches mix the kinds
            engine.tick()
    engine.run()
    for rid, req in reqs.items():
        got, want = engine.result(rid), offline(pipe, req)
        assert torch.equal(got, want), (req.sampler, req.strength, req.mask is not None)


def test_inpainting_keeps_the_known_coordinate_and_plain_rows_are_untouched(pipe):
    """The known coordinate of an inpainting row ends at its image (DDIM to the clean end: the last blend writes
    init itself), and plain rows that ran beside inpainting rows equal their offline samples."""
    engine = Engine(pipe, max_batch=8)
    inpaint = _request(2, 3, "inpaint", "ddim", 6, 1.0)
    plain = _request(3, 3, "plain", "ddim", 6)
    a, b = engine.submit(inpaint), engine.submit(plain)
    engine.run()
    got = engine.result(a)
    torch.testing.assert_close(got[:, 0], inpaint.init[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(got[:, 1], inpaint.init[:, 1])
    assert torch.equal(engine.result(b), offline(pipe, plain))


def test_the_engine_refuses_what_it_cannot_batch(pipe):
    engine = Engine(pipe, max_batch=8)
    req = _request(0, 2, "inpaint", "ddim", 6, 0.5)
    with pytest.raises(ValueError, match="jumps"):
        engine.submit(SampleRequest(**{**req.__dict__, "jumps": 1}))
    with pytest.raises(ValueError, match="init must have the sample shape"):
        engine.submit(SampleRequest(**{**req.__dict__, "init": torch.zeros(3, 2)}))


def test_a_diffusers_pipeline_edits_on_its_schedulers_grid_asoffline():
    """A pipeline from diffusers edits on its scheduler's own grid, cut for the strength: the engine's rows equal
    ``Pipeline.sample`` of the same request and ``DiffusersPipeline.sample(init=..., mask=..., strength=...)``."""
    diffusers = pytest.importorskip("diffusers")
    import fastdiff

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()  # fmt: skip
    pipe = fastdiff.from_diffusers(unet, diffusers.DPMSolverMultistepScheduler(), device="cpu")
    g = torch.Generator().manual_seed(1)
    init = torch.randn(2, 1, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:, :] = 1.0
    reqs = [
        SampleRequest(n=2, sample_shape=(1, 8, 8), sampler="dpmpp_2m", steps=6, seed=3, init=init, strength=0.6),
        SampleRequest(
            n=2, sample_shape=(1, 8, 8), sampler="dpmpp_2m", steps=6, seed=4, init=init, mask=mask, strength=0.8
        ),  # fmt: skip
        SampleRequest(n=1, sample_shape=(1, 8, 8), sampler="dpmpp_2m", steps=5, seed=5),
    ]
    engine = Engine(pipe, max_batch=8)
    ids = [engine.submit(r) for r in reqs]
    engine.run()
    with torch.no_grad():
        for rid, req in zip(ids, reqs, strict=True):
            got = engine.result(rid)
            torch.testing.assert_close(got, Pipeline.sample(pipe, req, progress=False), rtol=1e-5, atol=1e-6)
            if req.init is not None:
                edit = dict(init=req.init, mask=req.mask, strength=req.strength)
                want = pipe.sample((req.n, 1, 8, 8), steps=req.steps, seed=req.seed, progress=False, **edit)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
