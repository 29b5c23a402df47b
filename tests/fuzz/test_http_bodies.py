"""Fuzzing ``POST /v1/samples`` on a live server (127.0.0.1): bodies built field by field, each field valid or
not, so the test knows which answer each deserves. Invalid input gets 4xx (never 2xx, never 5xx); a valid body
gets 200 with the samples offline ``Pipeline.sample`` gives for it, or, when its conditioning poisons the network
(the test network raises on y = 77 and goes NaN on y = 99), 500 for that request alone; raw bytes that are not a
JSON object get 4xx; the server stays healthy. Then concurrent mixes of good and bad requests: no innocent one
fails. Seeded and bounded (``make test``); ``--fuzz-long`` runs 10,000 cases."""

from __future__ import annotations

import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from live_server import raw_exchange, serving
from serving_models import mixture_pipeline

from fastdiff.serving.api import Limits

pytestmark = [pytest.mark.fuzz, pytest.mark.http]

LIMITS = Limits(max_n=4, max_steps=12)
SAMPLERS = ("ddim", "ddpm", "euler", "dpmpp_2m", "unipc")


@pytest.fixture(scope="module")
def server():
    pipe = mixture_pipeline()
    with serving(pipe, limits=LIMITS, max_batch=16) as (client, runner):
        yield pipe, client.base_url.rsplit(":", 1)[1]
        assert runner.accepting  # healthy to the end


@dataclass
class Case:
    """A request body as fields, and what the test knows of it."""

    fields: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # fields written as raw JSON text (NaN, Infinity, 1e400)
    invalid: list = field(default_factory=list)  # why it must be refused
    poison: bool = False  # valid, but the network fails on it
    broken: frozenset = frozenset()  # the fields to give bad values

    def body(self) -> bytes:
        text = json.dumps(self.fields)
        for name, literal in self.raw.items():
            text = text[:-1] + ("," if len(text) > 2 else "") + f'"{name}": {literal}' + "}"
        return text.encode()


FIELDS = ("n", "sampler", "steps", "seed", "eta", "guidance_scale", "conditioning", "shape", "format", "class_label",
          "timeout_s")  # fmt: skip


def _pick(draw: st.DrawFn, case: Case, name: str, good: st.SearchStrategy | None, bad: st.SearchStrategy,
          absent_ok: bool = True) -> object:  # fmt: skip
    """Sets field ``name`` to a bad value (noted) when the case breaks it, else to a good one or leaves it out
    (``good`` None: there is no good value, so it is left out)."""
    if name in case.broken:
        choice = "bad"
    elif good is None:
        choice = "absent"
    else:
        choice = draw(st.sampled_from(["good", "absent"] if absent_ok else ["good"]))
    if choice == "absent":
        return None
    value = draw(good if choice == "good" else bad)
    case.fields[name] = value
    if choice == "bad":
        case.invalid.append(name)
    return value


non_finite = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 50])
wrong_type = st.one_of(st.text(max_size=3), st.lists(st.integers(0, 3), max_size=2), st.booleans(), st.none())


