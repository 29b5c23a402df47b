"""``torch.ops.fastdiff.fused_step``: the fused sampler step as one registered op.

The op is defined with ``torch.library.Library`` (schema below) and has a kernel per device: on CPU the
C++ fused step, on CUDA the Triton kernel (fastdiff/kernels/fused_step.py), plus a fake kernel for tracing.
torch.compile, CUDA graphs and a TorchDispatchMode see exactly one op per step on any device.

The CPU kernel is registered in C++ (fastdiff._ops, csrc/torch/fused_step_op.cpp) where that extension is
built: it checks the arguments and runs the C++ step with no Python in between (~4 us of dispatch). What its
fast path does not take (non-contiguous or mixed-dtype arguments, bad per-row arguments) it passes to
``fastdiff::fused_step_any``, the same op with the Python CPU kernel (fastdiff/kernels/cpu.py: conversions, the
reference fallback, the argument errors). Without fastdiff._ops (or with ``FASTDIFF_PYTHON_CPU_KERNEL=1``)
that Python kernel is fused_step's CPU kernel itself.

Why not ``torch.library.triton_op`` (which this op was first): its Python-level dispatch costs grow with
the number of arguments, ~0.3 ms per call for this 19-argument op on the CPU, more than the whole C++ step
at 64k elements; a Python ``Library`` kernel is reached in ~12 us, the C++ one in ~4 us. torch.compile sees
the op as opaque either way for our purposes (one op per step); what triton_op added, tracing into the
Triton kernel, is not needed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch

from fastdiff.kernels import philox as _philox  # noqa: F401  (registers fastdiff::philox_normal)
from fastdiff.kernels.cpu import fused_step_cpu
from fastdiff.kernels.fused_step import launch_fused_step
from fastdiff.kernels.ops_version import built_torch_version
from fastdiff.kernels.reference import fused_step_reference

SCHEMA = (
    "fused_step(Tensor x, Tensor m, Tensor? m_uncond, float guidance_scale, Tensor[] hist, Tensor coeffs, "
    "int stage, Tensor seeds, int stream, bool use_noise, Tensor? noise, Tensor(a!) x_out, Tensor(b!)? h_out, "
    "Tensor(c!)? x0_out, Tensor(d!) nonfinite, Tensor? clip=None, Tensor? rows=None, Tensor(e!)? pool=None, "
    "Tensor? row_guidance=None, Tensor? init=None, Tensor? mask=None, Tensor? blend=None, "
    "Tensor? init_noise=None) -> ()"
)

_lib = torch.library.Library("fastdiff", "FRAGMENT")
_lib.define(SCHEMA)
# The same op with the Python CPU kernel: where the C++ CPU kernel sends what its fast path does not take.
_lib.define(SCHEMA.replace("fused_step(", "fused_step_any(", 1))


def _fused_step_cuda(x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """The op's CUDA kernel: the Triton launch (the schema's arguments, in order) on ``x``'s device."""
    with torch.cuda.device(x.device):
        launch_fused_step(x, *args, **kwargs)


def _fused_step_fake(*args, **kwargs) -> None:
    return None


cpu_kernel = fused_step_cpu
"""What the Python CPU kernel runs (looked up per call, so a test can swap in the Triton launch or the reference)."""


def _fused_step_on_cpu(*args, **kwargs) -> None:
    cpu_kernel(*args, **kwargs)


def _load_cpp_cpu_kernel() -> bool:
    """Loads fastdiff._ops, whose C++ CPU kernel of fused_step reaches the C++ step without Python in between
    (csrc/torch/fused_step_op.cpp); False where it is not built or does not load (then the Python kernel runs)."""
    if os.environ.get("FASTDIFF_PYTHON_CPU_KERNEL", "") not in ("", "0"):
        return False
    spec = importlib.util.find_spec("fastdiff._ops")
    if spec is None or spec.origin is None:
        return False
    built_with = built_torch_version(spec.origin)
    if built_with != torch.__version__:  # its C++ ABI is that torch's: loading it could crash, not just fail
        warnings.warn(
            f"fastdiff._ops was built against torch {built_with or '(unknown)'}, this is torch "
            f"{torch.__version__}: not loaded; fastdiff::fused_step runs its Python CPU kernel. Rebuild it "
            "with `make install` (or `python setup.py build_ext --inplace`).",
            stacklevel=2,
        )
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # built against another torch, say: correct results still, ~8 us more per step
        warnings.warn(
            f"fastdiff._ops did not load ({exc}); fastdiff::fused_step runs its Python CPU kernel. "
            "Rebuild it with `make install` (or `python setup.py build_ext --inplace`).",
            stacklevel=2,
        )
        return False
    return True


_lib.impl("fused_step_any", _fused_step_on_cpu, "CPU")
CPU_KERNEL_IN_CPP = _load_cpp_cpu_kernel()
"""Whether the op's CPU kernel is the C++ one (fastdiff._ops) rather than the Python one (fastdiff/kernels/cpu.py)."""
if not CPU_KERNEL_IN_CPP:
    _lib.impl("fused_step", _fused_step_on_cpu, "CPU")
_lib.impl("fused_step", _fused_step_cuda, "CUDA")
torch.library.register_fake("fastdiff::fused_step", _fused_step_fake, lib=_lib)
torch.library.register_fake("fastdiff::fused_step_any", _fused_step_fake, lib=_lib)

fused_step = torch.ops.fastdiff.fused_step
"""The registered op (CPU: C++, CUDA: Triton); :func:`fused_step_reference` is its plain-torch oracle."""

__all__ = ["SCHEMA", "CPU_KERNEL_IN_CPP", "cpu_kernel", "fused_step", "fused_step_reference"]
