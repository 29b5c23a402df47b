"""The HTTP server end to end on loopback: samples equal offline sampling (npy and png), 422s naming the field
(NaN, Infinity and huge numbers too, never echoing more than a short prefix), 429 with a Retry-After that follows
the queue, deadlines (504), NaN isolation (500), metrics counting every answer, a disconnecting client's rows
freed, the connection guards (header and body deadlines, body limit, API key) and SIGTERM draining a real
``fastdiff serve`` process while it answers 503."""

from __future__ import annotations

import http.client
import io
import json
import math
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from live_server import raw_exchange, serving, start_serve
from PIL import Image
from serving_models import gated_mixture_pipeline, mixture_pipeline

from fastdiff.pretrained import digits
from fastdiff.serving.client import Client, ServerError
from fastdiff.serving.guards import HttpGuards
from fastdiff.serving.runner import Throughput

pytestmark = pytest.mark.http


def _offline(pipe, n, seed, sampler="ddim", steps=50, eta=None, y=None, guidance_scale=1.0):
    kwargs = (
        {}
        if y is None
        else {"model_kwargs": {"y": torch.as_tensor(y).expand(n) if np.ndim(y) == 0 else torch.as_tensor(y)}}
    )
    if guidance_scale != 1.0:
        kwargs["uncond_kwargs"] = {"y": torch.full((n,), pipe.num_classes)}
    return pipe.sample(
        (n, *pipe.sample_shape),
        sampler=sampler,
        steps=steps,
        seed=seed,
        eta=eta,
        guidance_scale=guidance_scale,
        progress=False,
        **kwargs,
    ).numpy()


@pytest.fixture(scope="module")
def mixture_server():
    pipe = mixture_pipeline()
    with serving(pipe, max_batch=16) as (client, runner):
        yield pipe, client, runner


def test_concurrent_requests_equal_offline_sampling(mixture_server):
    pipe, client, _ = mixture_server
    cases = [
        dict(n=1 + i % 4, seed=i, sampler=s, steps=3 + 2 * i, **({"eta": 1.0} if s == "ddim" else {}))
        for i, s in enumerate(["ddim", "dpmpp_2m", "ddpm", "unipc", "euler_ancestral", "heun", "ddim", "lms"])
    ]
    cases.append(dict(n=3, seed=[7, 8, 9], sampler="ddim", steps=5, conditioning={"y": [0.0, 1.0, 2.0]}))
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: Client(client.base_url).sample(**c), cases))
    for case, got in zip(cases, results):
        case = dict(case)
        y = case.pop("conditioning", {}).get("y")
        want = _offline(pipe, y=y, **case)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), case


def test_bad_requests_are_422_naming_the_field(mixture_server):
    _, client, _ = mixture_server
    cases = [
        (dict(steps=0), "steps"),
        (dict(steps=5000), "steps"),
        (dict(sampler="nope"), "sampler"),
        (dict(sampler="pc"), "sampler"),
        (dict(n=0), "n"),
        (dict(n=100), "n"),
        (dict(steps="ten"), "steps"),
        (dict(seed=[1, 2]), "seed"),
        (dict(seed=-1), "seed"),
        (dict(bogus=1), "bogus"),
        (dict(class_label=1), "class_label"),
        (dict(guidance_scale=2.0), "guidance_scale"),
        (dict(eta=0.5, sampler="dpmpp_2m"), "eta"),
        (dict(shape=[3]), "shape"),
        (dict(format="png"), "format"),
        (dict(conditioning={"y": [1, 2]}), "conditioning"),
        (dict(n=2, conditioning={"z": [1, 2]}), "body"),  # a name the network does not take
        (dict(timeout_s=-1), "timeout_s"),
    ]
    for fields, field in cases:
        call = client.sample_png if fields.pop("format", None) == "png" else client.sample
        with pytest.raises(ServerError) as info:
            call(**fields)
        assert info.value.status == 422, fields
        assert any(field in d["loc"] for d in info.value.detail), (fields, info.value.detail)


