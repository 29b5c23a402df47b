"""Timing for the benchmarks (the measured functions take turns, so a machine whose speed drifts slows all alike)
and the description of the machine they ran on."""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from typing import Any, Callable, List, Sequence


def default_results_path(name: str) -> str:
    """Where a benchmark writes its JSON unless ``--json`` says otherwise: ``fastdiff-bench/<name>`` in the
    temporary folder. The repository's ``bench/results/`` is written only when asked for by name."""
    return os.path.join(tempfile.gettempdir(), "fastdiff-bench", name)


def write_results(path: str, results: Any) -> str:
    """Writes ``results`` as JSON to ``path`` (folders made as needed), says where, and returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"results written to {path}")
    return path


def best_of_each(fns: Sequence[Callable[[], Any]], repeats: int, sync: Callable[[], None] = lambda: None
                 ) -> List[float]:
    """Best wall time (seconds) of each function over ``repeats`` rounds, the functions taking turns within a round
    (a machine whose speed drifts, a shared or throttled core, then slows every side of a ratio alike), after one
    warm-up call of each (on CUDA, also the graph capture). ``sync`` waits for the device before each clock
    reading."""
    for fn in fns:
        fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
