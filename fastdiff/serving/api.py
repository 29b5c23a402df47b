"""The HTTP API's request body (``POST /v1/samples``) and its translation into a :class:`SampleRequest`.

Parsing and type checks are pydantic's; the checks that depend on the served network and the server's limits
(sampler known and batchable, steps in range, n not too large, labels in range, seed list length) are
:func:`to_sample_request`'s, which raises :class:`FieldError` naming the field, as FastAPI's own 422s do.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import torch
from fastdiff.extras import missing_extra

try:
    from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.adaptive import SPECIAL_SAMPLERS
from fastdiff.pipeline import Pipeline
from fastdiff.png import encode_png
from fastdiff.samplers import SAMPLERS
from fastdiff.request import SampleRequest

BATCHABLE_SAMPLERS = tuple(sorted(name for name in SAMPLERS if name not in SPECIAL_SAMPLERS))
Number = Union[StrictInt, StrictFloat]


class SamplesBody(BaseModel):
    """``POST /v1/samples``: what to sample. Unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    n: StrictInt = Field(1, description="how many samples")
    seed: Union[StrictInt, List[StrictInt]] = Field(0, description="one seed (sample i: a seed derived from it "
                                                                    "and i, as Pipeline.sample) or one per sample")
    sampler: str = Field("ddim", description="a fixed-step sampler name (fastdiff.samplers)")
    steps: StrictInt = Field(50, description="sampler steps")
    eta: Optional[Number] = Field(None, description="noise level of the samplers that take one")
    guidance_scale: Number = Field(1.0, description="classifier-free guidance weight (needs class_label)")
    class_label: Optional[Union[StrictInt, List[StrictInt]]] = Field(
        None, description="class label(s) for class-conditional networks: one for all samples or one each")
    conditioning: Optional[Dict[str, Any]] = Field(
        None, description="other model kwargs: name -> number (shared) or nested list with n rows (per sample)")
    shape: Optional[List[StrictInt]] = Field(None, description="one sample's shape (default: the network's)")
    format: Literal["npy", "png"] = Field("npy", description="npy: float32 array body; png: JSON of base64 PNGs")
    timeout_s: Optional[Number] = Field(None, description="deadline in seconds (default: the server's)")


@dataclass(frozen=True)
class Limits:
    """What the server accepts: ``max_n`` samples per request, ``max_steps`` steps, ``max_timeout_s``."""

    max_n: int = 64
    max_steps: int = 1000
    default_timeout_s: Optional[float] = 300.0
    max_timeout_s: float = 3600.0


class FieldError(ValueError):
    """A request field the served network or the server's limits refuse."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def detail(self) -> List[Dict[str, Any]]:
        """FastAPI's 422 ``detail`` list."""
        return [{"loc": ["body", self.field], "msg": self.message, "type": "value_error"}]


