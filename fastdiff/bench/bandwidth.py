"""The fused step's memory bandwidth against a plain copy: ``python -m fastdiff.bench bandwidth``.

On one state of ``--numel`` elements, times ``torch.ops.fastdiff.fused_step`` for a middle stage of ``--sampler``
(plain DDIM by default: it reads x and the model output and writes x, ~12 bytes per fp32 element) and
``torch.empty_like(x).copy_(x)`` (reads and writes x: 8 bytes per fp32 element), the two taking turns, and reports
for each the time per call and the bytes moved per second. The step's bytes are counted, not assumed: those of the
distinct tensors it reads and writes (:class:`~fastdiff.bench.throughput.OpCounter`). A step near the copy's rate
is bound by memory, as an elementwise step should be.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastdiff.bench.throughput import DTYPES, OpCounter, fused_step_call
from fastdiff.bench.timing import best_of_each, cpu_name, default_results_path, write_results
from fastdiff.schedule import Schedule

DEFAULT_JSON = default_results_path("bandwidth.json")


def _repeated(fn: Callable[[], Any], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def run(numel: int, sampler: str, dtype: str, device: str, calls: int, repeats: int) -> dict[str, Any]:
    """Seconds per call and bytes per second of the fused step and of a copy, on ``numel`` elements."""
    dev = torch.device(device)
    shape = (1, int(numel))
    x, _, _, step = fused_step_call(sampler, shape, dev, DTYPES[dtype], Schedule.vp_discrete(), 50)
    with OpCounter() as counted:
        step()
    copy = lambda: torch.empty_like(x).copy_(x)  # noqa: E731
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    step_s, copy_s = (t / calls for t in best_of_each([_repeated(step, calls), _repeated(copy, calls)], repeats, sync))
    step_bytes, copy_bytes = counted.bytes, 2 * x.numel() * x.element_size()
    res: dict[str, Any] = dict(
        numel=int(numel),
        sampler=sampler,
        dtype=dtype,
        device=str(dev),
        host=cpu_name(),
        torch=torch.__version__,
        fused_step=dict(seconds=step_s, bytes=step_bytes, bytes_per_element=step_bytes / x.numel()),
        copy=dict(seconds=copy_s, bytes=copy_bytes, bytes_per_element=copy_bytes / x.numel()),
    )
    for name in ("fused_step", "copy"):
        res[name]["bytes_per_s"] = res[name]["bytes"] / res[name]["seconds"]
    res["step_over_copy_bandwidth"] = res["fused_step"]["bytes_per_s"] / res["copy"]["bytes_per_s"]
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    return res


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fastdiff.bench bandwidth``."""
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=16 * 2**20, help="elements of the state (default 16M)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=20, help="calls per timed round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=DEFAULT_JSON, help=f"output path (default {DEFAULT_JSON}; '' for none)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: run, print one line per contender, write JSON."""
    a = parser().parse_args(argv)
    with torch.inference_mode():
        res = run(a.numel, a.sampler, a.dtype, a.device, a.calls, a.repeats)
    for name in ("fused_step", "copy"):
        r = res[name]
        gbps, per_element = r["bytes_per_s"] / 1e9, r["bytes_per_element"]
        print(f"{name:<11}{1e6 * r['seconds']:>10.1f} us  {gbps:>8.1f} GB/s  {per_element:.1f} B/elem")
    if a.json:
        write_results(a.json, res)
    return res
