"""Per-step cost outside the model: ``python -m fastdiff.bench step``.

For each sampler and state size, the same sampling loop is timed in one process with a constant model (it
returns a precomputed tensor, so nothing but the sampler's own work is measured): fastdiff's
``Pipeline.sample`` (one ``fastdiff::fused_step`` per stage; on the CPU the C++ kernel) against diffusers'
scheduler loop (``set_timesteps`` once, then ``step`` per timestep) for the scheduler running the same
algorithm. Reports ms per step for both and the ratio diffusers / fastdiff (> 1: fastdiff is faster);
best of ``--repeats`` rounds in which the two take turns. Prints a Markdown table and writes JSON (to a temporary
path, or where ``--json`` says).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from fastdiff.bench.timing import best_of_each, cpu_name, default_results_path, write_results
from fastdiff.extras import require
from fastdiff.pipeline import Pipeline
from fastdiff.schedule import Schedule

# fastdiff sampler and options -> diffusers scheduler class, its config and step() kwargs.
PEERS: dict[str, tuple] = {
    "ddim eta=0": ("ddim", {"eta": 0.0}, "DDIMScheduler", {"clip_sample": False}, {"eta": 0.0}),
    "ddim eta=1": ("ddim", {"eta": 1.0}, "DDIMScheduler", {"clip_sample": False}, {"eta": 1.0}),
    "ddpm": ("ddpm", {}, "DDPMScheduler", {"clip_sample": False}, {}),
    "euler_ancestral": ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {}, {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    "unipc": ("unipc", {}, "UniPCMultistepScheduler", {}, {}),
}
DEFAULT_SIZES = ("2,2", "4,4,64,64", "16,4,128,128")
DEFAULT_JSON = default_results_path("step.json")
"""Where a run writes unless told; the committed tables are written with ``--json bench/results/step.json`` (CPU)
or ``--json bench/results/step_cuda.json`` (GPU)."""


def measure(name: str, shape: Sequence[int], steps: int, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """ms per step of fastdiff and diffusers for the peer pair ``name`` (a key of :data:`PEERS`) on ``device``
    (on CUDA fastdiff replays its whole loop as a CUDA graph, its default there)."""
    diffusers = require("diffusers", "bench")
    sampler, options, cls_name, config, step_kwargs = PEERS[name]
    shape = tuple(int(s) for s in shape)
    const = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1).to(device)
    model = lambda x, t, **_: const  # noqa: E731  (the constant model)
    sched = Schedule.vp_discrete()
    pipe = Pipeline(model, sched, device=device)
    x_T = pipe.initial_noise(shape, seed=0)
    peer = getattr(diffusers, cls_name)(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        timestep_spacing="trailing",
        **config,
    )
    takes_generator = "generator" in __import__("inspect").signature(peer.step).parameters

    def diffusers_loop() -> torch.Tensor:
        peer.set_timesteps(steps, device=device)
        x = x_T * peer.init_noise_sigma
        extra = {"generator": torch.Generator(device=device).manual_seed(0)} if takes_generator else {}
        for t in peer.timesteps:
            x = peer.step(model(peer.scale_model_input(x, t), t), t, x, **extra, **step_kwargs).prev_sample
        return x

    ours, theirs = best_of_each(
        [
            lambda: pipe.sample(
                shape, sampler=sampler, steps=steps, x_T=x_T, spacing="trailing", progress=False, **options
            ),
            diffusers_loop,
        ],
        repeats,
        sync=torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None,
    )
    return dict(
        sampler=name,
        shape=list(shape),
        numel=int(torch.Size(shape).numel()),
        steps=steps,
        fastdiff_ms_per_step=1e3 * ours / steps,
        diffusers_ms_per_step=1e3 * theirs / steps,
        speedup=theirs / ours,
    )


def run(
    samplers: Sequence[str], sizes: Sequence[Sequence[int]], steps: int, repeats: int, device: str = "cpu"
) -> dict[str, Any]:
    """Every (sampler, size) pair, with the machine described."""
    rows: list[dict[str, Any]] = [measure(s, size, steps, repeats, device) for size in sizes for s in samplers]
    from fastdiff._ext import C

    res = dict(
        device=device,
        threads=torch.get_num_threads(),
        host=cpu_name(),
        cpu_isa=C.cpu_isa(),
        torch=torch.__version__,
        rows=rows,
    )
    if torch.device(device).type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return res


def format_table(res: dict[str, Any]) -> str:
    """Markdown: one line per (size, sampler)."""
    lines = [
        "| state | sampler | fastdiff ms/step | diffusers ms/step | diffusers / fastdiff |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['sampler']} | {r['fastdiff_ms_per_step']:.3f} | "
            f"{r['diffusers_ms_per_step']:.3f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fastdiff.bench step``."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("--samplers", default=",".join(PEERS), help=f"comma-separated, from: {', '.join(PEERS)}")
    p.add_argument("--sizes", default=";".join(DEFAULT_SIZES), help="state shapes, ';'-separated, e.g. '2,2;4,4,64,64'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (both libraries on it)")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"output path (default {DEFAULT_JSON}; '' for none)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of ``python -m fastdiff.bench step``."""
    a = parser().parse_args(argv)
    samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in PEERS]
    if unknown:
        raise SystemExit(f"unknown samplers {unknown}; choose from {list(PEERS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        device = torch.device(a.device)
    except RuntimeError as exc:
        raise SystemExit(f"--device: {exc}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"--device must be cpu or an available CUDA device, got {a.device!r}")
    sizes = [[int(v) for v in s.split(",")] for s in a.sizes.split(";") if s.strip()]
    with torch.inference_mode():
        res = run(samplers, sizes, a.steps, a.repeats, str(device))
    print(format_table(res))
    if a.json:
        write_results(a.json, res)
    return res