def test_nan_fails_only_its_request_and_metrics_count_it(mixture_server):
    pipe, client, runner = mixture_server
    before = client.metrics().get('fastdiff_requests_total{outcome="request_failed"}', 0.0)
    with pytest.raises(ServerError) as info:
        client.sample(n=2, steps=5, conditioning={"y": [0.0, 99.0]})
    assert info.value.status == 500 and "NaN" in info.value.detail
    assert np.array_equal(client.sample(n=2, steps=5, seed=3), _offline(pipe, 2, 3, steps=5))
    metrics = client.metrics()
    assert metrics['fastdiff_requests_total{outcome="request_failed"}'] == before + 1
    for name in (
        "fastdiff_queue_depth",
        "fastdiff_running_rows",
        "fastdiff_batch_occupancy_count",
        'fastdiff_request_latency_seconds_count{outcome="ok"}',
        "fastdiff_time_to_first_step_seconds_count",
        "fastdiff_samples_total",
        "fastdiff_samples_per_second",
        "fastdiff_ticks_total",
        "fastdiff_engine_busy_seconds_total",
        "fastdiff_process_cpu_seconds_total",
    ):
        assert name in metrics, name
    assert metrics["fastdiff_samples_per_second"] > 0 and metrics["fastdiff_queue_depth"] == 0
    assert client.healthz() == {"status": "ok"} and client.readyz()["status"] == "ready"


def test_full_queue_is_429_with_retry_after_and_deadlines_are_504():
    pipe = gated_mixture_pipeline()
    with serving(pipe, max_batch=2, max_queue=1) as (client, runner):
        pipe.model.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.sample, n=2, seed=1, steps=4)
            _wait_for(lambda: runner.running_rows == 2 and runner.queue_depth == 0)  # admitted, no longer waiting
            second = pool.submit(Client(client.base_url).sample, n=1, seed=2, steps=4)
            _wait_for(lambda: runner.queue_depth == 1)
            with pytest.raises(ServerError) as info:
                client.sample(n=1, steps=4)
            assert info.value.status == 429 and info.value.retry_after >= 1
            patient = Client(client.base_url, retries=1000, max_wait=0.01)
            third = pool.submit(patient.sample, n=1, seed=3, steps=4)
            _wait_for(lambda: patient.attempts > 3)  # refused with 429 and retrying
            pipe.model.gate.set()
            assert np.array_equal(first.result(60), _offline(pipe, 2, 1, steps=4))
            assert np.array_equal(second.result(60), _offline(pipe, 1, 2, steps=4))
            assert np.array_equal(third.result(60), _offline(pipe, 1, 3, steps=4))
        pipe.model.delay_s = 0.01
        with pytest.raises(ServerError) as info:
            client.sample(n=1, steps=500, timeout_s=0.2)
        assert info.value.status == 504


def test_a_disconnecting_client_frees_its_rows():
    pipe = mixture_pipeline(delay_s=0.01)
    with serving(pipe, max_batch=8) as (client, runner):
        port = int(client.base_url.rsplit(":", 1)[1])
        body = json.dumps({"n": 3, "steps": 1000, "seed": 0}).encode()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            _wait_for(lambda: runner.running_rows == 3)
        _wait_for(lambda: runner.running_rows == 0)
        metrics = client.metrics()
        assert metrics['fastdiff_requests_total{outcome="request_cancelled"}'] == 1
        assert metrics["fastdiff_ticks_total"] < 500  # it did not run its 1000 steps


def test_png_format_on_the_digits_network():
    pipe = digits()
    with serving(pipe, max_batch=8) as (client, _):
        pngs = client.sample_png(n=2, seed=4, sampler="dpmpp_2m", steps=6, class_label=[3, 5], guidance_scale=2.0)
        npy = client.sample(n=2, seed=4, sampler="dpmpp_2m", steps=6, class_label=[3, 5], guidance_scale=2.0)
    want = _offline(pipe, 2, 4, sampler="dpmpp_2m", steps=6, y=[3, 5], guidance_scale=2.0)
    np.testing.assert_allclose(npy, want, rtol=0, atol=1e-5)  # a network's batch variance (rows differ in batch)
    assert len(pngs) == 2
    for png, x in zip(pngs, want):
        img = np.asarray(Image.open(io.BytesIO(png)))
        assert img.shape == (8, 8) and img.dtype == np.uint8
        expected = np.round((np.clip(x[0], -1, 1) + 1) * 127.5)
        assert np.abs(img.astype(float) - expected).max() <= 1


