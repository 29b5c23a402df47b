"""The serving load benchmark: ``python -m fastdiff.bench serve``.

One mixed workload (steps 4-50, n 1-8, several samplers, class labels, Poisson arrivals at several rates) is sent
over loopback HTTP to ``fastdiff serve`` three times in the same run, once per batching policy of the server:
one request at a time (``single``), request-level batching (``request``: wait up to ``--batch-wait-ms``, run the
batch to its end) and step-level continuous batching (``continuous``). Every server is its own process on the
same network, machine and thread count; the workload is the same seeded list of requests for all three.

Reported per policy and arrival rate: throughput (samples/s and requests/s over the span from the first send to
the last answer), p50/p99 latency seen by the client, the engine's busy fraction (time in ticks / wall time) and
the server's CPU use (cores), read from its ``/metrics``; and per setup the median latency of an unloaded
one-sample, one-step request (:func:`unloaded_latency_ms`). Each run is bounded: ``--requests`` per rate and
``--time-limit`` seconds per rate (requests not yet sent by then are not sent; those sent are awaited).
JSON to ``bench/results/serve.json``, a Markdown table on stdout, and with ``--plot`` a latency-vs-load PNG.

``--diffusers PATH`` serves a diffusers text-to-image pipeline instead (``fastdiff serve --diffusers``) and sends
``POST /v1/images/generations``: prompts from a fixed vocabulary, steps 4-50, three or more samplers of those the
pipeline serves, two image sizes, guidance on and off, n 1-2; every answer is PNGs (so the text encoder, the VAE
and the PNG encoding are in the numbers).

``--ray-replicas 1,2`` adds continuous batching behind Ray Serve's proxy with 1 and 2 replicas (each its own
engine with ``--threads`` threads): per-replica throughput and, at low load against the plain server, the proxy's
cost per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fastdiff.bench.timing import cpu_name, default_results_path, write_results
from fastdiff.extras import require
from fastdiff.serving.client import Client, ServerError

POLICIES = ("single", "request", "continuous")
WORKLOAD_SAMPLERS = ("ddim", "dpmpp_2m", "euler_ancestral", "unipc", "ddpm")
WORKLOAD_STEPS = (4, 8, 10, 15, 20, 25, 30, 50)
IMAGE_SAMPLERS = ("ddim", "dpmpp_2m", "unipc", "euler", "flow_euler", "dpmpp_3m")  # those the pipeline serves
PROMPT_WORDS = ("a", "the", "cat", "dog", "at", "mat", "red", "blue", "small", "house", "tree", "on", "hill")
DEFAULT_JSON = default_results_path("serve.json")


def workload(count: int, rate: float, seed: int = 0, max_n: int = 8, num_classes: int = 10) -> list[dict[str, Any]]:
    """``count`` requests with Poisson arrivals at ``rate`` per second: each ``{"at": seconds, "body": {...}}``
    (with a class label when ``num_classes`` > 0)."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for _i in range(count):
        at += rng.expovariate(rate)
        n = rng.randint(1, max_n)
        body = {
            "n": n,
            "seed": rng.randrange(2**31),
            "sampler": rng.choice(WORKLOAD_SAMPLERS),
            "steps": rng.choice(WORKLOAD_STEPS),
        }
        label = int(rng.random() * num_classes)  # drawn either way, so the rest of the workload is the same
        if num_classes:
            body["class_label"] = label
        out.append({"at": at, "body": body})
    return out


