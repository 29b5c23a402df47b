"""Everything a lent GPU should measure, in one command: ``python -m fastdiff.bench gpu-check`` (``make gpu-check``).

Runs, in this order (cheapest and most important first), each in its own process with its own time budget, the
remaining total budget (``--budget-s``, 480 s by default: 8 minutes) printed after each:

1. ``cuda_tests``: the CUDA tests (``pytest -m cuda``, Triton compiling, as ``make gpu-test``);
2. ``bandwidth``: the fused DDIM step against ``torch.empty_like(x).copy_(x)`` on 16M fp32 elements, bytes/s;
3. ``step``: the per-step benchmark on CUDA (fastdiff's replayed graph against diffusers' scheduler loop);
4. ``e2e_digits``: the end-to-end benchmark with the shipped digits network (graph vs eager vs diffusers' loop);
5. ``serve``: the serving engine under load on CUDA (one request at a time vs step-level batching, a short run);
6. ``e2e_sd_unet``: the end-to-end benchmark with an SD-1.5-shaped UNet (:mod:`fastdiff.bench.models`, random
   weights, fp16, 64x64 latents) at batch 1 and 8, 4/10/25/50 steps.

A failing or overrunning step is recorded (its error, exit status and last output lines) and the next one runs.
One JSON file holds the device, driver, CUDA/torch/triton versions and every step's figures; it is rewritten after
each step. ``--dry-run`` (no GPU needed) checks the plan instead: every step's command exists and its arguments
parse, every model factory imports and builds on the CPU at a tiny size, and writes the skeleton, device
"dry-run", each step "planned".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.bench.throughput import SUBCOMMANDS, make_model
from fastdiff.bench.throughput import parser as throughput_parser
from fastdiff.bench.timing import cpu_name, default_results_path, write_results
from fastdiff.schedule import Schedule

DEFAULT_JSON = default_results_path("gpu-{device}.json")
DEFAULT_BUDGET_S = 480.0
MIN_STEP_S = 10.0
"""A step with less than this left of the total budget is skipped, not started."""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD_UNET = "fastdiff.bench.models:sd15_unet"


@dataclass(frozen=True)
class Step:
    """One measurement: ``bench`` is the argument list of ``python -m fastdiff.bench`` (``None``: the CUDA tests);
    ``dry_models`` the ``(model, sample shape with batch)`` pairs the dry run builds on the CPU."""

    name: str
    what: str
    budget_s: float
    bench: tuple[str, ...] | None
    dry_models: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())


PLAN: tuple[Step, ...] = (
    Step("cuda_tests", "pytest -m cuda, Triton kernels compiled (as make gpu-test)", 120, None),
    Step(
        "bandwidth",
        "fused DDIM step vs torch.empty_like(x).copy_(x), 16M fp32 elements, bytes/s",
        30,
        ("bandwidth", "--device", "cuda", "--numel", str(16 * 2**20), "--dtype", "float32"),
    ),
    Step(
        "step",
        "per-step cost, constant model: fastdiff's CUDA graph vs diffusers' scheduler loop",
        45,
        (
            "step",
            "--device",
            "cuda",
            "--samplers",
            "ddim eta=0,ddpm,dpmpp_2m,unipc",
            "--sizes",
            "4,4,64,64;16,4,128,128",
        )
        + ("--steps", "20", "--repeats", "5"),
    ),
    Step(
        "e2e_digits",
        "end to end, shipped digits network: CUDA graph vs eager vs diffusers' loop",
        40,
        ("--device", "cuda", "--model", "digits", "--batch", "64", "--steps", "10,50", "--repeats", "3"),
        (("digits", (2, 1, 8, 8)),),
    ),
    Step(
        "serve",
        "serving engine under load on CUDA: one request at a time vs step-level batching",
        90,
        ("serve", "--device", "cuda", "--policies", "single,continuous", "--rates", "10,40", "--requests", "40")
        + ("--time-limit", "10", "--threads", "4"),
        (("digits", (2, 1, 8, 8)),),
    ),
    Step(
        "e2e_sd_unet",
        "end to end, SD-1.5-shaped UNet (random weights, fp16, 4x64x64 latents, [B,77,768] context), batch 1 and 8, "
        "4/10/25/50 steps: CUDA graph vs eager vs diffusers' loop",
        150,
        ("--device", "cuda", "--model", SD_UNET, "--shape", "4,64,64", "--dtype", "float16")
        + ("--batch", "1,8", "--steps", "4,10,25,50", "--repeats", "2"),
        ((SD_UNET + "_tiny", (2, 4, 8, 8)),),
    ),
)


def bench_args(step: Step) -> list[str]:
    """The arguments of ``python -m fastdiff.bench`` for ``step`` (without ``--json``)."""
    return list(step.bench or ())


def command(step: Step, json_path: str) -> list[str]:
    """The process ``step`` runs: the CUDA tests with the pytest script, else ``python -m fastdiff.bench``."""
    if step.bench is None:
        script = os.path.join(os.path.dirname(sys.executable), "pytest")
        runner = [script] if os.path.exists(script) else [sys.executable, "-m", "pytest"]
        return [*runner, "-q", "-m", "cuda", os.path.join(REPO, "tests")]
    return [sys.executable, "-m", "fastdiff.bench", *bench_args(step), "--json", json_path]


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _driver() -> str | None:
    """The NVIDIA driver's version, from ``nvidia-smi`` (None where it cannot say)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(dry_run: bool) -> dict[str, Any]:
    """Device name, driver, CUDA/torch/triton/Python versions and the host CPU."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = dict(
        device="dry-run",
        driver=None,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        host=cpu_name(),
    )
    if not dry_run:
        if not torch.cuda.is_available():
            raise SystemExit("python -m fastdiff.bench gpu-check: no CUDA device here (--dry-run checks the plan)")
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            driver=_driver(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return info


def check_step(step: Step) -> dict[str, Any]:
    """The dry run of one step: its command exists and its arguments parse, its models build and run on the CPU
    at a tiny size. Returns the step's skeleton record, ``status`` "planned" (or "invalid", with the error)."""
    record = skeleton(step, "planned")
    try:
        if step.bench is None:
            if not os.path.isdir(os.path.join(REPO, "tests")):
                raise FileNotFoundError(f"no tests folder under {REPO}")
            importlib.import_module("pytest")
        else:
            args = bench_args(step)
            sub = args[0] if args[0] in SUBCOMMANDS else None
            cli = importlib.import_module(SUBCOMMANDS[sub]).parser() if sub else throughput_parser()
            try:
                parsed = cli.parse_args(args[1:] if sub else args)
            except SystemExit as exc:
                raise ValueError(f"arguments do not parse: {shlex.join(args)}") from exc
            model = getattr(parsed, "model", None)
            if model and ":" in model:
                module, _, attr = model.partition(":")
                getattr(importlib.import_module(module), attr)  # the full-size factory exists
        record["dry_models"] = [_build_tiny(name, shape) for name, shape in step.dry_models]
    except Exception as exc:  # noqa: BLE001  (every step is checked; each failure is reported)
        record.update(status="invalid", error=f"{type(exc).__name__}: {exc}")
    return record