def test_sigterm_drains_a_real_server_process_answering_503_meanwhile(tmp_path):
    gate = tmp_path / "gate"
    gate.touch()  # the server's network waits while this file exists
    flags = ["--model", "serving_models:file_gated_mixture", "--port", "0", "--max-batch", "8", "--threads", "1"]
    proc, url = start_serve(flags, FASTDIFF_TEST_GATE=str(gate))
    try:
        client = Client(url, timeout=60)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.sample, n=2, seed=5, steps=40)
            _wait_for(lambda: client.readyz()["running_rows"] == 2)  # held at its first network call
            proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: _status(client.base_url, "GET", "/readyz")[0] == 503)  # still listening
            status, headers, _ = _status(client.base_url, "GET", "/readyz")
            assert int(headers["Retry-After"]) >= 1
            status, headers, body = _status(client.base_url, "POST", "/v1/samples", b'{"n": 1, "steps": 2}')
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
            assert proc.poll() is None
            gate.unlink()
            got = running.result(60)
        assert np.array_equal(got, _offline(mixture_pipeline(), 2, 5, steps=40))
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once drained
        assert "draining" in proc.stderr.read()
        with pytest.raises(OSError):  # the listener is closed once drained
            Client(client.base_url, timeout=5).healthz()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _status(base_url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request on a fresh connection."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_nan_infinity_and_huge_numbers_are_422_naming_the_field_and_counted(mixture_server):
    _, client, _ = mixture_server
    before = client.metrics().get('fastdiff_requests_total{outcome="invalid_request"}', 0.0)
    cases = [
        (b'{"n": NaN}', ["body", "n"]),
        (b'{"n": Infinity}', ["body", "n"]),
        (b'{"steps": -Infinity}', ["body", "steps"]),
        (b'{"n": 1e400}', ["body", "n"]),
        (b'{"guidance_scale": NaN, "class_label": 1}', ["body", "guidance_scale"]),
        (b'{"eta": 1e999}', ["body", "eta"]),
        (b'{"timeout_s": NaN}', ["body", "timeout_s"]),
        (b'{"conditioning": {"y": [0.0, NaN]}, "n": 2}', ["body", "conditioning", "y", 1]),
        (b'{"seed": 1' + b"0" * 5000 + b"}", ["body", "seed"]),
        (b'{"bogus": NaN}', ["body", "bogus"]),
    ]
    for raw, loc in cases:
        status, _, body = _status(client.base_url, "POST", "/v1/samples", raw)
        assert status == 422, (raw[:40], body)
        detail = json.loads(body)["detail"]
        assert detail[0]["loc"] == loc and len(body) < 1000, (raw[:40], detail)
    with pytest.raises(ServerError) as info:
        client.sample(n=float("nan"))  # the client writes NaN as JSON's NaN
    assert info.value.status == 422 and info.value.detail[0]["loc"] == ["body", "n"]
    after = client.metrics()['fastdiff_requests_total{outcome="invalid_request"}']
    assert after == before + len(cases) + 1


def test_422_echoes_only_a_short_prefix_of_the_value(mixture_server):
    _, client, _ = mixture_server
    for fields, field in [
        ({"sampler": "x" * 5_000_000}, "sampler"),
        ({"bogus": "y" * 5_000_000}, "bogus"),
        ({"n": "z" * 5_000_000}, "n"),
        ({"shape": [1] * 100_000}, "shape"),
        ({"conditioning": {"w" * 1_000_000: [1.0, 2.0, 3.0]}}, "conditioning"),
    ]:
        status, _, body = _status(client.base_url, "POST", "/v1/samples", json.dumps(fields).encode())
        assert status == 422 and len(body) < 1000, (field, len(body))
        assert field in json.loads(body)["detail"][0]["loc"]
    # a conditioning name the network does not take: refused at validation (422), the name cut short too
    status, _, body = _status(client.base_url, "POST", "/v1/samples", json.dumps({"conditioning": {"v" * 10**6: 1}}))
    assert status == 422 and len(body) < 1000, len(body)


@pytest.fixture(scope="module")
def guarded_server():
    """Tight guards: bodies of at most 2000 bytes arriving within 0.3 s, headers within 0.3 s."""
    guards = HttpGuards(max_body_bytes=2000, body_timeout_s=0.3)
    with serving(mixture_pipeline(), guards=guards, header_timeout_s=0.3, max_batch=8) as (client, runner):
        yield client, int(client.base_url.rsplit(":", 1)[1])


def test_a_body_over_the_limit_is_413_and_the_connection_goes_on(guarded_server):
    client, port = guarded_server
    before = client.metrics().get('fastdiff_requests_total{outcome="body_too_large"}', 0.0)
    big = b'{"n": 1' + b" " * 50_000 + b"}"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:  # a keep-alive client
        conn.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        assert answer.status == 413 and b"at most 2000 bytes" in answer.read()
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the unread body was discarded
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        assert answer.status == 200 and answer.read() == b'{"status":"ok"}'
    chunked = b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunk = b" " * 1500
    got = raw_exchange(port, chunked + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413 "), got[:100]  # no Content-Length: counted as it came
    assert client.metrics()['fastdiff_requests_total{outcome="body_too_large"}'] == before + 2
    assert np.array_equal(client.sample(n=1, seed=2, steps=3), _offline(mixture_pipeline(), 1, 2, steps=3))


def test_slow_or_short_bodies_are_408_and_half_sent_headers_are_closed(guarded_server):
    client, port = guarded_server
    # a Content-Length larger than the body, and a body that stops half way: 408 once the body deadline passes
    for payload in [
        b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",
        b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n" + b'{"n": 1',
    ]:
        got = raw_exchange(port, payload)
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
    # headers that stop half way: 408 and closed once the header deadline passes; a silent connection: closed
    assert raw_exchange(port, b"POST /v1/samples HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408 ")
    assert raw_exchange(port, b"") == b""
    # after a response, the next request's headers have the same deadline
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = http.client.HTTPResponse(conn)
        answer.begin()
        assert answer.status == 200 and answer.read() == b'{"status":"ok"}'
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 408 ") and conn.recv(65536) == b""
    assert client.metrics()['fastdiff_requests_total{outcome="request_timeout"}'] >= 2


def test_the_api_key_is_required_everywhere_but_health():
    pipe = mixture_pipeline()
    with serving(pipe, guards=HttpGuards(api_key="s3cret-key"), max_batch=4) as (client, runner):
        for method, path in [("POST", "/v1/samples"), ("GET", "/v1/info"), ("GET", "/metrics"), ("GET", "/docs")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}]:
                status, got, _ = _status(client.base_url, method, path, b"{}" if method == "POST" else None, headers)
                assert status == 401 and got["WWW-Authenticate"] == "Bearer", (path, headers)
        assert client.healthz() == {"status": "ok"} and client.readyz()["status"] == "ready"
        keyed = Client(client.base_url, api_key="s3cret-key")
        assert np.array_equal(keyed.sample(n=1, seed=4, steps=3), _offline(pipe, 1, 4, steps=3))
        assert keyed.info()["max_n"] == 64
        assert keyed.metrics()['fastdiff_requests_total{outcome="unauthorized"}'] == 3


class _FixedRate(Throughput):
    """A throughput the test sets."""

    def __init__(self, rate: float):
        super().__init__()
        self.fixed = rate

    def rate(self, now: float, busy_since: float) -> float:
        return self.fixed


def test_retry_after_follows_the_queue_and_the_throughput():
    pipe = gated_mixture_pipeline()
    with serving(pipe, max_batch=2, max_queue=3) as (client, runner):
        pipe.model.gate.clear()
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(Client(client.base_url).sample, n=2, seed=0, steps=2)]
            # running (held at the gate), no longer counted as waiting: the others wait behind it
            _wait_for(lambda: runner.running_rows == 2 and runner.queue_depth == 0)
            held += [pool.submit(Client(client.base_url).sample, n=2, seed=i, steps=2) for i in range(1, 4)]
            _wait_for(lambda: runner.queue_depth == 3)
            for rate, want in [(0.5, 6), (0.25, 12), (2.0, 2), (100.0, 1)]:  # 3 waiting / rate, at least 1 s
                runner.throughput = _FixedRate(rate)
                status, headers, _ = _status(client.base_url, "POST", "/v1/samples", b'{"n": 1, "steps": 2}')
                assert status == 429 and headers["Retry-After"] == str(want), (rate, headers)
            runner.throughput = Throughput()
            pipe.model.gate.set()
            for i, future in enumerate(held):
                assert np.array_equal(future.result(60), _offline(pipe, 2, i, steps=2))


def test_throughput_counts_the_busy_period_within_the_window():
    tp = Throughput(window_s=10.0)
    assert tp.rate(100.0, busy_since=0.0) == 0.0
    for t in (91.0, 95.0, 96.0, 99.0):
        tp.record(t)
    assert tp.rate(100.0, busy_since=0.0) == 4 / 10  # the window: [90, 100]
    assert tp.rate(100.0, busy_since=95.0) == 3 / 5  # busy since 95: three finished in 5 s
    assert tp.rate(104.0, busy_since=0.0) == 3 / 10  # 91 left the window
    assert math.isclose(tp.rate(120.0, busy_since=0.0), 0.0)


def _wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "max_batch must be"),
        (["--model", "no_such_module:factory"], "No module named"),
        (["--model", "missing.safetensors"], "no checkpoint"),
        (["--model", "digits:"], "--model must be"),
        (["--timeout", "0"], "request_timeout_s must be"),
        (["--ray", "--replicas", "0"], "--replicas must be"),
    ],
)
def test_bad_serve_flags_are_usage_errors(flags, message, capsys):
    from fastdiff.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "0", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err