def image_workload(
    count: int, rate: float, info: dict[str, Any], seed: int = 0, max_n: int = 2
) -> list[dict[str, Any]]:
    """``count`` images requests with Poisson arrivals at ``rate`` per second for a text-to-image server whose
    ``/v1/info`` is ``info``: prompts, steps, samplers, two sizes (the native one and twice as wide), guidance on
    and off."""
    rng = random.Random(seed)
    samplers = [s for s in IMAGE_SAMPLERS if s in info["samplers"]][:3] or list(info["samplers"][:3])
    width, height = (int(v) for v in info["default_size"].split("x"))
    sizes = (f"{width}x{height}", f"{2 * width}x{height}")
    at, out = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        body = {
            "prompt": " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 6))),
            "n": rng.randint(1, max_n),
            "seed": rng.randrange(2**31),
            "sampler": rng.choice(samplers),
            "num_inference_steps": rng.choice(WORKLOAD_STEPS),
            "size": rng.choice(sizes),
            "guidance_scale": rng.choice((1.0, 5.0)),
        }
        out.append({"at": at, "body": body})
    return out


class ServerProcess:
    """``python -m fastdiff serve`` in a child process on a free loopback port; a context manager."""

    def __init__(self, args: Sequence[str], start_timeout: float = 120.0):
        self.args = list(args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastdiff", "serve", "--port", str(_free_port()), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if "serving on" not in line:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the server did not start: {line!r}")
        self.url = line.split()[3]
        Client(self.url, timeout=self.start_timeout).healthz()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)  # a Ray server shuts its application and Ray down first
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, requests: list[dict[str, Any]], time_limit: float, engine_metrics: bool = True) -> dict[str, Any]:
    """Sends ``requests`` at their arrival times (bounded by ``time_limit``) and measures what comes back.

    ``engine_metrics``: read the engine's busy time, CPU and rows per tick from ``/metrics`` (not behind Ray's
    proxy, where each ``/metrics`` call lands on one replica of several: those columns are then None)."""
    client = Client(url, timeout=600)
    before = client.metrics()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def send(req: dict[str, Any]) -> None:
        delay = req["at"] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        status = 200
        try:
            if "prompt" in req["body"]:
                Client(url, timeout=600).generate(**req["body"])
            else:
                Client(url, timeout=600).sample(**req["body"])
        except ServerError as exc:
            status = exc.status
        done = time.perf_counter()
        with lock:
            results.append({"sent": sent - start, "done": done - start, "status": status, "n": req["body"]["n"]})

    to_send = [r for r in requests if r["at"] <= time_limit]
    with ThreadPoolExecutor(max(1, min(len(to_send), 512))) as pool:
        list(pool.map(send, to_send))
    wall = time.perf_counter() - start
    after = client.metrics()
    ok = [r for r in results if r["status"] == 200]
    span = (max(r["done"] for r in ok) - min(r["sent"] for r in results)) if ok else float("nan")
    latency = np.array([r["done"] - r["sent"] for r in ok]) if ok else np.array([float("nan")])

    def delta(name: str) -> float | None:
        return after.get(name, 0.0) - before.get(name, 0.0) if engine_metrics else None

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or den is None else num / max(den, 1e-12)

    return dict(
        sent=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        samples_per_s=sum(r["n"] for r in ok) / span,
        requests_per_s=len(ok) / span,
        p50_s=float(np.percentile(latency, 50)),
        p99_s=float(np.percentile(latency, 99)),
        engine_busy=ratio(delta("fastdiff_engine_busy_seconds_total"), wall),
        server_cpu_cores=ratio(delta("fastdiff_process_cpu_seconds_total"), wall),
        mean_time_to_first_step_s=ratio(
            delta("fastdiff_time_to_first_step_seconds_sum"), delta("fastdiff_time_to_first_step_seconds_count")
        ),
        mean_rows_per_tick=ratio(
            delta("fastdiff_batch_occupancy_sum"),
            ratio(delta("fastdiff_batch_occupancy_count"), after["fastdiff_max_batch"]),
        ),
        wall_s=wall,
    )


