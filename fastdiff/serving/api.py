"""The HTTP API's request body (``POST /v1/samples``) and its translation into a :class:`SampleRequest`.

:func:`parse_body` reads the JSON (refusing NaN, Infinity and numbers no float or int64 holds, naming where they
are) and checks types with pydantic; the checks that depend on the served network and the server's limits
(sampler known and batchable, steps in range, n not too large, labels in range, seed list length) are
:func:`to_sample_request`'s. Both raise :class:`InvalidBody` (:class:`FieldError` for one field), whose
``detail()`` is FastAPI's 422 list, and whose messages echo at most :data:`ECHO_CHARS` characters of a value.
"""

from __future__ import annotations

import base64
import io
import json
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fastdiff.extras import missing_extra

try:
    from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc


from fastdiff.pipeline import Pipeline
from fastdiff.png import encode_png
from fastdiff.request import SampleRequest
from fastdiff.samplers import EAGER_SAMPLERS, SAMPLERS

BATCHABLE_SAMPLERS = tuple(sorted(name for name in SAMPLERS if name not in EAGER_SAMPLERS))
Number = StrictInt | StrictFloat
ECHO_CHARS = 100  # the most characters of a request's value an error message repeats
MAX_INT_DIGITS = 40  # longer integer literals are refused (no field takes more than 2**63)


class SamplesBody(BaseModel):
    """``POST /v1/samples``: what to sample. Unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: StrictInt = Field(1, description="how many samples")
    seed: StrictInt | list[StrictInt] = Field(
        0, description="one seed (sample i: a seed derived from it and i, as Pipeline.sample) or one per sample"
    )
    sampler: str = Field("ddim", description="a fixed-step sampler name (fastdiff.samplers)")
    steps: StrictInt = Field(50, description="sampler steps")
    eta: Number | None = Field(None, description="noise level of the samplers that take one")
    guidance_scale: Number = Field(1.0, description="classifier-free guidance weight (needs class_label)")
    class_label: StrictInt | list[StrictInt] | None = Field(
        None, description="class label(s) for class-conditional networks: one for all samples or one each"
    )
    conditioning: dict[str, Any] | None = Field(
        None, description="other model kwargs: name -> number (shared) or nested list with n rows (per sample)"
    )
    spacing: Literal["tuned"] | None = Field(
        None, description='"tuned": the grid fitted to this network for (sampler, steps, guidance_scale); /v1/info'
    )
    shape: list[StrictInt] | None = Field(None, description="one sample's shape (default: the network's)")
    init: str | None = Field(
        None, description="image editing: base64 of a .npy array, the samples to edit ([n, *shape], or one sample's "
        "shape for all); alone image-to-image, with mask inpainting"
    )  # fmt: skip
    mask: str | None = Field(
        None, description="inpainting (with init): base64 of a .npy array broadcasting to [n, *shape], values in "
        "[0, 1] (1 = regenerate, 0 = keep)"
    )  # fmt: skip
    strength: Number = Field(1.0, description="with init: where the edit starts, in (0, 1] (1: from pure noise)")
    format: Literal["npy", "png"] = Field("npy", description="npy: float32 array body; png: JSON of base64 PNGs")
    timeout_s: Number | None = Field(None, description="deadline in seconds (default: the server's)")


@dataclass(frozen=True)
class Limits:
    """What the server accepts: ``max_n`` samples per request, ``max_steps`` steps, ``max_timeout_s``."""

    max_n: int = 64
    max_steps: int = 1000
    default_timeout_s: float | None = 300.0
    max_timeout_s: float = 3600.0


class InvalidBody(ValueError):
    """A request body the server refuses (HTTP 422): ``errors`` as FastAPI's ``detail`` list."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors

    def detail(self) -> list[dict[str, Any]]:
        """FastAPI's 422 ``detail`` list."""
        return self.errors


class FieldError(InvalidBody):
    """A request field the served network or the server's limits refuse."""

    def __init__(self, field: str, message: str):
        super().__init__([{"loc": ["body", field], "msg": _cut(message, 3 * ECHO_CHARS), "type": "value_error"}])
        self.field = field
        self.message = message


class Refused:
    """A JSON number the server does not take (NaN, Infinity, a float beyond float64, an integer of more than
    :data:`MAX_INT_DIGITS` digits), kept in place of its value so that the error can say where it was."""

    def __init__(self, literal: str):
        self.literal = literal

    def __repr__(self) -> str:
        return _cut(self.literal, ECHO_CHARS)


_ECHO_REPR = reprlib.Repr()
_ECHO_REPR.maxstring = _ECHO_REPR.maxother = _ECHO_REPR.maxlong = ECHO_CHARS


