"""``POST /v1/images/generations`` and ``POST /v1/images/edits`` (a text-to-image server, ``fastdiff serve
--diffusers``): the request in the images-API conventions of the serving peers (a JSON body; for edits a multipart
form with the image and mask files), its translation into an :class:`~fastdiff.serving.prompts.ImageJob`, and the
answer (base64 images, or the raw latents as ``.npy``).

Every field the served pipeline cannot take is a 422 naming the field: a size not a multiple of the pipeline's
factor or over ``max_pixels``, ``n`` over ``max_n``, a sampler that does not fit the pipeline (``ddpm`` on a flow
pipeline, say), an empty prompt list. A prompt longer than the text encoder takes is cut, as diffusers cuts it,
and the answer says so (``warnings`` in the body, ``X-Fastdiff-Warning`` in the headers).
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fastdiff.extras import missing_extra

try:
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.diffusers.text_to_image import Prompt, TextToImage
from fastdiff.serving.api import (
    FieldError,
    Limits,
    Number,
    check_n,
    check_request,
    check_sampler,
    check_seed,
    check_steps,
    eta_option,
    request_timeout,
    short,
)
from fastdiff.serving.prompts import ImageJob, ImagesResult

IMAGES_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
IMAGE_MODES = ("RGB", "RGBA", "L")  # what an edit's image may be (RGBA's alpha and L's grey become RGB)
MASK_MODES = ("L", "1", "RGB", "RGBA")  # a mask is read as grey: white (>= 0.5) regenerates, black keeps
FORM_TEXT_FIELDS = ("prompt", "negative_prompt", "size", "sampler", "response_format", "output_format", "model")
SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")
DEFAULT_STEPS = 50
MAX_GUIDANCE = 100.0
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImagesBody(BaseModel):
    """``POST /v1/images/generations``: what to draw. Unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: StrictStr | list[StrictStr] = Field(description="the prompt, or one prompt per image")
    negative_prompt: StrictStr | list[StrictStr] | None = Field(
        None, description="what guidance steers away from (one, or one per image); default the pipeline's"
    )
    n: StrictInt | None = Field(None, description="how many images (default 1, or one per prompt of a list)")
    size: StrictStr | None = Field(None, description='"WxH" in pixels (default the pipeline\'s native size)')
    num_inference_steps: StrictInt | None = Field(None, description="sampler steps (default the pipeline's)")
    guidance_scale: Number | None = Field(
        None, description="classifier-free guidance, on above 1 (default the pipeline's)"
    )
    seed: StrictInt | list[StrictInt] | None = Field(
        None, description="one seed (image i: a seed derived from it and i), one per image, or none (random)"
    )
    sampler: str | None = Field(None, description="a fastdiff sampler (default the pipeline's scheduler's)")
    eta: Number | None = Field(None, description="noise level of the samplers that take one")
    response_format: Literal["b64_json", "latents"] = Field(
        "b64_json", description="b64_json: JSON of base64 images; latents: the final latents as float32 .npy"
    )
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="the images' file format")
    model: str | None = Field(
        None, description="accepted for clients that always send it; the server's pipeline answers"
    )
    timeout_s: Number | None = Field(None, description="deadline in seconds (default: the server's)")


class EditsBody(ImagesBody):
    """``POST /v1/images/edits`` (multipart/form-data): the fields of :class:`ImagesBody` and the edit's
    ``strength``; the ``image`` file (and the optional ``mask`` file) are read beside them. ``size``, if given, must
    be the image's."""

    strength: Number | None = Field(
        None, description="where the edit starts, in (0, 1] (default 0.8 without a mask, 1 with one, as diffusers)"
    )


@dataclass(frozen=True)
class ImageLimits:
    """What a text-to-image server accepts beyond :class:`~fastdiff.serving.api.Limits`: ``max_pixels`` per image."""

    max_pixels: int = 1024 * 1024


@dataclass(frozen=True)
class ImagesCall:
    """A parsed images request: the job, its request without conditioning (checked), its timeout, its answer's
    formats and the warnings to send with it."""

    job: ImageJob
    request: Any
    timeout: float | None
    response_format: str
    output_format: str
    warnings: tuple[str, ...]