def to_sample_request(body: SamplesBody, pipe: Pipeline, limits: Limits) -> Tuple[SampleRequest, Optional[float]]:
    """The engine request for ``body`` and its timeout; raises :class:`FieldError` for what cannot be served."""
    if not 1 <= body.n <= limits.max_n:
        raise FieldError("n", f"must be between 1 and {limits.max_n}, got {body.n}")
    if body.sampler not in BATCHABLE_SAMPLERS:
        raise FieldError("sampler", f"unknown or not batchable per step: {body.sampler!r}; "
                                    f"choose one of {', '.join(BATCHABLE_SAMPLERS)}")
    info = SAMPLERS[body.sampler]
    if pipe.prediction not in info.predictions:
        raise FieldError("sampler", f"{body.sampler!r} cannot use this network's prediction {pipe.prediction!r}")
    max_steps = min(limits.max_steps, pipe.schedule.num_train_timesteps or limits.max_steps)
    if not 1 <= body.steps <= max_steps:
        raise FieldError("steps", f"must be between 1 and {max_steps}, got {body.steps}")
    options: Dict[str, Any] = {}
    if body.eta is not None:
        if "eta" not in info.options:
            raise FieldError("eta", f"sampler {body.sampler!r} takes no eta")
        if not 0 <= body.eta <= 10:
            raise FieldError("eta", f"must be between 0 and 10, got {body.eta}")
        options["eta"] = float(body.eta)
    if isinstance(body.seed, list) and len(body.seed) != body.n:
        raise FieldError("seed", f"a list of seeds needs one per sample ({body.n}), got {len(body.seed)}")
    if any(not 0 <= s < 2 ** 63 for s in (body.seed if isinstance(body.seed, list) else [body.seed])):
        raise FieldError("seed", "seeds must be in [0, 2**63)")
    shape = _sample_shape(body, pipe)
    model_kwargs = _conditioning(body, pipe)
    uncond_kwargs = None
    if body.guidance_scale != 1.0:
        if body.class_label is None:
            raise FieldError("guidance_scale", "guidance needs class_label (its null class is the unconditional)")
        uncond_kwargs = {"y": torch.full((body.n,), pipe.num_classes, dtype=torch.long)}
    timeout = limits.default_timeout_s if body.timeout_s is None else float(body.timeout_s)
    if timeout is not None and not 0 < timeout <= limits.max_timeout_s:
        raise FieldError("timeout_s", f"must be in (0, {limits.max_timeout_s:g}], got {timeout}")
    request = SampleRequest(n=body.n, sample_shape=shape, sampler=body.sampler, steps=body.steps, seed=body.seed,
                            guidance_scale=float(body.guidance_scale), model_kwargs=model_kwargs,
                            uncond_kwargs=uncond_kwargs, options=options)
    try:
        request.validate(pipe, serving=True)
    except (TypeError, ValueError) as exc:
        raise FieldError("body", str(exc)) from exc
    if body.format == "png" and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise FieldError("format", f"png needs samples shaped [1 or 3, H, W], these are {list(shape)}")
    return request, timeout


def _sample_shape(body: SamplesBody, pipe: Pipeline) -> Tuple[int, ...]:
    if body.shape is None:
        if pipe.sample_shape is None:
            raise FieldError("shape", "this network has no fixed sample shape: give one")
        return tuple(pipe.sample_shape)
    if not body.shape or any(s < 1 for s in body.shape) or int(np.prod(body.shape)) > 2 ** 24:
        raise FieldError("shape", f"must be positive sizes of at most 2**24 elements, got {body.shape}")
    if pipe.sample_shape is not None and tuple(body.shape) != tuple(pipe.sample_shape):
        raise FieldError("shape", f"this network samples {list(pipe.sample_shape)}, got {body.shape}")
    return tuple(body.shape)


def _conditioning(body: SamplesBody, pipe: Pipeline) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {}
    if body.class_label is not None:
        if pipe.num_classes == 0:
            raise FieldError("class_label", "this network is not class-conditional")
        labels = body.class_label if isinstance(body.class_label, list) else [body.class_label] * body.n
        if len(labels) != body.n:
            raise FieldError("class_label", f"a list of labels needs one per sample ({body.n}), got {len(labels)}")
        if any(not 0 <= y < pipe.num_classes for y in labels):
            raise FieldError("class_label", f"labels must be in [0, {pipe.num_classes})")
        kwargs["y"] = torch.tensor(labels, dtype=torch.long)
    for name, value in (body.conditioning or {}).items():
        if name in kwargs:
            raise FieldError("conditioning", f"{name!r} is given twice")
        try:
            tensor = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise FieldError("conditioning", f"{name!r} is not a number or a nested list of numbers") from exc
        if tensor.ndim > 0 and tensor.shape[0] != body.n:
            raise FieldError("conditioning", f"{name!r} has {tensor.shape[0]} rows, expected n = {body.n}")
        kwargs[name] = tensor if tensor.ndim > 0 else float(tensor)
    return kwargs


def npy_bytes(samples: torch.Tensor) -> bytes:
    """The samples as a float32 ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, samples.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def png_payload(samples: torch.Tensor) -> Dict[str, Any]:
    """JSON body of ``format: "png"``: one base64 PNG per sample, values in [-1, 1] mapped to 0-255."""
    x = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    images = [base64.b64encode(encode_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))).decode()
              for img in x]
    return {"format": "png", "shape": list(samples.shape), "images": images}