def short(value: Any, limit: int = ECHO_CHARS) -> Any:
    """``value`` as an error message may repeat it: None, a bool or a finite number of few digits as it is, a
    string cut to ``limit`` characters, anything else as its repr cut so (never built in full)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, int) and abs(value) < 10**ECHO_CHARS:
        return value
    if isinstance(value, str):
        return _cut(value, limit)
    return _cut(_ECHO_REPR.repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_body(raw: bytes, body_type: type[BaseModel] = SamplesBody) -> Any:
    """The request body of ``POST /v1/samples`` (or another endpoint's ``body_type``); raises :class:`InvalidBody`
    for invalid JSON, a refused number (naming where it is) or a field of the wrong type."""
    try:
        data = json.loads(raw, parse_constant=Refused, parse_float=_float_literal, parse_int=_int_literal)
    except json.JSONDecodeError as exc:
        raise _unreadable(["body", exc.pos], f"JSON decode error: {exc.msg}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _unreadable(["body"], f"unreadable JSON: {short(str(exc))}") from None
    where = _refused_path(data)
    if where is not None:
        path, literal = where
        msg = f"must be a finite number that a float64 or int64 holds, got {literal!r}"
        raise InvalidBody([{"loc": ["body", *path], "msg": msg, "type": "finite_number", "input": repr(literal)}])
    try:
        return body_type.model_validate(data)
    except ValidationError as exc:
        raise InvalidBody(validation_detail(exc.errors(include_url=False))) from None


def _unreadable(loc: list[Any], msg: str) -> InvalidBody:
    return InvalidBody([{"loc": loc, "msg": msg, "type": "json_invalid"}])


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's (or FastAPI's) errors as a 422 ``detail`` list: ``loc``, ``msg``, ``type`` and a short
    ``input`` (never the whole value, which may be megabytes or a number JSON cannot write)."""
    out = []
    for err in errors:
        loc = list(err.get("loc", ()))
        entry = {"loc": loc if loc[:1] == ["body"] else ["body", *loc], "msg": err["msg"], "type": err["type"]}
        if "input" in err:
            entry["input"] = short(err["input"])
        out.append(entry)
    return out


def _float_literal(text: str) -> float | Refused:
    value = float(text)
    return value if math.isfinite(value) else Refused(text)


def _int_literal(text: str) -> int | Refused:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else Refused(text)


def _refused_path(data: Any) -> tuple[list[Any], Refused] | None:
    """Where the first :class:`Refused` number in ``data`` is, and that number (None: there is none)."""
    stack: list[tuple[list[Any], Any]] = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Refused):
            return path, value
        if isinstance(value, dict):
            stack.extend((path + [key], item) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((path + [i], item) for i, item in reversed(list(enumerate(value))))
    return None


def servable_samplers(pipe: Pipeline) -> tuple[str, ...]:
    """The samplers this pipeline can serve per step: fixed coefficient programs that take its prediction and build
    on its schedule (the rectified-flow samplers need ``Schedule.flow``, say). What ``/v1/info`` lists."""
    names = []
    for name in BATCHABLE_SAMPLERS:
        if pipe.prediction not in SAMPLERS[name].predictions:
            continue
        try:
            pipe.program(name, 2)  # cached by the pipeline; the schedule's own checks
        except ValueError:
            continue
        names.append(name)
    return tuple(names)


def to_sample_request(
    body: SamplesBody, pipe: Pipeline, limits: Limits, samplers: tuple[str, ...]
) -> tuple[SampleRequest, float | None]:
    """The engine request for ``body`` and its timeout (``samplers``: what :func:`servable_samplers` gives for
    ``pipe``, worked out once per server); raises :class:`FieldError` for what cannot be served."""
    check_n(body.n, limits)
    check_sampler(body.sampler, samplers)
    check_steps(body.steps, pipe, limits)
    options = eta_option(body.eta, body.sampler)
    check_seed(body.seed, body.n)
    shape = _sample_shape(body, pipe)
    model_kwargs = _conditioning(body, pipe)
    uncond_kwargs = None
    if body.guidance_scale != 1.0:
        if body.class_label is None:
            raise FieldError("guidance_scale", "guidance needs class_label (its null class is the unconditional)")
        uncond_kwargs = {"y": torch.full((body.n,), pipe.num_classes, dtype=torch.long)}
    timeout = request_timeout(body.timeout_s, limits)
    request = SampleRequest(
        n=body.n,
        sample_shape=shape,
        sampler=body.sampler,
        steps=body.steps,
        seed=body.seed,
        guidance_scale=float(body.guidance_scale),
        spacing=body.spacing,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        options=options,
        **_edit_fields(body, shape),
    )
    check_request(request, pipe)
    if body.format == "png" and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise FieldError("format", f"png needs samples shaped [1 or 3, H, W], these are {list(shape)}")
    return request, timeout


def check_n(n: int, limits: Limits) -> None:
    """``n`` within the server's limit (:class:`FieldError` on ``n`` otherwise)."""
    if not 1 <= n <= limits.max_n:
        raise FieldError("n", f"must be between 1 and {limits.max_n}, got {short(n)}")


def check_sampler(sampler: str, samplers: tuple[str, ...], field: str = "sampler") -> None:
    """``sampler`` is one the server serves for its network (``samplers``)."""
    if sampler not in samplers:
        raise FieldError(
            field,
            f"unknown, not batchable per step or not for this network: {short(sampler)}; choose one of "
            f"{', '.join(samplers)}",
        )


def check_steps(steps: int, pipe: Pipeline, limits: Limits, field: str = "steps") -> None:
    """``steps`` within the server's limit and the schedule's."""
    max_steps = min(limits.max_steps, pipe.schedule.num_train_timesteps or limits.max_steps)
    if not 1 <= steps <= max_steps:
        raise FieldError(field, f"must be between 1 and {max_steps}, got {short(steps)}")


def eta_option(eta: float | None, sampler: str) -> dict[str, Any]:
    """The sampler options for an ``eta`` field (none when it is None)."""
    if eta is None:
        return {}
    if "eta" not in SAMPLERS[sampler].options:
        raise FieldError("eta", f"sampler {short(sampler)} takes no eta")
    if not 0 <= eta <= 10:
        raise FieldError("eta", f"must be between 0 and 10, got {short(eta)}")
    return {"eta": float(eta)}


def check_seed(seed: int | list[int], n: int) -> None:
    """One seed, or one per sample, each in [0, 2**63)."""
    if isinstance(seed, list) and len(seed) != n:
        raise FieldError("seed", f"a list of seeds needs one per sample ({n}), got {len(seed)}")
    if any(not 0 <= s < 2**63 for s in (seed if isinstance(seed, list) else [seed])):
        raise FieldError("seed", "seeds must be in [0, 2**63)")


def request_timeout(timeout_s: float | None, limits: Limits) -> float | None:
    """A request's deadline in seconds: its own, within the server's limit, or the server's default."""
    timeout = limits.default_timeout_s if timeout_s is None else float(timeout_s)
    if timeout is not None and not 0 < timeout <= limits.max_timeout_s:
        raise FieldError("timeout_s", f"must be in (0, {limits.max_timeout_s:g}], got {short(timeout)}")
    return timeout


def check_request(request: SampleRequest, pipe: Pipeline) -> None:
    """The request's own checks (:meth:`SampleRequest.validate`) as a 422 on the body."""
    try:
        request.validate(pipe, serving=True)
    except (TypeError, ValueError) as exc:
        raise FieldError("body", str(exc)) from exc


def _edit_fields(body: SamplesBody, shape: tuple[int, ...]) -> dict[str, Any]:
    """The request's ``init``, ``mask`` and ``strength`` from the body (none given: none); an ``init`` of one
    sample's shape serves every sample. The request's own checks then hold shapes, values and strength."""
    fields: dict[str, Any] = {}
    if body.init is not None:
        init = npy_field("init", body.init)
        fields["init"] = init.expand(body.n, *shape).contiguous() if tuple(init.shape) == shape else init
    if body.mask is not None:
        fields["mask"] = npy_field("mask", body.mask)
    if body.strength != 1.0:
        fields["strength"] = float(body.strength)
    return fields


def npy_field(field: str, text: str) -> torch.Tensor:
    """A body field holding base64 of a ``.npy`` array, as float32 (:class:`FieldError` for what is not base64, not
    a ``.npy`` array, not numeric or not finite)."""
    try:
        raw = base64.b64decode(text, validate=True)
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # binascii.Error is a ValueError
        raise FieldError(field, f"must be base64 of a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise FieldError(field, f"must be a numeric array, got {getattr(array, 'dtype', type(array).__name__)}")
    values = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise FieldError(field, "must be finite (no NaN or Inf)")
    return torch.from_numpy(values)


def _sample_shape(body: SamplesBody, pipe: Pipeline) -> tuple[int, ...]:
    if body.shape is None:
        if pipe.sample_shape is None:
            raise FieldError("shape", "this network has no fixed sample shape: give one")
        return tuple(pipe.sample_shape)
    if not body.shape or any(s < 1 for s in body.shape) or int(np.prod(body.shape)) > 2**24:
        raise FieldError("shape", f"must be positive sizes of at most 2**24 elements, got {short(body.shape)}")
    if pipe.sample_shape is not None and tuple(body.shape) != tuple(pipe.sample_shape):
        raise FieldError("shape", f"this network samples {list(pipe.sample_shape)}, got {short(body.shape)}")
    return tuple(body.shape)


def _conditioning(body: SamplesBody, pipe: Pipeline) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
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
            raise FieldError("conditioning", f"{short(name)} is given twice")
        try:
            tensor = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise FieldError("conditioning", f"{short(name)} is not a number or a nested list of numbers") from exc
        if not bool(torch.isfinite(tensor).all()):
            raise FieldError("conditioning", f"{short(name)} has values beyond float32")
        if tensor.ndim > 0 and tensor.shape[0] != body.n:
            raise FieldError("conditioning", f"{short(name)} has {tensor.shape[0]} rows, expected n = {body.n}")
        kwargs[name] = tensor if tensor.ndim > 0 else float(tensor)
    return kwargs


def npy_bytes(samples: torch.Tensor) -> bytes:
    """The samples as a float32 ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, samples.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def png_payload(samples: torch.Tensor) -> dict[str, Any]:
    """JSON body of ``format: "png"``: one base64 PNG per sample, values in [-1, 1] mapped to 0-255."""
    x = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    images = [
        base64.b64encode(encode_png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))).decode() for img in x
    ]
    return {"format": "png", "shape": list(samples.shape), "images": images}