def pipeline_defaults(t2i: TextToImage) -> dict[str, Any]:
    """The diffusers pipeline's own defaults for steps and guidance (its ``__call__`` signature)."""
    params = inspect.signature(type(t2i.pipeline).__call__).parameters
    steps = params.get("num_inference_steps")
    guidance = params.get("guidance_scale")
    return {
        "num_inference_steps": steps.default if steps is not None else DEFAULT_STEPS,
        "guidance_scale": float(guidance.default) if guidance is not None else 1.0,
    }


def to_images_call(
    body: ImagesBody,
    t2i: TextToImage,
    limits: Limits,
    image_limits: ImageLimits,
    samplers: tuple[str, ...],
    edit: Callable[[int], dict[str, Any]] | None = None,
) -> ImagesCall:
    """The job for ``body``; raises :class:`~fastdiff.serving.api.FieldError` for what cannot be served. ``edit``
    (:func:`to_edits_call`) gives an edit's request fields (init, mask, strength) for its ``n`` images."""
    prompts = _texts(body.prompt, "prompt")
    n = body.n if body.n is not None else (len(prompts) if isinstance(body.prompt, list) else 1)
    check_n(n, limits)
    if isinstance(body.prompt, list) and len(prompts) != n:
        raise FieldError("prompt", f"a list of prompts needs one per image ({n}), got {len(prompts)}")
    negatives = (
        [None] * len(prompts) if body.negative_prompt is None else _texts(body.negative_prompt, "negative_prompt")
    )
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise FieldError("negative_prompt", f"one negative prompt, or one per prompt ({len(prompts)})")
    width, height = _size(body.size, t2i, image_limits)
    defaults = pipeline_defaults(t2i)
    steps = defaults["num_inference_steps"] if body.num_inference_steps is None else body.num_inference_steps
    check_steps(steps, t2i.pipe, limits, "num_inference_steps")
    guidance = defaults["guidance_scale"] if body.guidance_scale is None else float(body.guidance_scale)
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise FieldError("guidance_scale", f"must be between 0 and {MAX_GUIDANCE:g}, got {short(guidance)}")
    sampler = body.sampler or t2i.pipe.setup.sampler
    check_sampler(sampler, samplers)
    options = eta_option(body.eta, sampler)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    check_seed(seed, n)
    settings = dict(
        n=n, width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler, **options
    )
    if edit is not None:
        settings.update(edit(n))
    job = ImageJob(tuple(Prompt(p, neg, guidance > 1) for p, neg in zip(prompts, negatives, strict=True)), settings)
    request = job.skeleton(t2i)
    check_request(request, t2i.pipe)
    warnings = tuple(
        f"{field} was cut to the text encoder's {t2i.token_limit()} tokens"
        for field, texts in (("prompt", prompts), ("negative_prompt", [t for t in negatives if t]))
        if any(t2i.truncated(t) for t in texts)
    )
    timeout = request_timeout(body.timeout_s, limits)
    return ImagesCall(job, request, timeout, body.response_format, body.output_format, warnings)


def edits_form_fields(form: Any) -> dict[str, Any]:
    """A multipart form's fields (all but the files) as the JSON body of :class:`EditsBody` would hold them: the text
    fields as they are, the others read as JSON (numbers, a list of seeds; what is not JSON stays text, for the body's
    type check to refuse); a field sent more than once is a list."""
    out: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in ("image", "mask"):
            continue
        if not isinstance(value, str):
            raise FieldError(name, "must be a form field, not a file")
        if name not in FORM_TEXT_FIELDS:
            try:
                value = json.loads(value, parse_constant=_refuse_constant)
            except (ValueError, RecursionError):
                pass
        if name in out:
            out[name] = [*(out[name] if isinstance(out[name], list) else [out[name]]), value]
        else:
            out[name] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the server takes")


