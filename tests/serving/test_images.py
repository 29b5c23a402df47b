"""``POST /v1/images/generations``: tiny SD, SDXL and SD3 pipelines (tests/tiny_pipelines.py) served over HTTP; every
served image equals the offline result for its settings and seeds, whatever shares its batch."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from live_server import serving, start_serve
from PIL import Image

from fastdiff.diffusers.text_to_image import Prompt, TextToImage, load_text_to_image
from fastdiff.serving.api import Limits
from fastdiff.serving.client import Client, ServerError
from fastdiff.serving.prompts import PromptFrontend

pytestmark = pytest.mark.http

# Served rows share network calls with other rows; the tiny networks are not bitwise batch-invariant on the CPU
# (a matmul's blocking follows the batch size), so a served request equals the offline one within this.
BATCH_VARIANCE = 1e-5


@pytest.fixture(scope="module")
def sd(tiny_pipelines) -> TextToImage:
    return load_text_to_image(tiny_pipelines["sd"], device="cpu")


def _offline(t2i: TextToImage, prompt, negative=None, guidance=1.0, size=None, **settings):
    width, height = (int(v) for v in size.split("x")) if size else t2i.default_size
    return t2i.generate(prompt, negative, guidance, width=width, height=height, **settings)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def _pixels(files: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]).astype(np.int16)


MIXED = [  # (prompt, negative, guidance, size, steps, sampler, n)
    ("a cat at the mat", None, 5.0, "16x16", 4, "ddim", 2),
    ("the dog", "cat", 7.5, "32x16", 6, "dpmpp_2m", 1),
    ("a dog at the cat", None, 1.0, "16x16", 3, "unipc", 1),
    ("the mat", None, 1.0, "32x16", 5, "ddim", 2),
    ("cat", "dog", 3.0, "16x16", 8, "euler", 1),
    ("the cat", None, 1.0, "16x16", 5, "dpmpp_2m", 3),
]


def test_concurrent_mixed_requests_each_equal_their_offline_result(sd):
    """Six clients at once: different samplers, step counts, sizes (two engines), guidance on and off; each
    request's latents equal the offline ones within the network's batch variance, its PNGs the offline images."""
    results: dict[int, object] = {}
    with serving(sd.pipe, Limits(max_n=4), frontend=PromptFrontend(sd), max_batch=16) as (client, runner):

        def ask(i: int) -> None:
            prompt, negative, guidance, size, steps, sampler, n = MIXED[i]
            fields = dict(n=n, size=size, num_inference_steps=steps, sampler=sampler, seed=50 + i)
            fields.update(guidance_scale=guidance, **({"negative_prompt": negative} if negative else {}))
            results[i] = (client.generate_latents(prompt, **fields), client.generate(prompt, **fields))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(MIXED))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, (prompt, negative, guidance, size, steps, sampler, n) in enumerate(MIXED):
        latents, generated = results[i]
        offline_latents, offline_images = _offline(
            sd, prompt, negative, guidance, size, n=n, steps=steps, sampler=sampler, seed=50 + i
        )
        assert _rel(latents, offline_latents) <= BATCH_VARIANCE, MIXED[i]
        expected = (offline_images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int16)
        assert np.abs(_pixels(generated.images) - expected).max() <= 1, MIXED[i]
        assert len(generated.seeds) == n and generated.warnings == []


def test_each_image_has_its_own_seed(sd):
    """The seeds an answer names remake each image alone."""
    with serving(sd.pipe, frontend=PromptFrontend(sd)) as (client, _):
        both = client.generate_latents("the cat", n=2, num_inference_steps=3, seed=7)
        seeds = [int(s) for s in client.last_headers["x-fastdiff-seeds"].split(",")]
        second = client.generate_latents("the cat", n=1, num_inference_steps=3, seed=[seeds[1]])
    assert _rel(second[0], both[1]) <= BATCH_VARIANCE


def test_bad_fields_get_a_422_naming_the_field(sd):
    with serving(sd.pipe, Limits(max_n=2), frontend=PromptFrontend(sd)) as (client, _):
        info = client.info()
        assert info["pipeline"] == "StableDiffusionPipeline" and info["size_multiple"] == 2
        cases = [
            ({"size": "15x16"}, "size", "multiples of 2"),
            ({"size": "2048x2048"}, "size", "pixels"),
            ({"size": "big"}, "size", "WxH"),
            ({"n": 3}, "n", "between 1 and 2"),
            ({"sampler": "rk45"}, "sampler", "choose one of"),
            ({"num_inference_steps": 0}, "num_inference_steps", "between"),
            ({"guidance_scale": -1}, "guidance_scale", "between"),
            ({"prompt": []}, "prompt", "non-empty"),
            ({"prompt": ["a", "b"], "n": 1}, "prompt", "one per image"),
            ({"negative_prompt": ["a", "b"]}, "negative_prompt", "one per prompt"),
            ({"seed": [1, 2]}, "seed", "one per sample"),
            ({"output_format": "gif"}, "output_format", ""),
            ({"steps": 3}, "steps", "Extra inputs"),
        ]
        for fields, field, message in cases:
            body = {"prompt": "the cat", "num_inference_steps": 2, **fields}
            with pytest.raises(ServerError) as err:
                client._post("/v1/images/generations", body)
            assert err.value.status == 422, fields
            assert err.value.detail[0]["loc"][-1] == field and message in err.value.detail[0]["msg"], err.value.detail


def test_a_prompt_longer_than_the_encoder_takes_is_cut_and_the_answer_says_so(sd):
    long = "the cat at the mat and the dog at the cat and more words than the tokenizer keeps"
    with serving(sd.pipe, frontend=PromptFrontend(sd)) as (client, _):
        out = client.generate(long, num_inference_steps=2, seed=1, output_format="jpeg")
        assert "cut to the text encoder's 16 tokens" in client.last_headers["x-fastdiff-warning"]
        latents = client.generate_latents(long, num_inference_steps=2, seed=1, guidance_scale=1)
    assert out.warnings == ["prompt was cut to the text encoder's 16 tokens"]
    assert Image.open(io.BytesIO(out.images[0])).format == "JPEG"
    assert _rel(latents, _offline(sd, long, steps=2, seed=1)[0]) <= BATCH_VARIANCE


def test_an_encoder_error_fails_its_request_alone(sd, monkeypatch):
    """A prompt the text encoder raises on gets a 500; the requests encoded with it get their images."""
    encode = sd._encode_texts

    def fragile(texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("the encoder refuses boom")
        return encode(texts)

    monkeypatch.setattr(sd, "_encode_texts", fragile)
    results = {}
    with serving(sd.pipe, frontend=PromptFrontend(sd)) as (client, runner):

        def ask(prompt: str) -> None:
            try:
                results[prompt] = client.generate_latents(prompt, num_inference_steps=2, seed=3, guidance_scale=1)
            except ServerError as exc:
                results[prompt] = exc

        threads = [threading.Thread(target=ask, args=(p,)) for p in ("the cat", "boom", "the dog")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert isinstance(results["boom"], ServerError) and results["boom"].status == 500
    assert "refuses boom" in str(results["boom"].detail)
    monkeypatch.undo()
    for prompt in ("the cat", "the dog"):
        assert _rel(results[prompt], _offline(sd, prompt, steps=2, seed=3)[0]) <= BATCH_VARIANCE


def test_samples_endpoint_still_serves_the_denoiser(sd):
    """``/v1/samples`` on a text-to-image server: the latents for given conditioning (here one prompt's
    embeddings), as the offline pipeline samples them."""
    (encoded,) = sd.encode([Prompt("the cat")])
    cond = encoded.cond["encoder_hidden_states"]
    with serving(sd.pipe, frontend=PromptFrontend(sd)) as (client, _):
        conditioning = {"encoder_hidden_states": cond.tolist()}
        got = client.sample(n=1, shape=[4, 8, 8], steps=3, seed=4, conditioning=conditioning)
    want = sd.pipe.sample((1, 4, 8, 8), steps=3, seed=4, model_kwargs={"encoder_hidden_states": cond}, progress=False)
    assert _rel(got, want) <= BATCH_VARIANCE


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_fastdiff_serve_diffusers_process(tiny_pipelines, name):
    """``fastdiff serve --diffusers DIR`` as a process: its info names the pipeline; a guided request equals the
    offline result."""
    proc, url = start_serve(["--diffusers", tiny_pipelines[name], "--port", "0", "--device", "cpu"])
    try:
        client = Client(url, timeout=120)
        info = client.info()
        latents = client.generate_latents("a cat at the mat", negative_prompt="dog", guidance_scale=4.0, n=2,
                                          num_inference_steps=4, seed=[5, 6], size="16x32")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    t2i = load_text_to_image(tiny_pipelines[name], device="cpu")
    assert info["pipeline"] == t2i.kind and info["default_sampler"] == t2i.pipe.setup.sampler
    offline, _ = _offline(t2i, "a cat at the mat", "dog", 4.0, "16x32", n=2, steps=4, seed=[5, 6])
    assert _rel(latents, offline) <= BATCH_VARIANCE


def test_serve_refuses_other_pipeline_classes(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    out = subprocess.run([sys.executable, "-m", "fastdiff", "serve", "--diffusers", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert "'DDPMPipeline' is not supported; supported: StableDiffusionPipeline" in out.stderr
