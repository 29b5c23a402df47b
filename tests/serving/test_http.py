"""The HTTP server end to end on loopback: samples equal offline sampling (npy and png), 422s naming the field,
429 with Retry-After, deadlines (504), NaN isolation (500), metrics, a disconnecting client's rows freed, and
SIGTERM draining a real ``fastdiff serve`` process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from repo_paths import TESTS as TESTS_DIR
from serving_models import gated_mixture_pipeline, mixture_pipeline

from fastdiff.pretrained import digits
from fastdiff.serving.api import Limits
from fastdiff.serving.app import create_app
from fastdiff.serving.client import Client, ServerError
from fastdiff.serving.metrics import ServingMetrics
from fastdiff.serving.runner import Runner

pytestmark = pytest.mark.http


@contextmanager
def serving(pipe, limits: Limits = Limits(), **runner_kwargs):
    """An in-process server on a free loopback port (uvicorn in a thread), stopped on exit."""
    runner = Runner(pipe, metrics=ServingMetrics(), **runner_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(runner, limits), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Client(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60), runner
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


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
            _wait_for(lambda: runner.running_rows == 2)
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


def test_sigterm_drains_a_real_server_process():
    env = dict(os.environ, PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastdiff",
            "serve",
            "--model",
            "serving_models:slow_mixture",
            "--port",
            "0",
            "--max-batch",
            "8",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "fastdiff serving on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        client = Client(line.split()[3], timeout=60)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.sample, n=2, seed=5, steps=40)  # ~0.8 s of 20 ms network calls
            _wait_for(lambda: client.readyz()["running_rows"] == 2)
            proc.send_signal(signal.SIGTERM)
            got = running.result(60)
        assert np.array_equal(got, _offline(mixture_pipeline(), 2, 5, steps=40))
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once drained
        assert "draining" in proc.stderr.read()
        with pytest.raises(OSError):  # the listener is closed
            Client(client.base_url, timeout=5).healthz()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


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
