"""Throughput harness: ``python -m fastdiff.bench`` (and ``bench/throughput.py``).

For one model, sample shape, batch, dtype, sampler and step count it measures, in the same process:

* fastdiff's eager loop (and, on CUDA, the whole-loop CUDA graph): samples/s and per-step latency;
* the same work through diffusers' scheduler loop (``DDIMScheduler.step``, ``DDPMScheduler.step``,
  ``DPMSolverMultistepScheduler.step``) with the same model, shape and dtype, reported as ratios;
* what one sampler step costs, outside the model: framework ops dispatched and bytes touched, counted by
  :class:`OpCounter` (a TorchDispatchMode) for ``torch.ops.fastdiff.fused_step`` and for diffusers'
  ``scheduler.step`` on the same tensors.

Writes JSON and prints a table. Speed is measured here, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastdiff.bench.timing import best_of_each, cpu_name, default_results_path, write_results
from fastdiff.extras import MissingExtra, require
from fastdiff.kernels.philox import derive_seeds
from fastdiff.pipeline import Pipeline
from fastdiff.program import build_program
from fastdiff.runtime.step import fused_step
from fastdiff.schedule import Schedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFFUSERS_SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
DEFAULT_JSON = default_results_path("throughput.json")


class OpCounter(TorchDispatchMode):
    """Counts the framework ops dispatched while active and the bytes they touch.

    Bytes touched by one op = the sizes of the distinct tensors among its inputs and outputs (a tensor
    passed in and returned, as in-place ops do, counts once; an op's out arguments count as inputs, as
    they are written). This is what the op could at most move through memory, which is the cost of an
    elementwise step. Ops are recorded by name in ``ops`` in dispatch order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = set()
        for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.bytes += t.numel() * t.element_size()
        self.ops.append(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func))
        return out

    @property
    def count(self) -> int:
        """Number of ops dispatched."""
        return len(self.ops)


