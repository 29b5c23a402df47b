"""One fused step on paper: global bytes per state element, noise instructions per element and the time a step
should take at a GPU's memory bandwidth (docs/benchmarks.md, "The step on paper").

The step is a memory stream: each element of the state is read once per input stream (x, m, the unconditional
output, explicit noise, the history slots it reads) and written once per output stream (x_out, the history slot
and x0 it writes), with nothing else per element (the coefficient row, seed and guidance weight are per sample,
read once per block). Philox noise is made in registers, so it costs instructions, not bytes.
:func:`bytes_per_element` is that count from the kernel's flags (:func:`fastdiff.kernels.fused_step.kernel_constexprs`);
tests/kernels/test_compile.py checks it against the global accesses of the PTX Triton compiles for sm_80 and sm_90
(:func:`ptx_stream_bytes_per_element`), and measures the noise's instructions there
(:func:`ptx_instruction_count`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

H100_SXM_BANDWIDTH = 3.35e12  # bytes/s, HBM3 (NVIDIA's H100 SXM5 figure)
ELEMENTS_PER_THREAD = 8  # BLOCK_SIZE 1024 over 4 warps of 32 threads
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global(?:\.[a-z0-9_]+)*?\.v(\d)\.b(\d+)\s", re.M)
_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?[a-z][a-z0-9_.]*\s[^;]*;", re.M)


def bytes_per_element(flags: Mapping[str, int | bool], state: torch.dtype, model: torch.dtype) -> int:
    """Global bytes one fused step moves per state element for the kernel specialisation ``flags`` (outside
    per-row mode), with a state of dtype ``state`` and model outputs (and explicit noise) of dtype ``model``."""
    if flags.get("PER_ROW"):
        raise ValueError("per-row mode reads the history slots each row names: count them per row")
    s, m = torch.empty((), dtype=state).element_size(), torch.empty((), dtype=model).element_size()
    reads = s * (1 + int(flags["NUM_HIST"])) + m * (1 + int(flags["HAS_UNCOND"]) + int(flags["EXPLICIT_NOISE"]))
    writes = s * (1 + int(flags["WRITE_H"]) + int(flags["WRITE_X0"]))
    return reads + writes


def ptx_stream_bytes_per_element(ptx: str) -> float:
    """Bytes per element of the vector (``.v2``/``.v4``) global loads and stores in ``ptx``: the state-sized streams
    of a step compiled with 16-byte aligned pointers (per-sample scalars are scalar accesses)."""
    total = sum(int(lanes) * int(bits) // 8 for _, lanes, bits in _GLOBAL_ACCESS.findall(ptx))
    return total / ELEMENTS_PER_THREAD


def ptx_instruction_count(ptx: str) -> int:
    """Instructions in ``ptx`` (directives, labels and declarations left out)."""
    return len(_INSTRUCTION.findall(ptx))


def predicted_seconds(numel: int, per_element: float, bandwidth: float = H100_SXM_BANDWIDTH) -> float:
    """The time a step moving ``per_element`` bytes per element of a ``numel``-element state takes at ``bandwidth``
    bytes/s (the memory-bound floor: launch latency and the tail of a small grid come on top)."""
    return numel * per_element / bandwidth


__all__ = [
    "ELEMENTS_PER_THREAD",
    "H100_SXM_BANDWIDTH",
    "bytes_per_element",
    "predicted_seconds",
    "ptx_instruction_count",
    "ptx_stream_bytes_per_element",
]