@st.composite
def cases(draw: st.DrawFn) -> Case:
    # half the bodies are valid; the others break one to three fields
    broken = draw(st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(FIELDS), min_size=1, max_size=3)))
    case = Case(broken=broken)
    n = _pick(draw, case, "n", st.integers(1, 4), st.one_of(st.integers(-3, 0), st.integers(5, 10**6), wrong_type,
                                                            st.floats(1.5, 2.5)))  # fmt: skip
    rows = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4 else 1
    sampler = _pick(draw, case, "sampler", st.sampled_from(SAMPLERS),
                    st.sampled_from(["rk45", "flow_euler", "nope", "", 3]))  # fmt: skip
    # absent, steps is the API's default 50: over this server's max_steps, so it is always given
    _pick(draw, case, "steps", st.integers(1, 6), st.one_of(st.integers(-2, 0), st.integers(13, 10**9), wrong_type),
          absent_ok=False)  # fmt: skip
    _pick(draw, case, "seed", st.one_of(st.integers(0, 2**63 - 1), st.lists(st.integers(0, 9), min_size=rows,
                                                                           max_size=rows)),
          st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70), st.text(max_size=2),
                    st.lists(st.integers(0, 9), min_size=rows + 1, max_size=rows + 2)))  # fmt: skip
    takes_eta = sampler in ("ddim",) or sampler is None
    _pick(draw, case, "eta", st.floats(0, 1) if takes_eta else None,
          st.one_of(st.floats(1.01, 9), st.text(max_size=2)) if takes_eta else st.floats(0, 1))  # fmt: skip
    _pick(draw, case, "guidance_scale", st.just(1.0), st.one_of(st.floats(1.5, 5), wrong_type))
    y = st.lists(st.floats(-3, 3, allow_nan=False), min_size=rows, max_size=rows)
    conditioning = _pick(draw, case, "conditioning",
                         st.one_of(st.fixed_dictionaries({"y": y}),
                                   st.fixed_dictionaries({"y": st.lists(st.sampled_from([77.0, 99.0, 0.5]),
                                                                        min_size=rows, max_size=rows)})),
                         st.one_of(st.fixed_dictionaries({"z": y}), st.fixed_dictionaries({"x": st.just(1.0)}),
                                   st.fixed_dictionaries({"y": st.text(max_size=3)}),
                                   st.fixed_dictionaries({"y": st.lists(st.floats(0, 1), min_size=rows + 1,
                                                                        max_size=rows + 1)})))  # fmt: skip
    if conditioning and "conditioning" not in case.invalid:
        case.poison = any(v in (77.0, 99.0) for v in conditioning["y"])
    # (null is the network's own shape: valid)
    shape_bad = st.one_of(st.just([3]), st.just([0]), st.just([2, 2]), wrong_type.filter(lambda v: v is not None))
    _pick(draw, case, "shape", st.one_of(st.just([2]), st.none()), shape_bad)
    _pick(draw, case, "format", st.just("npy"), st.sampled_from(["gif", "", "PNG"]))
    _pick(draw, case, "class_label", None, st.integers(0, 3))  # the network is not class-conditional
    _pick(draw, case, "timeout_s", st.floats(30, 120), st.one_of(st.floats(-5, 0), st.floats(10**5, 10**7)))
    if broken and draw(st.integers(0, 5)) == 0:
        case.fields["bogus"] = 1
        case.invalid.append("bogus")
    if broken and draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(["n", "steps", "seed", "eta", "guidance_scale", "timeout_s"]))
        case.fields.pop(name, None)
        case.raw[name] = draw(non_finite)
        case.invalid.append(name)
    return case


