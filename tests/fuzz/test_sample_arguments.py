"""Fuzzing ``Pipeline.sample`` with random arguments: it either returns finite samples of the asked shape or raises
ValueError, TypeError or NonFiniteError with a message that names what was wrong, never another exception, a
binding's signature dump or a silently ignored value. Seeded and bounded (``make test``); ``--fuzz-long`` runs
10,000 cases."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from fastdiff import NonFiniteError, Pipeline, Schedule
from fastdiff.eval.exact import GaussianMixture
from fastdiff.samplers import OPTION_KINDS, SAMPLERS

pytestmark = pytest.mark.fuzz

GMM = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.5]]), torch.tensor([0.5, 0.5]), torch.tensor([0.3, 0.5]))
SCHEDULES = {"vp_discrete": Schedule.vp_discrete(), "vp_linear": Schedule.vp_linear(), "flow": Schedule.flow()}
ARGUMENT_NAMES = {
    "shape", "sampler", "steps", "seed", "x_T", "model_kwargs", "guidance_scale", "uncond_kwargs", "noise", "eta",
    "spacing", "steps_offset", "rho", "guidance_rescale", "guidance_batching", "callback", "callback_steps",
    "cuda_graph", "timesteps", "sigmas", "grid", "sample_shape", "y", "batch", "return_x0", "return_trajectory",
    "progress", *OPTION_KINDS,
}  # fmt: skip
RAW = re.compile(r"incompatible function arguments|Unable to cast|object has no attribute|not subscriptable|"
                 r"unsupported operand|index out of range|can't convert|'NoneType' object")  # fmt: skip


def _model(prediction: str, schedule: Schedule):
    exact = GMM.as_model(schedule, prediction)

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return exact(x, t)

    return model


junk = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(-2, 3), max_size=3),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.just(torch.zeros(2)),
)  # fmt: skip
# Sizes are never huge positive ints: a valid but enormous shape is a request for that much memory, not bad input.
junk_size = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(allow_nan=True),
                      st.integers(-(2**70), 0), st.just(torch.zeros(2)))  # fmt: skip
small_int = st.integers(-2, 12)
real = st.one_of(st.floats(-2, 12, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 1e400]))


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times in four (so most cases reach the sampler), else ``bad``."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


def _option_value(kind: object) -> st.SearchStrategy:
    good = {
        "real": real, "int": small_int, "bool": st.booleans(), "reals": st.lists(real, min_size=1, max_size=4),
    }.get(kind) if not isinstance(kind, tuple) else st.sampled_from(kind)  # fmt: skip
    return _mostly(good, junk)


@st.composite
def arguments(draw: st.DrawFn) -> dict:
    """A call's keyword arguments: mostly plausible values, each with a chance of being junk."""
    n = draw(_mostly(st.integers(1, 3), junk_size))
    kwargs: dict = {
        "shape": draw(
            _mostly(st.just((n, 2)), st.one_of(st.just((n,)), st.just((n, 3)), st.tuples(junk_size, st.just(2))))
        ),
        "sampler": draw(_mostly(st.sampled_from(sorted(SAMPLERS)), st.text(max_size=6))),
        "steps": draw(_mostly(st.integers(1, 8), junk)),
        "progress": False,
    }
    rows = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    optional = {
        "seed": st.one_of(st.integers(0, 2**64), st.lists(st.integers(-1, 2**63), max_size=3), junk),
        "x_T": st.one_of(st.just(torch.zeros(rows, 2)), st.just(torch.zeros(5, 5)), junk),
        "guidance_scale": st.one_of(real, junk),
        "model_kwargs": st.one_of(st.just({"y": torch.tensor([0, 1, 2])[:rows]}),
                                  st.dictionaries(st.sampled_from(["y", "c", 3]), junk, max_size=2), junk),
        "noise": st.one_of(st.lists(st.one_of(st.none(), st.just(torch.zeros(1, 2))), max_size=10), junk),
        "spacing": st.one_of(st.sampled_from(["leading", "trailing", "linspace", "karras"]), junk),
        "return_x0": st.one_of(st.booleans(), junk),
        "callback_steps": st.one_of(small_int, junk),
        "cuda_graph": st.one_of(st.sampled_from(["auto", True, False]), junk),
        "guidance_batching": st.one_of(st.sampled_from(["double", "separate"]), junk),
        **{name: _option_value(kind) for name, kind in OPTION_KINDS.items()},
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=2, unique=True)):
        kwargs[name] = draw(optional[name])
    return kwargs


@given(schedule=st.sampled_from(sorted(SCHEDULES)), prediction=st.sampled_from(["eps", "x0", "v", "flow"]),
       kwargs=arguments())  # fmt: skip
def test_sample_returns_samples_or_a_clear_error(schedule: str, prediction: str, kwargs: dict) -> None:
    sch = SCHEDULES[schedule]
    pipe = Pipeline(_model(prediction, sch), sch, prediction=prediction, device="cpu", num_classes=3)
    shape = kwargs.pop("shape")
    try:
        out = pipe.sample(shape, **kwargs)
    except NonFiniteError:
        event("NonFiniteError")
        return  # a network/sampler combination that diverges says so, naming the step and the samples
    except (ValueError, TypeError) as exc:
        event(type(exc).__name__)
        message = str(exc)
        assert message and not RAW.search(message), f"unclear {type(exc).__name__}: {message}"
        named = {name for name in ARGUMENT_NAMES if re.search(rf"\b{re.escape(name)}\b", message)}
        assert named or "sampler" in message or "prediction" in message, f"names no argument: {message}"
        return
    event("samples")
    samples = out[0] if isinstance(out, tuple) else out
    assert tuple(samples.shape) == tuple(shape), (samples.shape, shape)