def _build_tiny(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Builds ``name`` on the CPU for samples of ``shape`` and runs it once; what came out."""
    schedule = Schedule.vp_discrete(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    net = make_model(name, shape, torch.device("cpu"), torch.float32, schedule)
    with torch.inference_mode():
        out = net(torch.randn(shape), torch.full((shape[0],), 500.0))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"model {name!r} returned shape {tuple(out.shape)} for samples of shape {tuple(shape)}")
    return dict(model=name, shape=list(shape), output_finite=bool(torch.isfinite(out).all()))


def skeleton(step: Step, status: str) -> dict[str, Any]:
    """A step's record before it runs."""
    return dict(
        name=step.name,
        what=step.what,
        budget_s=step.budget_s,
        command=shlex.join(command(step, f"<{step.name}.json>")),
        status=status,
    )


def run_step(step: Step, timeout: float, workdir: str) -> dict[str, Any]:
    """Runs ``step`` in its own process group (killed with everything it started once ``timeout`` passes), its
    output echoed; its record: status ("ok", "failed", "timeout"), seconds, exit status, the last output lines and
    the JSON the step wrote (``result``)."""
    json_path = os.path.join(workdir, f"{step.name}.json")
    record = skeleton(step, "running")
    record["command"] = shlex.join(command(step, json_path))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command(step, json_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    reader = threading.Thread(target=_echo, args=(proc, tail), daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
        record["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        record["status"] = "timeout"
    reader.join(10)
    record.update(seconds=round(time.perf_counter() - t0, 1), returncode=proc.returncode, output_tail=list(tail))
    if os.path.exists(json_path):
        with open(json_path) as f:
            record["result"] = json.load(f)
    return record


def _echo(proc: subprocess.Popen, tail: deque[str]) -> None:
    """Copies the child's output to ours, keeping the last lines in ``tail``."""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))


def run(budget_s: float, json_path: str, only: Sequence[str] = (), dry_run: bool = False) -> dict[str, Any]:
    """Every step of :data:`PLAN` (``only``: those named) in order within ``budget_s`` seconds in all, or with
    ``dry_run`` their checks; the JSON (``{device}`` in ``json_path`` replaced by the device's slug) rewritten after
    each step. Returns what was written."""
    res: dict[str, Any] = dict(environment(dry_run), budget_s=budget_s, steps=[])
    path = json_path.replace("{device}", slug(res["device"]))
    steps = [s for s in PLAN if not only or s.name in only]
    deadline = time.perf_counter() + budget_s
    with tempfile.TemporaryDirectory(prefix="fastdiff-gpu-check-") as workdir:
        for step in steps:
            left = deadline - time.perf_counter()
            if dry_run:
                record = check_step(step)
            elif left < MIN_STEP_S:
                record = dict(skeleton(step, "skipped"), error=f"{left:.0f} s of the budget left")
            else:
                print(f"[gpu-check] {step.name} (budget {step.budget_s:.0f} s): {step.what}", flush=True)
                record = run_step(step, min(step.budget_s, left), workdir)
            res["steps"].append(record)
            left = deadline - time.perf_counter()
            print(f"[gpu-check] {step.name}: {record['status']}; {left:.0f} s of {budget_s:.0f} s left", flush=True)
            write_results(path, res)
    res["path"] = os.path.abspath(path)
    return res


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fastdiff.bench gpu-check``."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="check the plan on any machine; write the skeleton")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"output path, {{device}}: the device's slug ({DEFAULT_JSON})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    p.add_argument("--only", default="", help=f"comma-separated step names, from {', '.join(s.name for s in PLAN)}")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: the plan's budgets, then each step (or its check), then a one-line summary per step."""
    a = parser().parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only) - {s.name for s in PLAN})
    if unknown:
        raise SystemExit(f"--only: unknown steps {unknown}; choose from {[s.name for s in PLAN]}")
    total = sum(s.budget_s for s in PLAN if not only or s.name in only)
    print(f"[gpu-check] {'dry run, ' if a.dry_run else ''}{total:.0f} s of step budgets, {a.budget_s:.0f} s in all")
    res = run(a.budget_s, a.json, only, a.dry_run)
    for r in res["steps"]:
        print(f"{r['name']:<12} {r['status']:<8} {r.get('seconds', '-'):>6} s  {r.get('error', '')}")
    return res