class TimeMLP(torch.nn.Module):
    """The default benchmark network: an MLP on the flattened sample with a sinusoidal time embedding.

    Small and pure torch (so a CUDA graph can capture it); ``model(x, t)`` returns a tensor shaped like x.
    """

    def __init__(self, numel: int, hidden: int = 256, embed: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = embed
        self.net = torch.nn.Sequential(
            torch.nn.Linear(numel + embed, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, numel),
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(p.shape[-1])))
        freqs = torch.exp(-math.log(10000.0) * torch.arange(embed // 2) / (embed // 2))
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        t = t.to(self.freqs.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        ang = t * self.freqs
        emb = torch.cat([ang.sin(), ang.cos()], dim=1).to(x.dtype)
        h = torch.cat([x.reshape(x.shape[0], -1), emb], dim=1)
        return self.net(h).reshape(x.shape)


def make_model(
    name: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype, schedule: Schedule
) -> Callable[..., torch.Tensor]:
    """``"digits"``: the shipped digits U-Net (:func:`fastdiff.pretrained.digits`, sample shape (1, 8, 8));
    ``"mlp"``: :class:`TimeMLP`; ``"gmm"``: the exact network of the demo's Gaussian mixture (2-D samples);
    ``"package.module:factory"``: your own network, ``factory(shape, device, dtype)`` returning an eps-predicting
    ``model(x, t)`` for the discrete VP schedule."""
    numel = int(math.prod(shape[1:]))
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(tuple(shape), device, dtype)
    if name == "digits":
        from fastdiff.pretrained import digits

        if tuple(shape[1:]) != (1, 8, 8):
            raise ValueError(f"model 'digits' draws (1, 8, 8) images; got sample shape {tuple(shape[1:])}")
        return digits(device=device, dtype=dtype).model
    if name == "mlp":
        return TimeMLP(numel).to(device=device, dtype=dtype).eval()
    if name == "gmm":
        from fastdiff.demos.mixture import default_mixture

        if numel != 2:
            raise ValueError(f"model 'gmm' draws 2-D samples; got sample shape {tuple(shape[1:])}")
        return default_mixture().as_model(schedule, "eps")
    raise ValueError(f"model must be 'digits', 'mlp', 'gmm' or 'package.module:factory', got {name!r}")


def diffusers_scheduler(sampler: str, schedule_kwargs: dict[str, Any]):
    """diffusers' scheduler doing the same update as fastdiff's ``sampler`` on a linear-beta VP schedule."""
    diffusers = require("diffusers", "bench")
    if sampler not in DIFFUSERS_SAMPLERS:
        raise ValueError(f"no diffusers peer for sampler {sampler!r}; peers exist for {sorted(DIFFUSERS_SAMPLERS)}")
    cls = getattr(diffusers, DIFFUSERS_SAMPLERS[sampler])
    kw = dict(
        num_train_timesteps=1000,
        beta_start=schedule_kwargs["beta_start"],
        beta_end=schedule_kwargs["beta_end"],
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    if sampler == "ddim":
        kw.update(clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    elif sampler == "ddpm":
        kw.update(clip_sample=False, variance_type="fixed_small")
    else:
        kw.update(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    return cls(**kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_step_call(
    sampler: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype, schedule: Schedule, steps: int
) -> tuple[torch.Tensor, torch.Tensor, int, Callable[[], None]]:
    """The state ``x``, model output ``m``, the stage ``k`` (the middle of a ``steps``-step run of ``sampler``) and
    a call of ``torch.ops.fastdiff.fused_step`` for that stage on them (seeded tensors; outputs to buffers made here).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
    m = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
    grid = schedule.grid(steps, spacing="leading")
    prog = build_program(schedule, grid, sampler, "eps", device)
    seeds = derive_seeds(0, shape[0]).to(device)
    k = prog.stages // 2  # a stage in the middle of the run
    slots = [torch.empty_like(x) for _ in range(prog.slots)]
    out = torch.empty_like(x)
    nonfinite = torch.full((shape[0],), torch.iinfo(torch.int32).max, dtype=torch.int32, device=device)
    write = prog.writes(k)

    def call() -> None:
        fused_step(
            x=x,
            m=m,
            history=[slots[i] for i in prog.reads(k)],
            coeffs=prog.coef_device,
            stage=k,
            seeds=seeds,
            use_noise=prog.uses_noise(k),
            x_out=out,
            h_out=slots[write] if write >= 0 else None,
            nonfinite=nonfinite,
        )

    return x, m, k, call


def step_cost(
    sampler: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype, schedule: Schedule, steps: int
) -> dict[str, dict[str, float]]:
    """Framework ops and bytes of one sampler step (the model excluded), fastdiff vs diffusers, same tensors."""
    x, m, k, call = fused_step_call(sampler, shape, device, dtype, schedule, steps)
    ours = OpCounter()
    with ours:
        call()
    result = {"fastdiff": {"ops": ours.count, "bytes": ours.bytes, "bytes_per_element": ours.bytes / x.numel()}}
    if sampler in DIFFUSERS_SAMPLERS:
        sched = diffusers_scheduler(sampler, _vp_params(schedule))
        sched.set_timesteps(steps)
        ts = list(sched.timesteps)
        for t in ts[:k]:  # bring multistep schedulers to the same point (their history filled)
            sched.step(m, t, x)
        theirs = OpCounter()
        step_gen = torch.Generator(device=device).manual_seed(0)
        with theirs:
            if sampler == "ddpm":
                sched.step(m, ts[k], x, generator=step_gen)
            else:
                sched.step(m, ts[k], x)
        result["diffusers"] = {
            "ops": theirs.count,
            "bytes": theirs.bytes,
            "bytes_per_element": theirs.bytes / x.numel(),
            "op_names": theirs.ops,
        }
    result["fastdiff"]["op_names"] = ours.ops
    return result


def _vp_params(schedule: Schedule) -> dict[str, float]:
    # The benchmark uses Schedule.vp_discrete() with diffusers' default linear betas.
    return {"beta_start": 1e-4, "beta_end": 0.02}


def run(
    model: str = "digits",
    shape: Sequence[int] = (1, 8, 8),
    batch: int = 64,
    dtype: str = "float32",
    sampler: str = "ddim",
    steps: int = 50,
    repeats: int = 3,
    device: str | None = None,
) -> dict[str, Any]:
    """Runs every measurement; returns the JSON-ready result."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tdtype = DTYPES[dtype]
    full = (int(batch), *(int(s) for s in shape))
    schedule = Schedule.vp_discrete(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    net = make_model(model, full, dev, tdtype, schedule)
    pipe = Pipeline(net, schedule, prediction="eps", device=dev, dtype=tdtype)
    res: dict[str, Any] = dict(
        model=model,
        shape=list(shape),
        batch=int(batch),
        dtype=dtype,
        sampler=sampler,
        steps=int(steps),
        device=str(dev),
        repeats=int(repeats),
        host=cpu_name(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    x_T = pipe.initial_noise(full, seed=0)
    with torch.inference_mode():
        runs = _contenders(pipe, net, sampler, steps, x_T, res)
        # All take turns (fastdiff, diffusers, the model alone), so the machine's drift does not favour one.
        timings = dict(zip(runs, best_of_each(list(runs.values()), repeats, sync=lambda: _sync(dev))))
    _summarise(res, timings, full[0], steps)
    with torch.inference_mode():
        res["step_cost"] = step_cost(sampler, full, dev, tdtype, schedule, steps)
    return res


def _contenders(
    pipe: Pipeline, net: Callable[..., torch.Tensor], sampler: str, steps: int, x_T: torch.Tensor, res: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    """What is timed: fastdiff eager (and its CUDA graph), diffusers' loop on the same x_T and the model alone; each
    run once here, and how far the results differ written into ``res``."""
    full, dev = tuple(x_T.shape), x_T.device
    kw = dict(sampler=sampler, steps=steps, seed=0, spacing="leading", x_T=x_T, progress=False)
    runs: dict[str, Callable[[], Any]] = {"fastdiff_eager": lambda: pipe.sample(full, cuda_graph=False, **kw)}
    ours = pipe.sample(full, cuda_graph=False, **kw)
    if dev.type == "cuda":
        try:
            graph_out = pipe.sample(full, cuda_graph=True, **kw)
            runs["fastdiff_graph"] = lambda: pipe.sample(full, cuda_graph=True, **kw)
            res["max_abs_diff_graph_vs_eager"] = float((graph_out.float() - ours.float()).abs().max())
        except Exception as e:  # noqa: BLE001  (e.g. a model that syncs with the host cannot be captured)
            res["graph_error"] = f"{type(e).__name__}: {e}"
    if sampler not in DIFFUSERS_SAMPLERS:
        return runs
    sched = diffusers_scheduler(sampler, _vp_params(pipe.schedule))

    def diffusers_loop() -> torch.Tensor:
        sched.set_timesteps(steps, device=dev)
        x = x_T.clone()
        gen = torch.Generator(device=dev).manual_seed(0)
        for t in sched.timesteps:
            m = net(x, t.expand(x.shape[0]).to(torch.float32))
            x = sched.step(m, t, x, generator=gen).prev_sample if sampler == "ddpm" else sched.step(m, t, x).prev_sample
        return x

    runs["diffusers"] = diffusers_loop
    theirs = diffusers_loop()
    if not DIFFUSERS_SAMPLERS_STOCHASTIC.get(sampler, False):
        res["max_abs_diff_vs_diffusers"] = float((ours.float() - theirs.float()).abs().max())
    # The model alone, so the sampler's own share of a step can be read off.
    t_model = torch.full((full[0],), 500.0, device=dev)
    runs["model_only"] = lambda: [net(x_T, t_model) for _ in range(steps)]
    return runs


def _summarise(res: dict[str, Any], timings: dict[str, float], batch: int, steps: int) -> None:
    """Samples per second, ms per step, the ratios to diffusers and the sampler's own ms per step, into ``res``."""
    res["seconds"] = timings
    res["samples_per_s"] = {k: batch / v for k, v in timings.items() if k != "model_only"}
    res["step_latency_ms"] = {k: 1e3 * v / steps for k, v in timings.items()}
    if "diffusers" in timings:
        res["speedup_vs_diffusers"] = {
            k: timings["diffusers"] / v for k, v in timings.items() if k.startswith("fastdiff")
        }
        model_s = timings["model_only"]
        res["sampler_overhead_ms_per_step"] = {
            k: 1e3 * (v - model_s) / steps for k, v in timings.items() if k != "model_only"
        }
    if "fastdiff_graph" in timings:
        res["graph_speedup_vs_eager"] = timings["fastdiff_eager"] / timings["fastdiff_graph"]


DIFFUSERS_SAMPLERS_STOCHASTIC = {"ddpm": True}


def format_table(res: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    lines = [
        f"model={res['model']} batch={res['batch']} shape={tuple(res['shape'])} dtype={res['dtype']} "
        f"sampler={res['sampler']} steps={res['steps']} device={res['device']} threads={res['threads']}",
        f"{'run':<16}{'samples/s':>12}{'ms/step':>10}{'vs diffusers':>14}",
    ]
    for name, sps in res["samples_per_s"].items():
        ratio = res.get("speedup_vs_diffusers", {}).get(name)
        lines.append(
            f"{name:<16}{sps:>12.1f}{res['step_latency_ms'][name]:>10.3f}"
            f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>14}"
        )
    if "model_only" in res["step_latency_ms"]:
        lines.append(f"{'(model alone)':<16}{'':>12}{res['step_latency_ms']['model_only']:>10.3f}")
    lines.append(f"{'one step':<16}{'ops':>12}{'bytes':>12}{'B/elem':>10}")
    for name, c in res["step_cost"].items():
        lines.append(f"{name:<16}{c['ops']:>12}{c['bytes']:>12}{c['bytes_per_element']:>10.1f}")
    if "max_abs_diff_vs_diffusers" in res:
        lines.append(f"max |fastdiff - diffusers| on the same x_T: {res['max_abs_diff_vs_diffusers']:.2e}")
    return "\n".join(lines)


SUBCOMMANDS = {
    "step": "fastdiff.bench.step",
    "serve": "fastdiff.bench.serve",
    "bandwidth": "fastdiff.bench.bandwidth",
    "gpu-check": "fastdiff.bench.gpu_check",
    "tune": "fastdiff.bench.tune",
}
"""``python -m fastdiff.bench NAME ...``: the module whose ``main`` runs instead of the throughput harness."""


def parser(default_json: str | None = DEFAULT_JSON) -> argparse.ArgumentParser:
    """The throughput harness's command line."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="digits",
        help="'digits' (the shipped U-Net), 'mlp', 'gmm' or 'package.module:factory' (see make_model)",
    )
    p.add_argument("--shape", default="1,8,8", help="sample shape without the batch, comma-separated")
    p.add_argument("--batch", type=_int_list, default=[64], help="batch size, or several comma-separated")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=_int_list, default=[50], help="step count, or several comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--json",
        default=default_json,
        help=f"output path, merged with what is there (default {default_json}; '' for none)",
    )
    return p


def _int_list(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (at least one positive integer)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def merge_results(path: str, res: dict[str, Any]) -> None:
    """Writes ``res`` into the JSON list at ``path``, replacing an earlier result of the same configuration."""
    results = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
            results = old if isinstance(old, list) else [old]
        except (OSError, ValueError):
            results = []
    same = ("model", "shape", "batch", "dtype", "sampler", "steps", "device")
    results = [r for r in results if any(r.get(k) != res[k] for k in same)] + [res]
    write_results(path, results)


def main(argv: Sequence[str] | None = None, default_json: str | None = DEFAULT_JSON) -> dict[str, Any]:
    """Command line: parse, run, print the table, write JSON (``--json``; ``--json ''`` writes none).

    With several ``--batch`` or ``--steps`` values every pair is run in turn, in one process (the model built once
    where its factory caches it), each result written as soon as it is measured; the last one is returned.
    ``python -m fastdiff.bench NAME ...`` runs :data:`SUBCOMMANDS`'s module instead: ``step`` the per-step benchmark,
    ``serve`` the serving load benchmark, ``bandwidth`` the fused step against a copy, ``gpu-check`` all of them on
    a lent GPU.
    """
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    a = parser(default_json).parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(",") if s.strip())
    res: dict[str, Any] = {}
    for batch in a.batch:
        for steps in a.steps:
            res = run(a.model, shape, batch, a.dtype, a.sampler, steps, a.repeats, a.device)
            print(format_table(res), flush=True)
            if a.json:
                merge_results(a.json, res)
    return res


def command_line() -> None:
    """``python -m fastdiff.bench``: :func:`main`, with a missing extra said in one line rather than a traceback."""
    try:
        main()
    except MissingExtra as exc:
        raise SystemExit(f"python -m fastdiff.bench: error: {exc}") from None


if __name__ == "__main__":
    command_line()
