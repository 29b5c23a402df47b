"""The Triton kernels compiled for real GPUs, with no GPU: Triton's own compiler and the ptxas bundled in its wheel.

Every specialisation the library can launch -- each constexpr set ``launch_fused_step`` can pass
(``launchable_constexprs``, derived from the launcher's own flag function and argument checks: 1,080 sets) in each
(state, model-operand) dtype pair the argument checks pass on (5 pairs) -- must compile for sm_80 and sm_90
(sm_100 too where the bundled ptxas takes it), within ``MAX_REGS`` registers and ``MAX_SPILL_BYTES`` of spills
per thread. With 16-byte aligned pointers and a per-sample size divisible by 16 (what the JIT specialises a
typical launch on), every stream is read and written with 128-bit accesses (``ld.global.v4`` / ``st.global.v4``).
The noise kernels (philox_normal, philox_normal_rows) are compiled and checked the same way.

Register cliff: the kernel runs 4 warps (128 threads) per block, 8 elements per thread. An SM has 65,536 registers,
so at <= 128 registers per thread 4 blocks (16 warps) fit per SM, at 129..168 only 3. The kernel is a memory stream:
at 16 warps x 32 threads x 8 elements x 4 bytes, x and m alone keep 32 KiB in flight per SM, above the ~20 KiB
Little's law asks of an H100 (3.35 TB/s x ~0.8 us latency / 132 SMs), so 4 blocks per SM still saturate memory;
3 would not for the two-stream steps. Measured (Triton 3.9, all 264 sets in fp32 and in fp16 on sm_80 and sm_90):
32..128 registers, the Philox variants the most; the most, 128 (on the cliff), is fp32 per-row Philox on sm_80.
Inpainting's blend (HAS_BLEND) adds a second Philox stream where its noise is not explicit: the fp32 steps with both
needed up to 140 registers on sm_80 at 4 warps, so they launch 8 (``launch_warps``; 4 fp32 elements per thread, still
one 128-bit access per stream): 80..95 registers measured.

Spills: Triton runs ptxas with --regAllocOptLevel=2 (a ptxas 13 workaround), and with it ptxas keeps one or two
words of a few Philox variants on the stack even at 80..96 registers (sm_90: 10 of the 264 fp32 sets and 23 fp16
sets spill 8 or 16 bytes; sm_80: 4 each, 8 bytes; cuobjdump's STACK, ptxas -v's "spill stores"). A 16-byte
per-thread stack is 2 KiB per block, L1-resident: allowed, and reported; more fails.

``CompiledKernel.n_regs`` / ``n_spills`` are filled in only when a driver loads the binary, so the usage is read
from the cubin with the bundled cuobjdump. Compiling takes ~0.7 s per specialisation and core, so by default the
test compiles, for every dtype pair and target, the eight heaviest flag sets (every feature on, in and out of
per-row mode, with explicit and with Philox step noise and known-region noise) and, in fp16 on sm_90, flag sets
covering every pair of flag values (a pairwise covering array of the launchable sets): ~130 compiles, about two
minutes on a cold cache.
FASTDIFF_COMPILE_ALL=1 compiles all 1,080 sets for every dtype pair and target (~40 min on one core).
Everything is compiled once per module, in one subprocess without TRITON_INTERPRET (under it ``triton.jit``
gives interpreted functions), and cached on disk by Triton.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import triton

from fastdiff.bench.step_model import bytes_per_element, ptx_instruction_count, ptx_stream_bytes_per_element
from fastdiff.kernels import philox as P
from fastdiff.kernels.fused_step import (
    BLOCK_SIZE,
    OPTIONAL_TENSORS,
    _fused_step_kernel,
    kernel_constexprs,
    launch_warps,
    launchable_constexprs,
)
from fastdiff.kernels.launch_args import launchable_dtypes

MAX_REGS = 128
MAX_SPILL_BYTES = 16
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Each pointer's element type by role: "state" (x's dtype), "model" (m, m_uncond, noise) or fixed.
POINTER_ROLES = {
    "x_ptr": "state",
    "m_ptr": "model",
    "mu_ptr": "model",
    "h0_ptr": "state",
    "h1_ptr": "state",
    "h2_ptr": "state",
    "coef_ptr": "fp64",
    "seeds_ptr": "i64",
    "noise_ptr": "model",
    "x_out_ptr": "state",
    "h_out_ptr": "state",
    "x0_out_ptr": "state",
    "nonfinite_ptr": "i32",
    "clip_ptr": "fp32",
    "rows_ptr": "i32",
    "pool_ptr": "state",
    "guid_ptr": "fp32",
    "init_ptr": "state",
    "mask_ptr": "state",
    "blend_ptr": "fp64",
    "init_noise_ptr": "model",
}
if not all(os.path.exists(os.path.join(BIN, tool)) for tool in ("ptxas", "cuobjdump")):  # pragma: no cover
    pytest.skip(f"this Triton wheel bundles no ptxas/cuobjdump in {BIN}", allow_module_level=True)
SCALARS = {"batch": "i32", "numel": "i32", "stage": "i32", "stream": "i32", "guidance_scale": "fp32"}
PHILOX_SIGNATURES = {
    "philox_normal_kernel": {"seeds_ptr": "*i64", "out_ptr": "*fp32", "numel": "i32", "stage": "i32", "stream": "i32"},
    "philox_normal_rows_kernel": {
        "seeds_ptr": "*i64",
        "stages_ptr": "*i32",
        "out_ptr": "*fp32",
        "numel": "i32",
        "stream": "i32",
    },
}


def _ptxas_takes(arch: int) -> bool:
    """Whether the bundled ptxas (or its Blackwell twin) lists sm_<arch>."""
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(BIN, name)
        if os.path.exists(path):
            out = subprocess.run([path, "--help"], capture_output=True, text=True).stdout
            if f"sm_{arch}" in out:
                return True
    return False


ARCHS = [80, 90] + ([100] if _ptxas_takes(100) else [])


def _targets() -> list:
    """sm_80 and sm_90, and sm_100 where the bundled ptxas takes it (skipped with the reason otherwise)."""
    return [80, 90, pytest.param(100, marks=pytest.mark.skipif(100 not in ARCHS, reason="bundled ptxas lacks sm_100"))]


# ------------------------------------------------------------------------------------------------
# What is compiled: specs (JSON-able), and the flag sets they take
# ------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return TRITON_TYPES[dtype]


def _heaviest() -> list[dict]:
    """The launchable flag sets with the most features on (inpainting's blend included), out of and in per-row mode,
    with explicit and with Philox step noise, and explicit and Philox known-region noise (each Philox call made in
    registers: two of them the most registers)."""
    sets = [f for f in launchable_constexprs() if f["USE_NOISE"] and f["HAS_BLEND"]]
    weight = lambda f: sum(int(v) for k, v in f.items() if k != "BLOCK")  # noqa: E731
    modes = itertools.product((True, False), (False, True), (True, False))
    keys = ("EXPLICIT_NOISE", "PER_ROW", "EXPLICIT_INIT_NOISE")
    return [max((f for f in sets if tuple(f[k] for k in keys) == mode), key=weight) for mode in modes]


def _pairwise_cover() -> list[dict]:
    """Launchable flag sets (greedy) in which every launchable pair of values of two flags appears."""
    sets = launchable_constexprs()
    pairs = lambda f: set(itertools.combinations(sorted(f.items()), 2))  # noqa: E731
    todo = set().union(*(pairs(f) for f in sets))
    chosen = []
    while todo:
        best = max(sets, key=lambda f: len(pairs(f) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


# The paper model's variants (docs/benchmarks.md, "The step on paper"): kernel_constexprs' arguments by name.
MODEL_VARIANTS = {
    "ddim": dict(n_hist=0, use_noise=False),
    "ddim eta>0, ddpm (Philox noise)": dict(n_hist=0, use_noise=True),
    "ddim, guided": dict(n_hist=0, use_noise=False, m_uncond=True),
    "explicit noise": dict(n_hist=0, use_noise=True, noise=True),
    "dpmpp_2m (one history slot)": dict(n_hist=1, use_noise=False, h_out=True),
    "unipc (two history slots)": dict(n_hist=2, use_noise=False, h_out=True),
    "ddim, return_x0": dict(n_hist=0, use_noise=False, x0_out=True),
}


def _variant_flags(name: str) -> dict:
    given = MODEL_VARIANTS[name]
    x = torch.zeros(1, 4)
    opt = {n: x if given.get(n) else None for n in OPTIONAL_TENSORS}
    return kernel_constexprs(given["n_hist"], given["use_noise"], **opt)


def _step_spec(state: torch.dtype, model: torch.dtype, flags: dict, arch: int) -> str:
    return json.dumps(["step", _dtype_name(state), _dtype_name(model), flags, arch])


def _plan() -> dict[str, list[str]]:
    """The specs each test checks: by default the heaviest flag sets everywhere and a pairwise cover on fp16 sm_90;
    with FASTDIFF_COMPILE_ALL=1 every launchable flag set for every dtype pair and target."""
    full = os.environ.get("FASTDIFF_COMPILE_ALL") == "1"
    flag_sets = launchable_constexprs() if full else _heaviest()
    pairs = launchable_dtypes()
    return {
        "step": [_step_spec(s, m, f, a) for a in ARCHS for s, m in pairs for f in flag_sets],
        "cover": [_step_spec(torch.float16, torch.float16, f, 90) for f in _pairwise_cover()],
        "philox": [json.dumps(["philox", name, a]) for name in PHILOX_SIGNATURES for a in ARCHS],
        "model": [_step_spec(s, s, _variant_flags(v), 90) for s in TRITON_TYPES for v in MODEL_VARIANTS],
    }


# ------------------------------------------------------------------------------------------------
# The compiling worker: a subprocess without TRITON_INTERPRET (under it triton.jit gives interpreted functions)
# ------------------------------------------------------------------------------------------------


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers, local memory (spills) and stack frame of a cubin, read with the bundled cuobjdump
    (CompiledKernel.n_regs / n_spills are filled in only when a driver loads the binary)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    line = next(s for s in out.stdout.splitlines() if "REG:" in s)
    fields = dict(item.split(":") for item in line.split() if ":" in item and item.split(":")[1].isdigit())
    return {"regs": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"])}


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4) -> dict:
    """triton.compile of ``fn`` for sm_<arch>, every pointer and ``numel`` declared 16-divisible (as the JIT
    specialises a launch on 16-byte aligned tensors of a size divisible by 16); its resources and v4 counts."""
    from triton.backends.compiler import GPUTarget

    aligned = [n for n, t in signature.items() if t.startswith("*") or n == "numel"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    return {
        **_resources(kernel.asm["cubin"]),
        "ld_v4": ptx.count("ld.global.v4"),
        "st_v4": ptx.count("st.global.v4"),
        "stream_bytes": ptx_stream_bytes_per_element(ptx),
        "instructions": ptx_instruction_count(ptx),
    }


def _compile_spec(spec: str) -> dict:
    kind, *rest = json.loads(spec)
    if kind == "philox":
        name, arch = rest
        return _compile(getattr(P, name), PHILOX_SIGNATURES[name], {"BLOCK": BLOCK_SIZE}, arch)
    state, model, flags, arch = rest
    types = {"state": "*" + state, "model": "*" + model}
    signature = {**{n: types.get(role, "*" + role) for n, role in POINTER_ROLES.items()}, **SCALARS}
    # The warps the launcher picks for these flags and state dtype.
    warps = launch_warps(flags, {v: k for k, v in TRITON_TYPES.items()}[state])
    return _compile(_fused_step_kernel, signature, flags, arch, warps)


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    """Every spec of the plan compiled once, in one subprocess without TRITON_INTERPRET."""
    specs = sorted(set().union(*_plan().values()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    out = subprocess.run([sys.executable, __file__], input=json.dumps(specs), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def _id(spec: str) -> str:
    kind, *rest = json.loads(spec)
    if kind == "philox":
        return f"{rest[0]} sm_{rest[1]}"
    state, model, flags, arch = rest
    on = "-".join(f"{k}{int(v)}" for k, v in flags.items() if k != "BLOCK" and v)
    return f"sm_{arch} {state}/{model} {on}"


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_every_constexpr_comes_from_the_flag_function() -> None:
    """The launcher passes kernel_constexprs(...): it must set every constexpr of the kernel, depend on no
    argument the enumeration does not vary, and every flag must take both values among the launchable sets."""
    params = inspect.signature(_fused_step_kernel.fn).parameters.values()
    kernel_names = {p.name for p in params if "constexpr" in str(p.annotation)}
    sets = launchable_constexprs()
    assert all(set(f) == kernel_names for f in sets)
    assert set(inspect.signature(kernel_constexprs).parameters) == {"n_hist", "use_noise", *OPTIONAL_TENSORS}
    for name in kernel_names - {"BLOCK"}:
        assert len({f[name] for f in sets}) > 1, name
    assert {f["NUM_HIST"] for f in sets} == {0, 1, 2, 3} and len(sets) == 1080


@pytest.mark.parametrize("part", ["step", "cover", "philox"])
def test_compiles_without_spills_within_the_register_cliff(compiled: dict, part: str) -> None:
    """Each specialisation compiles, spills at most MAX_SPILL_BYTES per thread and uses <= MAX_REGS registers."""
    for spec in _plan()[part]:
        res = compiled[spec]
        print(_id(spec), res)
        assert res["local"] + res["stack"] <= MAX_SPILL_BYTES, f"{_id(spec)}: spills {res}"
        assert res["regs"] <= MAX_REGS, f"{_id(spec)}: {res['regs']} registers > {MAX_REGS}"


@pytest.mark.parametrize("arch", _targets())
@pytest.mark.parametrize("state", list(TRITON_TYPES), ids=str)
def test_streams_are_128_bit(compiled: dict, state: torch.dtype, arch: int) -> None:
    """Each stream of the all-features step is read or written in 128-bit accesses: 8 elements per thread are two
    v4 accesses in fp32 and one in fp16/bf16. Reads: x, m, m_uncond, noise, h0..h2; writes: x_out, h_out, x0_out.
    Inpainting's blend adds init, mask and init_noise (10 read streams). The noise kernels' float32 output: two v4
    stores."""
    flags = _heaviest()[0]
    assert flags["EXPLICIT_NOISE"] and flags["NUM_HIST"] == 3 and flags["WRITE_H"] and flags["WRITE_X0"]
    assert flags["HAS_BLEND"] and flags["EXPLICIT_INIT_NOISE"] and launch_warps(flags, state) == 4
    per_stream = 2 if state == torch.float32 else 1
    res = compiled[_step_spec(state, state, flags, arch)]
    assert res["ld_v4"] >= 10 * per_stream and res["st_v4"] >= 3 * per_stream, res
    for name in PHILOX_SIGNATURES:
        assert compiled[json.dumps(["philox", name, arch])]["st_v4"] >= 2


@pytest.mark.parametrize("state", list(TRITON_TYPES), ids=str)
def test_the_paper_model_counts_the_compiled_streams(compiled: dict, state: torch.dtype) -> None:
    """The bytes per element of the paper model equal the vector global accesses of the sm_90 PTX, variant by
    variant; the plain DDIM step is 12 bytes per fp32 element (read x and m, write x)."""
    for name in MODEL_VARIANTS:
        flags = _variant_flags(name)
        res = compiled[_step_spec(state, state, flags, 90)]
        print(
            f"{TRITON_TYPES[state]} {name}: {res['stream_bytes']:g} bytes/element, {res['instructions']} instructions"
        )
        assert res["stream_bytes"] == bytes_per_element(flags, state, state), name
    if state == torch.float32:
        assert compiled[_step_spec(state, state, _variant_flags("ddim"), 90)]["stream_bytes"] == 12


def test_philox_noise_costs_instructions_not_bytes(compiled: dict) -> None:
    """The step with Philox noise moves the plain step's bytes; its noise costs instructions (Philox4x32-10 makes
    four normals per counter, Box-Muller two per pair): counted per element from the PTX."""
    plain = compiled[_step_spec(torch.float32, torch.float32, _variant_flags("ddim"), 90)]
    noisy = compiled[_step_spec(torch.float32, torch.float32, _variant_flags("ddim eta>0, ddpm (Philox noise)"), 90)]
    assert noisy["stream_bytes"] == plain["stream_bytes"]
    per_element = (noisy["instructions"] - plain["instructions"]) / 8
    print(f"Philox + Box-Muller: {per_element:g} PTX instructions per element")
    assert 10 < per_element < 200


def _main() -> None:
    """Worker: reads a JSON list of specs on stdin, writes {spec: result} as JSON on stdout."""
    print(json.dumps({spec: _compile_spec(spec) for spec in json.loads(sys.stdin.read())}))


if __name__ == "__main__":
    _main()
