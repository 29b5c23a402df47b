"""``POST /v1/images/edits`` on a tiny SD pipeline (tests/tiny_pipelines.py): image-to-image and inpainting as
multipart forms, served beside text-to-image requests; every served edit equals ``TextToImage.edit`` offline
(within the network's batch variance), and what cannot be served is a 422 naming the field."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from live_server import serving
from PIL import Image

from fastdiff.diffusers.text_to_image import TextToImage, load_text_to_image
from fastdiff.serving.api import Limits
from fastdiff.serving.client import Client, ServerError
from fastdiff.serving.prompts import PromptFrontend

pytestmark = pytest.mark.http

BATCH_VARIANCE = 1e-5  # as tests/serving/test_images.py: the tiny networks' batch variance on the CPU


@pytest.fixture(scope="module")
def sd(tiny_pipelines) -> TextToImage:
    return load_text_to_image(tiny_pipelines["sd"], device="cpu")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _picture(width: int = 32, height: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _lower_half_mask(width: int = 32, height: int = 16) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 2 :] = 255
    return mask


def _tensor(array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(array.astype(np.float32) / 255.0)
    return t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


EDITS = [  # (prompt, masked, strength, steps, sampler, n, guidance)
    ("a cat at the mat", False, 0.6, 6, "ddim", 2, 5.0),
    ("the dog", True, 1.0, 5, "dpmpp_2m", 1, 1.0),
    ("the cat", True, 0.7, 8, "euler", 2, 3.0),
    ("a dog", False, None, 5, "unipc", 1, 1.0),  # strength left out: 0.8
]


def test_concurrent_edits_and_generations_each_equal_their_offline_result(sd):
    picture, mask = _picture(), _lower_half_mask()
    results: dict[int, object] = {}
    with serving(sd.pipe, Limits(max_n=4), frontend=PromptFrontend(sd), max_batch=16) as (client, _):

        def ask(i: int) -> None:
            c = Client(client.base_url)
            if i == len(EDITS):  # a text-to-image request in the same batches
                results[i] = c.generate_latents(
                    "the mat", size="32x16", num_inference_steps=6, seed=99, guidance_scale=1
                )
                return
            prompt, masked, strength, steps, sampler, n, guidance = EDITS[i]
            fields = dict(n=n, num_inference_steps=steps, sampler=sampler, seed=70 + i, guidance_scale=guidance)
            if strength is not None:
                fields["strength"] = strength
            m = _png(mask) if masked else None
            image = _png(picture)
            results[i] = (c.edit_latents(image, prompt, m, **fields), c.edit(image, prompt, m, **fields))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(EDITS) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for i, (prompt, masked, strength, steps, sampler, n, guidance) in enumerate(EDITS):
        latents, edited = results[i]
        offline_latents, offline_images = sd.edit(
            prompt, _tensor(picture), _tensor(mask) if masked else None, 0.8 if strength is None else strength,
            guidance_scale=guidance, n=n, steps=steps, sampler=sampler, seed=70 + i,
        )  # fmt: skip
        assert latents.shape == (n, 4, 8, 16) and _rel(latents, offline_latents) <= BATCH_VARIANCE, EDITS[i]
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in edited.images])
        expected = (offline_images.permute(0, 2, 3, 1).numpy() * 255).round()
        assert np.abs(pixels.astype(np.int16) - expected.astype(np.int16)).max() <= 1, EDITS[i]
    plain, _ = sd.generate("the mat", width=32, height=16, steps=6, seed=99)
    assert _rel(results[len(EDITS)], plain) <= BATCH_VARIANCE


def test_inpainting_keeps_the_known_latents(sd):
    """Served at strength 1 with the lower half regenerated, the upper half's latents are the image's own."""
    picture, mask = _picture(seed=3), _lower_half_mask()
    with serving(sd.pipe, frontend=PromptFrontend(sd)) as (client, _):
        latents = client.edit_latents(_png(picture), "the cat", _png(mask), num_inference_steps=4, seed=1)
    init = sd.encode_images(_tensor(picture))
    np.testing.assert_allclose(latents[..., :4, :], init[..., :4, :].numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(latents[..., 4:, :], init[..., 4:, :].numpy(), atol=1e-2)


def test_bad_edits_get_a_422_naming_the_field(sd):
    picture = _png(_picture())
    cmyk = io.BytesIO()
    Image.fromarray(_picture()).convert("CMYK").save(cmyk, format="JPEG")
    cases = [
        (dict(image=b"not an image"), "image", "not an image file"),
        (dict(image=cmyk.getvalue()), "image", "mode CMYK"),
        (dict(image=_png(_picture(width=15))), "image", "multiples of 2"),
        (dict(mask=_png(_lower_half_mask(width=16))), "mask", "the image's size 32x16"),
        (dict(strength=0), "strength", "(0, 1]"),
        (dict(strength=1.5), "strength", "(0, 1]"),
        (dict(size="16x16"), "size", "the image's size 32x16"),
        (dict(num_inference_steps=2, strength=0.2), "body", "strength"),
        (dict(n="two"), "n", "integer"),
        (dict(steps=3), "steps", "Extra inputs"),
    ]
    with serving(sd.pipe, Limits(max_n=2), frontend=PromptFrontend(sd)) as (client, _):
        for fields, field, message in cases:
            image = fields.pop("image", picture)
            mask = fields.pop("mask", None)
            with pytest.raises(ServerError) as err:
                client.edit(image, "the cat", mask, **{"num_inference_steps": 4, **fields})
            assert err.value.status == 422, fields
            detail = err.value.detail[0]
            assert detail["loc"][-1] == field and message in detail["msg"], (fields, detail)
        with pytest.raises(ServerError) as err:  # a JSON body: no image file
            client._post("/v1/images/edits", {"prompt": "the cat"})
        assert err.value.status == 422 and err.value.detail[0]["loc"][-1] == "image"