def _post(port: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    try:
        conn.request("POST", "/v1/samples", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _offline(pipe, fields: dict) -> np.ndarray:
    n = fields.get("n", 1)
    kwargs = {}
    if "conditioning" in fields:
        kwargs["model_kwargs"] = {"y": torch.tensor(fields["conditioning"]["y"], dtype=torch.float32)}
    if "eta" in fields:
        kwargs["eta"] = fields["eta"]
    return pipe.sample((n, 2), sampler=fields.get("sampler", "ddim"), steps=fields.get("steps", 50),
                       seed=fields.get("seed", 0), progress=False, **kwargs).numpy()  # fmt: skip


def _check(pipe, port: str, case: Case) -> str:
    """Sends the case and checks its answer; returns what happened (for the statistics)."""
    status, body = _post(port, case.body())
    if case.invalid:
        assert 400 <= status < 500, (case, status, body[:300])
        return f"{status} ({case.invalid[0]})"
    if case.poison:
        assert status == 500, (case, status, body[:300])
        return "500 (the network failed on it)"
    assert status == 200, (case, status, body[:300])
    assert np.array_equal(np.load(io.BytesIO(body)), _offline(pipe, case.fields)), case
    return "200"


@given(case=cases())
def test_every_body_gets_the_answer_it_deserves(server, case: Case) -> None:
    pipe, port = server
    event(_check(pipe, port, case))


@given(raw=st.one_of(st.binary(max_size=64), st.sampled_from([b"[]", b"3", b'"x"', b"null", b"{", b'{"n": }'])))
def test_bytes_that_are_not_a_json_object_are_4xx(server, raw: bytes) -> None:
    _, port = server
    status, body = _post(port, raw)
    assert 400 <= status < 500, (raw, status, body[:300])


def test_concurrent_good_and_bad_requests_fail_only_the_bad(server) -> None:
    """Innocent requests sent together with invalid and poisoned ones all equal offline sampling."""
    pipe, port = server
    good = [Case({"n": 2, "seed": s, "steps": 6, "sampler": SAMPLERS[s % len(SAMPLERS)]}) for s in range(12)]
    good += [Case({"n": 1, "seed": s, "steps": 5, "conditioning": {"y": [0.5]}}) for s in range(4)]
    poisoned = [Case({"n": 2, "steps": 6, "conditioning": {"y": [0.0, v]}}, poison=True) for v in (77.0, 99.0) * 3]
    invalid = [
        Case({"n": 2, "steps": 6, "conditioning": {"y": [[1, 2], [1, 2, 3]]}}, invalid=["conditioning"]),
        Case({"n": 2, "steps": 6, "conditioning": {"z": [1.0, 2.0]}}, invalid=["conditioning"]),
    ] * 3
    mix = [case for trio in zip(good, poisoned + invalid + good, strict=False) for case in trio]  # interleaved
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda case: _check(pipe, port, case), mix))
    assert outcomes.count("200") >= len(good)


@pytest.fixture(scope="module")
def raw_server():
    """A server whose header deadline is short, so a request the fuzz leaves unfinished costs little."""
    with serving(mixture_pipeline(), limits=LIMITS, header_timeout_s=0.5, max_batch=4) as (client, runner):
        yield int(client.base_url.rsplit(":", 1)[1])
        assert runner.accepting


token = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "/v1/samples", "/healthz", "/metrics", "/v1/info",
                                   "HTTP/1.1", "HTTP/1.0", "HTTP/9", "Content-Length: 5", "Content-Length: -1",
                                   "Transfer-Encoding: chunked", "Content-Type: application/json", "Host: x",
                                   "Expect: 100-continue"]),
                  st.text(alphabet=st.characters(codec="latin-1"), max_size=12))  # fmt: skip


@settings(max_examples=max(30, settings.default.max_examples // 5))
@given(line=st.lists(token, min_size=1, max_size=4), headers=st.lists(token, max_size=4),
       body=st.one_of(st.binary(max_size=32), st.just(b'{"n": 1, "steps": 2}')))  # fmt: skip
def test_raw_requests_never_get_a_5xx_and_leave_the_server_healthy(raw_server, line, headers, body) -> None:
    """Request lines, headers and bodies of random tokens (always ending the headers, and asking to close):
    answered 2xx-4xx or closed, never 5xx; the server answers /healthz afterwards."""
    head = " ".join(line) + "\r\n" + "".join(h.replace("\r", " ").replace("\n", " ") + "\r\n" for h in headers)
    payload = head.encode("latin-1") + b"Connection: close\r\n\r\n" + body
    answer = raw_exchange(raw_server, payload)
    if answer:
        status = answer.split(b"\r\n", 1)[0].split(b" ")
        assert len(status) >= 2 and status[1][:1] in (b"1", b"2", b"3", b"4"), answer[:200]
    event("closed" if not answer else answer.split(b" ", 2)[1].decode())
    healthy = raw_exchange(raw_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert healthy.startswith(b"HTTP/1.1 200"), healthy[:200]
