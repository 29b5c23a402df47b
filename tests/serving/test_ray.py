"""Ray Serve replicas of fastdiff's engine on a local Ray instance: two replicas serve the same API, results equal
offline sampling, every response names its replica; killing a replica mid-load loses no request (each either
completes, on a retry with the same seed giving the same samples, or gets an error; none hangs) and the replica
comes back and takes traffic; shutdown leaves none of our Ray processes behind."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from live_server import start_serve
from ray import serve
from repo_paths import TESTS as TESTS_DIR
from serving_models import mixture_pipeline

from fastdiff.serving.client import Client
from fastdiff.serving.ray import build_app
from fastdiff.serving.server import ServeSettings

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app():
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}},
        )
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"a local Ray instance cannot start here: {exc}")
    node = ray._private.worker._global_node
    ray_pids = [p.process.pid for procs in node.all_processes.values() for p in procs]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            "serving_models:slow_mixture",
            num_replicas=2,
            ray_actor_options={"num_cpus": 0.5},
            settings=ServeSettings(max_batch=16, threads=1),
        ),
        name="fastdiff",
        route_prefix="/",
    )
    replica_pids = set()
    yield f"http://127.0.0.1:{port}", replica_pids, ray_pids
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 60
    left = [pid for pid in ray_pids + sorted(replica_pids) if _alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [pid for pid in left if _alive(pid)]
    assert not left, f"Ray processes left behind: {left}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _descends_from(pid: int, ancestors) -> bool:
    """Whether ``pid`` is one of ``ancestors`` or a descendant of one (by /proc's parent links)."""
    ancestors = set(ancestors)
    while pid > 1:
        if pid in ancestors:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def _offline(n: int, seed: int, steps: int) -> np.ndarray:
    return mixture_pipeline().sample((n, 2), steps=steps, seed=seed, progress=False).numpy()


def _sample(url: str, seed: int, steps: int = 10, retries: int = 0):
    """(samples, replica, pid, attempts); retries (same seed) on what a dying replica answers."""
    client = Client(url, timeout=60, retries=retries, retry_statuses=(500, 502, 503))
    x = client.sample(n=2, seed=seed, steps=steps)
    return x, client.last_headers.get("x-fastdiff-replica"), client.last_headers.get("x-fastdiff-pid"), client.attempts


def _replica_with_running_rows(url: str, timeout: float = 60.0) -> int:
    """The pid of a replica that answers /readyz with rows running: polls until one does, and names the replica
    that answered (its own count, not a guess about where the proxy sent the load)."""
    client = Client(url, timeout=10)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.readyz()["running_rows"] > 0:
            return int(client.last_headers["x-fastdiff-pid"])
        time.sleep(0.01)
    raise AssertionError("no replica had rows running")


def test_fastdiff_serve_ray_starts_serves_and_stops_clean():
    """The command line: a local Ray instance with one replica; SIGTERM shuts Serve and Ray down (exit 0)."""
    port = _free_port()
    flags = ["--ray", "--replicas", "1", "--port", str(port), "--model", "serving_models:mixture_pipeline"]
    proc, url = start_serve([*flags, "--threads", "1"])
    try:
        assert url == f"http://127.0.0.1:{port}", url
        x, replica, pid, _ = _sample(f"http://127.0.0.1:{port}", 3, steps=6)
        assert np.array_equal(x, _offline(2, 3, 6)) and replica
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        deadline = time.monotonic() + 30
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(int(pid)), "the replica outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_two_replicas_serve_offline_samples_and_name_themselves(ray_app):
    url, replica_pids, _ = ray_app
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: _sample(url, s), range(12)))
    for seed, (x, replica, pid, _) in enumerate(results):
        assert np.array_equal(x, _offline(2, seed, 10))
        assert replica and pid
        replica_pids.add(int(pid))
    assert len({r[1] for r in results}) == 2, "both replicas should take traffic"
    info = Client(url).info()
    assert info["sample_shape"] == [2] and info["batching"] == "continuous"


def test_a_burst_spreads_across_the_replicas(ray_app):
    """24 concurrent requests to 2 replicas land within 35/65 (the router counts each request routed, so a burst
    does not all go where the queue looked shortest when it began)."""
    url, replica_pids, _ = ray_app
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda s: _sample(url, s, 25), range(200, 224)))
    per_replica = Counter(r[1] for r in results)
    replica_pids.update(int(r[2]) for r in results)
    assert len(per_replica) == 2 and min(per_replica.values()) >= math.ceil(0.35 * 24), per_replica


def test_killing_a_replica_mid_load_loses_no_request(ray_app):
    url, replica_pids, ray_pids = ray_app
    seeds = list(range(100, 124))
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_sample, url, s, 25, 5) for s in seeds]
        victim = _replica_with_running_rows(url)  # the kill must hit requests in flight
        assert _descends_from(victim, ray_pids), f"{victim} is not a process of this Ray instance"
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]  # none hangs
    for seed, (x, _, pid, _) in zip(seeds, results):
        assert np.array_equal(x, _offline(2, seed, 25)), seed
        replica_pids.add(int(pid))
    assert max(r[3] for r in results) > 1, "the kill should have failed some in-flight requests (then retried)"
    deadline = time.monotonic() + 90
    fresh = set()
    while time.monotonic() < deadline:  # the replica comes back and takes traffic
        with ThreadPoolExecutor(4) as pool:
            fresh |= {int(r[2]) for r in pool.map(lambda s: _sample(url, s, 5, 3), range(4))}
        if len(fresh - {victim}) == 2:
            break
        time.sleep(1)
    replica_pids.update(fresh)
    assert victim not in fresh and len(fresh) == 2, fresh


def test_app_from_args_reads_settings_and_refuses_unknown_arguments():
    from fastdiff.serving.ray import app_from_args

    app = app_from_args(
        {
            "model": "digits",
            "max_batch": "32",
            "threads": "2",
            "min_replicas": "1",
            "max_replicas": "4",
            "num_cpus": "1",
            "request_timeout_s": "none",
        }
    )
    deployment = app._bound_deployment
    assert deployment.max_ongoing_requests == 256 + 32
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.ray_actor_options["num_cpus"] == 1.0
    with pytest.raises(ValueError, match="bogus"):
        app_from_args({"bogus": "1"})
    with pytest.raises(ValueError, match="num_replicas"):
        app_from_args({"num_replicas": "0"})


def test_the_kuberay_manifest_builds_an_app():
    import yaml

    from fastdiff.serving.ray import app_from_args

    with open(os.path.join(TESTS_DIR, "..", "deploy", "kuberay", "rayservice.yaml")) as f:
        manifest = yaml.safe_load(f)
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "fastdiff.serving.ray:app_from_args"
    deployment = app_from_args(application["args"])._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 1.0
    assert deployment._deployment_config.autoscaling_config.max_replicas == 8