def unloaded_latency_ms(url: str, count: int = 40) -> float:
    """Median latency of ``count`` one-sample, one-step requests sent one after another: the fixed cost of a
    request (HTTP, parsing, queueing, one tick); the difference between setups is what a proxy adds."""
    client = Client(url, timeout=60)
    images = "pipeline" in client.info()
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        if images:
            client.generate("a cat", num_inference_steps=1, seed=i, guidance_scale=1.0)
        else:
            client.sample(n=1, steps=1, seed=i)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def setups(policies: Sequence[str], ray_replicas: Sequence[int]) -> list[tuple]:
    """(label, extra server args) for each policy, then continuous batching on Ray Serve with each replica count."""
    out = [(policy, ["--batching", policy]) for policy in policies]
    out += [(f"ray x{n}", ["--batching", "continuous", "--ray", "--replicas", str(n)]) for n in ray_replicas]
    return out


def run(
    rates: Sequence[float],
    requests: int,
    time_limit: float,
    threads: int,
    max_batch: int,
    batch_wait_ms: float,
    model: str,
    policies: Sequence[str] = POLICIES,
    seed: int = 0,
    ray_replicas: Sequence[int] = (),
    device: str | None = None,
    diffusers: str | None = None,
) -> dict[str, Any]:
    """Every setup (:func:`setups`) at every rate, the same workload for all; with the machine described.
    ``diffusers``: serve that text-to-image pipeline (``model`` unused) with the images workload."""

    import torch

    rows = []
    for policy, extra in setups(policies, ray_replicas):
        args = [
            *(["--diffusers", diffusers] if diffusers else ["--model", model]),
            "--threads",
            str(threads),
            "--max-batch",
            str(max_batch),
            "--max-queue",
            "100000",
            "--max-n",
            "8",
            "--batch-wait-ms",
            str(batch_wait_ms),
            "--timeout",
            "3600",
            *extra,
            *(["--device", device] if device else []),
        ]
        with ServerProcess(args) as server:
            info = Client(server.url).info()
            with ThreadPoolExecutor(4) as pool:  # warm-up (every replica): first-call costs stay out of the numbers
                list(pool.map(_warm_up, [server.url] * 8, [info] * 8))
            unloaded = unloaded_latency_ms(server.url)
            for rate in rates:
                load = (
                    image_workload(requests, rate, info, seed)
                    if diffusers
                    else workload(requests, rate, seed, num_classes=info["num_classes"])
                )
                res = drive(
                    server.url,
                    load,
                    time_limit,
                    engine_metrics="--ray" not in extra,
                )
                rows.append(dict(policy=policy, rate=rate, unloaded_request_ms=unloaded, **res))
                print(
                    f"{policy:>10} @ {rate:g} req/s: {res['samples_per_s']:.1f} samples/s, "
                    f"p50 {res['p50_s']:.2f} s, p99 {res['p99_s']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return dict(
        model=diffusers or model,
        device=device or "default",
        threads=threads,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        requests_per_rate=requests,
        time_limit_s=time_limit,
        host=cpu_name(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        rows=rows,
        summary=summary(rows),
    )


def _warm_up(url: str, info: dict[str, Any]) -> None:
    client = Client(url)
    if "pipeline" in info:
        width, height = (int(v) for v in info["default_size"].split("x"))
        for size in (f"{width}x{height}", f"{2 * width}x{height}"):
            client.generate("a cat", size=size, num_inference_steps=2, guidance_scale=5.0)
    else:
        client.sample(n=1, steps=2)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """At the highest rate: continuous / single throughput and the p99s of request-level and continuous."""
    top = max(r["rate"] for r in rows)
    at = {r["policy"]: r for r in rows if r["rate"] == top}
    out: dict[str, Any] = {"rate": top}
    if "continuous" in at and "single" in at:
        out["continuous_vs_single_throughput"] = at["continuous"]["samples_per_s"] / at["single"]["samples_per_s"]
    if "continuous" in at and "request" in at:
        out["p99_request_s"] = at["request"]["p99_s"]
        out["p99_continuous_s"] = at["continuous"]["p99_s"]
    return out


def format_unloaded(res: dict[str, Any]) -> str:
    """One line: each setup's unloaded one-step request latency."""
    seen = {r["policy"]: r["unloaded_request_ms"] for r in res["rows"]}
    return "unloaded 1-sample 1-step request, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in seen.items())


def format_table(res: dict[str, Any]) -> str:
    """Markdown: one line per (rate, policy)."""
    lines = [
        "| offered req/s | batching | samples/s | req/s | p50 s | p99 s | first step s | rows/tick | engine busy | "
        "server CPU cores | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(dict.fromkeys(r["policy"] for r in res["rows"]))
    for r in sorted(res["rows"], key=lambda r: (r["rate"], order.index(r["policy"]))):
        first, rows_per_tick, busy, cpu = (
            ("-", "-", "-", "-")
            if r["engine_busy"] is None
            else (
                f"{r['mean_time_to_first_step_s']:.2f}",
                f"{r['mean_rows_per_tick']:.1f}",
                f"{100 * r['engine_busy']:.0f}%",
                f"{r['server_cpu_cores']:.2f}",
            )
        )
        lines.append(
            f"| {r['rate']:g} | {r['policy']} | {r['samples_per_s']:.1f} | {r['requests_per_s']:.2f} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {first} | {rows_per_tick} | {busy} | {cpu} | {r['errors']} |"
        )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    """Latency (p50 and p99) against offered load, one line per policy."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in res["rows"]):
        rows = sorted((r for r in res["rows"] if r["policy"] == policy), key=lambda r: r["rate"])
        if rows:
            (line,) = ax.plot([r["rate"] for r in rows], [r["p99_s"] for r in rows], "o-", label=f"{policy} p99")
            ax.plot(
                [r["rate"] for r in rows],
                [r["p50_s"] for r in rows],
                "x--",
                color=line.get_color(),
                label=f"{policy} p50",
            )
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.set_title(f"fastdiff serve, {res['model']} network, {res['threads']} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fastdiff.bench serve``."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="2,5,10,20", help="Poisson arrival rates, requests/s, comma-separated")
    p.add_argument("--requests", type=int, default=60, help="requests per rate")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds of arrivals per rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="request-level batching's wait")
    p.add_argument("--model", default="digits", help="as fastdiff serve --model")
    p.add_argument("--device", default=None, help="as fastdiff serve --device (cpu, cuda)")
    p.add_argument(
        "--diffusers", default=None, metavar="PATH", help="serve this diffusers text-to-image pipeline instead"
    )
    p.add_argument("--policies", default=",".join(POLICIES), help=f"from {', '.join(POLICIES)}")
    p.add_argument(
        "--ray-replicas",
        default="",
        help="also continuous batching on Ray Serve with these replica counts, comma-separated (fastdiff[ray])",
    )
    p.add_argument("--json", default=DEFAULT_JSON, help=f"output path (default {DEFAULT_JSON}; '' for none)")
    p.add_argument("--plot", default="", help="latency-vs-load PNG path ('' for none)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of ``python -m fastdiff.bench serve``."""
    a = parser().parse_args(argv)
    rates = [float(r) for r in a.rates.split(",") if r.strip()]
    policies = [s.strip() for s in a.policies.split(",") if s.strip()]
    bad = [s for s in policies if s not in POLICIES]
    if bad or not rates or any(r <= 0 for r in rates) or a.requests < 1:
        raise SystemExit(
            f"need rates > 0, requests >= 1 and policies from {POLICIES}; got {a.rates!r}, {a.requests}, {bad}"
        )
    replicas = [int(r) for r in a.ray_replicas.split(",") if r.strip()]
    if any(r < 1 for r in replicas):
        raise SystemExit(f"--ray-replicas must be counts >= 1, got {a.ray_replicas!r}")
    res = run(
        rates,
        a.requests,
        a.time_limit,
        a.threads,
        a.max_batch,
        a.batch_wait_ms,
        a.model,
        policies,
        ray_replicas=replicas,
        device=a.device,
        diffusers=a.diffusers,
    )
    print(format_table(res))
    print(format_unloaded(res))
    print(json.dumps(res["summary"]))
    if a.json:
        write_results(a.json, res)
    if a.plot:
        plot(res, a.plot)
    return res