def read_image(data: bytes | None, field: str, modes: tuple[str, ...]) -> torch.Tensor:
    """An uploaded image file as float32 in [0, 1], [1, C, H, W] (C = 3, or 1 for a mask); a 422 naming ``field``
    for a missing file, one PIL cannot read, or a mode outside ``modes``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise FieldError(field, "a file is required (multipart/form-data)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FieldError(field, f"not an image file PIL reads: {exc}") from exc
    if image.mode not in modes:
        raise FieldError(field, f"mode {image.mode} is not one of {', '.join(modes)}")
    grey = field == "mask"
    pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels.copy())
    return tensor[None, None] if grey else tensor.permute(2, 0, 1)[None]


def to_edits_call(
    body: EditsBody,
    image: torch.Tensor,
    mask: torch.Tensor | None,
    t2i: TextToImage,
    limits: Limits,
    image_limits: ImageLimits,
    samplers: tuple[str, ...],
) -> ImagesCall:
    """The job of an edit (:func:`read_image` gave ``image`` and ``mask``): the images are the image's size, the
    image encoded by the VAE (:meth:`TextToImage.edit_latents`, as :meth:`TextToImage.edit` does offline)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    size = f"{width}x{height}"
    if body.size is not None and body.size != size:
        raise FieldError("size", f"must be the image's size {size} (or left out), got {short(body.size)}")
    try:
        _size(size, t2i, image_limits)
    except FieldError as exc:
        raise FieldError("image", exc.message) from None
    if mask is not None and tuple(mask.shape[-2:]) != (height, width):
        raise FieldError("mask", f"must be the image's size {size}, got {mask.shape[-1]}x{mask.shape[-2]}")
    strength = (1.0 if mask is not None else 0.8) if body.strength is None else float(body.strength)
    if not 0.0 < strength <= 1.0:
        raise FieldError("strength", f"must be in (0, 1], got {short(body.strength)}")

    def edit(n: int) -> dict[str, Any]:
        init, latent_mask = t2i.edit_latents(image, mask, n)
        return dict(init=init, mask=latent_mask, strength=strength)

    return to_images_call(body.model_copy(update={"size": size}), t2i, limits, image_limits, samplers, edit)


def _texts(value: str | list[str], field: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise FieldError(field, "must be a string or a non-empty list of strings")
    return texts


def _size(size: str | None, t2i: TextToImage, image_limits: ImageLimits) -> tuple[int, int]:
    if size is None:
        width, height = t2i.default_size
    else:
        match = SIZE.match(size)
        if match is None:
            raise FieldError("size", f'must be "WxH" (e.g. "512x512"), got {short(size)}')
        width, height = int(match.group(1)), int(match.group(2))
    f = t2i.size_factor
    if width % f or height % f:
        raise FieldError("size", f"width and height must be multiples of {f}, got {width}x{height}")
    if width * height > image_limits.max_pixels:
        raise FieldError("size", f"at most {image_limits.max_pixels} pixels per image, got {width}x{height}")
    return width, height


def image_files(images: Any, output_format: str) -> list[bytes]:
    """Each image (float32 in [0, 1], [n, 3, H, W]) as a file of ``output_format``, with 8-bit values rounded as
    diffusers' image processor rounds them."""
    from PIL import Image

    pixels = (images.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    files = []
    for array in pixels:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=output_format.upper())
        files.append(buf.getvalue())
    return files


def images_payload(result: ImagesResult, call: ImagesCall) -> dict[str, Any]:
    """The JSON answer of ``response_format: "b64_json"``."""
    files = image_files(result.images, call.output_format)
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": base64.b64encode(data).decode(), "seed": seed}
            for data, seed in zip(files, result.seeds, strict=True)
        ],
        "output_format": call.output_format,
        "size": f"{result.images.shape[-1]}x{result.images.shape[-2]}",
        "warnings": list(call.warnings),
    }


__all__ = [
    "EDITS_PATH",
    "IMAGES_PATH",
    "EditsBody",
    "ImageLimits",
    "ImagesBody",
    "ImagesCall",
    "edits_form_fields",
    "image_files",
    "images_payload",
    "read_image",
    "to_edits_call",
    "to_images_call",
]
