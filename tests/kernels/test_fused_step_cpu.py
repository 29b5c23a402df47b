"""The C++ CPU kernel of ``fastdiff::fused_step`` (csrc/fused_step.cpp via fastdiff/kernels/cpu.py) against the
plain-torch reference: every row kind, dtype and odd size, guidance, history, clipping, per-row programs; its
in-loop Philox noise against the C++ libm generator and the (interpreted) Triton kernel; thread-count independence."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from repo_paths import TESTS  # noqa: E402

import fastdiff.kernels.op  # noqa: E402
from fastdiff import _C  # noqa: E402
from fastdiff.kernels.cpu import fused_step_cpu  # noqa: E402
from fastdiff.kernels.fused_step import launch_fused_step  # noqa: E402
from fastdiff.kernels.reference import NUM_COEF, fused_step_reference  # noqa: E402
from fastdiff.program import build_program  # noqa: E402
from fastdiff.schedule import Schedule  # noqa: E402

INT32_MAX = torch.iinfo(torch.int32).max
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
NOISE_ATOL = 1e-5  # the vectorised log/cos against libm (measured max ~5e-7)


def _outputs(x: torch.Tensor, want_h: bool = True) -> dict:
    return {
        "x_out": torch.full_like(x, float("nan")),
        "h_out": torch.full_like(x, float("nan")) if want_h else None,
        "x0_out": torch.full_like(x, float("nan")),
        "nonfinite": torch.full((x.shape[0],), INT32_MAX, dtype=torch.int32),
    }


def _op_args(args: dict, out: dict) -> tuple:
    """The op's 19 arguments, in order, from named inputs (defaults for the optional ones) and outputs."""
    return (
        args["x"],
        args["m"],
        args.get("m_uncond"),
        args.get("w", 1.0),
        args.get("hist", []),
        args["coeffs"],
        args.get("stage", 0),
        args["seeds"],
        0,
        args.get("use_noise", True),
        args.get("noise"),
        out["x_out"],
        out["h_out"],
        out["x0_out"],
        out["nonfinite"],
        args.get("clip"),
        args.get("rows"),
        args.get("pool"),
        args.get("row_guidance"),
    )


def _run(fn, args: dict, out: dict) -> dict:
    fn(*_op_args(args, out))
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, scale: float, dtype: torch.dtype, what: str) -> None:
    """Within one storage ulp of the value plus float32 rounding (and the noise difference) of the terms."""
    err = (got.double() - want.double()).abs()
    bound = ULP[dtype] * want.double().abs() + 2e-6 * scale + 1e-30
    assert bool((err <= bound).all()), f"{what}: max err {float(err.max()):.3g}"


def _compare(args: dict, dtype: torch.dtype, want_h: bool = True) -> dict:
    ours = _run(fused_step_cpu, args, _outputs(args["x"], want_h))
    ref = _run(fused_step_reference, args, _outputs(args["x"], want_h))
    scale = 1.0 + sum(float(t.abs().max()) for t in (args["x"], args["m"])) * float(args["coeffs"].abs().max()) * 4
    for name in ("x_out", "h_out", "x0_out"):
        if ours[name] is not None:
            assert ours[name].dtype == dtype
            _assert_close(ours[name], ref[name], scale, dtype, name)
    assert torch.equal(ours["nonfinite"], ref["nonfinite"])
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "sampler,options,schedule",
    [
        ("ddpm", {}, "vp_discrete"),
        ("ddim", {"eta": 0.5}, "vp_discrete"),
        ("euler_ancestral", {}, "vp_discrete"),
        ("dpmpp_2m_sde", {}, "vp_discrete"),
        ("dpmpp_3m", {}, "vp_discrete"),
        ("unipc", {}, "vp_discrete"),
        ("heun", {}, "edm"),
        ("euler_maruyama", {}, "vp_linear"),
    ],
)
def test_sampler_rows(sampler, options, schedule, dtype):
    sch = getattr(Schedule, schedule)()
    prog = build_program(sch, sch.grid(8), sampler, "eps", torch.device("cpu"), **options)
    g = torch.Generator().manual_seed(1)
    x, m = (torch.randn(3, 5, 7, generator=g).to(dtype) for _ in range(2))
    pool = [torch.randn(3, 5, 7, generator=g).to(dtype) for _ in range(prog.slots)]
    for stage in range(prog.stages):
        hist = [pool[s] for s in prog.reads(stage)]
        _compare(
            dict(
                x=x,
                m=m,
                hist=hist,
                coeffs=prog.coef_device,
                stage=stage,
                seeds=torch.tensor([1, -2, 2**40]),
                use_noise=prog.uses_noise(stage),
            ),
            dtype,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample_shape", [(1,), (7,), (257,), (1025,), (2, 3, 5)], ids=str)
def test_random_rows_every_input(sample_shape, dtype):
    g = torch.Generator().manual_seed(len(sample_shape) * 100 + sample_shape[0])
    coeffs = torch.randn(4, NUM_COEF, generator=g, dtype=torch.float64)
    shape = (3, *sample_shape)
    rnd = lambda shape=shape, dtype=dtype: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
    x, m, mu = rnd(), rnd(), rnd()
    seeds = torch.tensor([4, 5, 6])
    for n_hist in range(4):
        for clip in (None, torch.tensor([[1.0, 1.0], [0.5, 2.0], [1e30, 1.0]])):
            for noise in (None, rnd()):
                _compare(
                    dict(
                        x=x,
                        m=m,
                        m_uncond=mu,
                        w=2.5,
                        hist=[rnd() for _ in range(n_hist)],
                        coeffs=coeffs,
                        stage=n_hist,
                        seeds=seeds,
                        noise=noise,
                        clip=clip,
                    ),
                    dtype,
                )
    _compare(dict(x=x, m=m, coeffs=coeffs, stage=1, seeds=seeds, use_noise=False), dtype, want_h=False)


def test_model_output_in_float32_with_half_state():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, generator=g).half()
    m = torch.randn(2, 300, generator=g)  # the network answers in float32
    coeffs = torch.randn(2, NUM_COEF, generator=g, dtype=torch.float64)
    _compare(dict(x=x, m=m, coeffs=coeffs, stage=1, seeds=torch.tensor([1, 2])), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_programs(dtype):
    g = torch.Generator().manual_seed(9)
    coeffs = torch.randn(9, NUM_COEF, generator=g, dtype=torch.float64)
    shape = (4, 3, 90)
    x, m, mu = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    pool = torch.randn(3, *shape, generator=g).to(dtype)
    rows = torch.tensor(
        [[0, 0, -1, -1, -1, 0], [5, 7, 0, -1, -1, 1], [8, 2, 2, 1, 0, 2], [3, 11, 1, 0, -1, -1]], dtype=torch.int32
    )
    args = dict(
        x=x,
        m=m,
        m_uncond=mu,
        coeffs=coeffs,
        seeds=torch.tensor([5, -7, 2**40, 9]),
        rows=rows,
        row_guidance=torch.tensor([1.0, 7.5, 0.0, 3.0]),
        clip=torch.tensor([[1.0, 1.0]] * 4),
    )
    ours = _run(fused_step_cpu, dict(args, pool=pool.clone()), _outputs(x, want_h=False))
    ref_pool = pool.clone()
    ref = _run(fused_step_reference, dict(args, pool=ref_pool), _outputs(x, want_h=False))
    _assert_close(ours["x_out"], ref["x_out"], 200.0, dtype, "x_out")
    _assert_close(ours["x0_out"], ref["x0_out"], 200.0, dtype, "x0_out")
    m = torch.full_like(m, float("nan"))
    bad = _run(fused_step_cpu, dict(args, m=m, pool=pool.clone()), _outputs(x, want_h=False))
    assert bad["nonfinite"].tolist() == [0, 7, 2, 11]


def test_noise_equals_the_generators():
    # A row that is pure noise: x_out = z, over two blocks and a tail (256-element noise blocks).
    coeffs = torch.zeros(5, NUM_COEF, dtype=torch.float64)
    coeffs[:, 5] = 1.0
    seeds = torch.tensor([0, -1, 2**33 + 5])
    x = torch.zeros(3, 700)
    for stage in (0, 4):
        out = _run(fused_step_cpu, dict(x=x, m=x, coeffs=coeffs, stage=stage, seeds=seeds), _outputs(x))["x_out"]
        libm = torch.from_numpy(np.asarray(_C.philox_normal(seeds.numpy(), 700, stage, 0)))
        assert float((out - libm).abs().max()) <= NOISE_ATOL
        triton = torch.empty_like(x)
        launch_fused_step(
            x,
            x,
            None,
            1.0,
            [],
            coeffs,
            stage,
            seeds,
            0,
            True,
            None,
            triton,
            None,
            None,
            torch.full((3,), INT32_MAX, dtype=torch.int32),
        )
        assert float((out - triton).abs().max()) <= NOISE_ATOL
    # The extreme tails: u1 at its 1e-7 floor gives |z| up to sqrt(-2 log 1e-7) = 5.68.
    many = torch.from_numpy(np.asarray(_C.philox_normal(np.arange(64), 4096, 1, 0)))
    fast = torch.tensor([_C.philox_normal_fast(int(s), j0, 256, 1, 0) for s in range(64) for j0 in range(0, 4096, 256)])
    assert float((fast.reshape(64, 4096) - many).abs().max()) <= NOISE_ATOL


def test_fast_normals_within_float32_rounding_of_libm():
    # The polynomial log, cos and sin (csrc/fast_normal.cpp) against libm's: a few float32 ulps of max(|z|, 1)
    # (measured max 3 ulps), across many seeds, stages and blocks, with tails that are not whole lane groups and
    # blocks that start inside a counter's group of four.
    seeds = np.array([0, 1, 2**31 - 1, -1, 2**40 + 3, -(2**62)], dtype=np.int64)
    for stage in (0, 3, 2**32 - 1):
        libm = np.asarray(_C.philox_normal(seeds, 8192 + 13, stage, 0))
        for b, seed in enumerate(seeds):
            fast = np.concatenate(
                [
                    _C.philox_normal_fast(int(seed) % 2**64, j0, min(256, 8192 + 13 - j0), stage, 0)
                    for j0 in range(0, 8192 + 13, 256)
                ]
            )
            ulp = np.finfo(np.float32).eps * np.maximum(np.abs(libm[b]), 1.0)
            assert np.all(np.abs(fast - libm[b]) <= 4 * ulp)
            for j0 in (1, 2, 3, 4099):
                fast = np.asarray(_C.philox_normal_fast(int(seed) % 2**64, j0, 255, stage, 0))
                assert np.all(np.abs(fast - libm[b, j0 : j0 + 255]) <= 4 * ulp[j0 : j0 + 255])


def test_fast_normals_where_the_counters_cross_2_to_the_32():
    # Element indices j0 .. j0 + 39 where the counter j >> 2 crosses 2^32 (word 1 of the counter changes inside a
    # lane group; j0 not a multiple of 4), against Box-Muller in numpy on the raw Philox words.
    j = np.arange(2**34 - 13, 2**34 + 27, dtype=np.uint64)
    c, lane = j >> np.uint64(2), (j & np.uint64(3)).astype(np.int64)
    seed = 2**40 + 7
    counters = np.stack([c & 0xFFFFFFFF, c >> np.uint64(32), np.full_like(c, 5), np.zeros_like(c)], 1)
    words = np.asarray(_C.philox4x32_10(np.full(len(j), seed, dtype=np.int64), counters.astype(np.uint32)))
    signed = words.astype(np.uint32).view(np.int32)
    u = np.where(signed < 0, ~signed, signed).astype(np.float32) * np.float32(4.6566127342e-10)
    rows, first = np.arange(len(j)), 2 * (lane // 2)
    u1 = np.maximum(u[rows, first], np.float32(1e-7))
    th = np.float32(6.283185307179586) * u[rows, first + 1]
    want = np.sqrt(np.float32(-2) * np.log(u1)) * np.where(lane % 2 == 0, np.cos(th), np.sin(th))
    fast = np.asarray(_C.philox_normal_fast(seed, 2**34 - 13, len(j), 5, 0))
    assert np.all(np.abs(fast - want) <= 4 * np.finfo(np.float32).eps * np.maximum(np.abs(want), 1.0))


def test_bitwise_the_same_whatever_the_thread_count():
    g = torch.Generator().manual_seed(11)
    x, m, h = (torch.randn(4, 4, 64, 64, generator=g) for _ in range(3))  # large enough to run threaded
    coeffs = torch.randn(3, NUM_COEF, generator=g, dtype=torch.float64)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(
                _run(
                    fused_step_cpu,
                    dict(x=x, m=m, hist=[h], coeffs=coeffs, stage=2, seeds=torch.tensor([1, 2, 3, 4])),
                    _outputs(x),
                )
            )
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for name in ("x_out", "h_out", "x0_out"):
            assert torch.equal(o[name], outs[0][name])


def test_non_contiguous_output_falls_back_to_the_reference():
    x = torch.randn(2, 8)
    coeffs = torch.randn(1, NUM_COEF, dtype=torch.float64)
    out = torch.empty(8, 2).t()  # a transposed view
    fused_step_cpu(
        x,
        x,
        None,
        1.0,
        [],
        coeffs,
        0,
        torch.tensor([1, 2]),
        0,
        False,
        None,
        out,
        None,
        None,
        torch.full((2,), INT32_MAX, dtype=torch.int32),
    )
    want = torch.empty(2, 8)
    fused_step_reference(
        x,
        x,
        None,
        1.0,
        [],
        coeffs,
        0,
        torch.tensor([1, 2]),
        0,
        False,
        None,
        want,
        None,
        None,
        torch.full((2,), INT32_MAX, dtype=torch.int32),
    )
    assert torch.equal(out, want)


def isa_outputs() -> dict:
    """Every kind of input the kernel takes (dtypes, guidance, history, clip, explicit and Philox noise, per-row
    programs, a block that is not whole lanes), with fixed inputs; the outputs by name."""
    g = torch.Generator().manual_seed(21)
    out = {}
    for dtype in DTYPES:
        for shape, n_hist in (((3, 1000), 2), ((2, 4, 33), 3), ((5, 5), 0)):
            rnd = lambda shape=shape, dtype=dtype: torch.randn(shape, generator=g).to(dtype)
            coeffs = torch.randn(4, NUM_COEF, generator=g, dtype=torch.float64)
            x, m, mu, noise = rnd(), rnd(), rnd(), rnd()
            for variant, extra in (
                ("philox", {}),
                ("explicit", {"noise": noise}),
                ("clip", {"clip": torch.tensor([[1.0, 1.0]] * shape[0])}),
            ):
                res = _run(
                    fused_step_cpu,
                    dict(
                        x=x,
                        m=m,
                        m_uncond=mu,
                        w=2.5,
                        hist=[rnd() for _ in range(n_hist)],
                        coeffs=coeffs,
                        stage=3,
                        seeds=torch.arange(shape[0]) * 7 - 3,
                        **extra,
                    ),
                    _outputs(x),
                )
                out.update({f"{dtype}/{shape}/{variant}/{k}": v for k, v in res.items()})
        pool = torch.randn(3, 4, 300, generator=g).to(dtype)
        rows = torch.tensor(
            [[0, 0, -1, -1, -1, 0], [2, 7, 0, -1, -1, 1], [3, 2, 2, 1, 0, 2], [1, 11, 1, 0, -1, -1]], dtype=torch.int32
        )
        x, m, mu = (torch.randn(4, 300, generator=g).to(dtype) for _ in range(3))
        res = _run(
            fused_step_cpu,
            dict(
                x=x,
                m=m,
                m_uncond=mu,
                coeffs=torch.randn(4, NUM_COEF, generator=g, dtype=torch.float64),
                seeds=torch.tensor([5, -7, 2**40, 9]),
                rows=rows,
                pool=pool,
                row_guidance=torch.tensor([1.0, 7.5, 0.0, 3.0]),
            ),
            _outputs(x, want_h=False),
        )
        out.update({f"{dtype}/rows/{k}": v for k, v in res.items() if v is not None})
        out[f"{dtype}/rows/pool"] = pool
    return out


def test_baseline_and_avx2_builds_give_the_same_bits(tmp_path):
    # The vectorised loops are built for baseline x86-64 and for AVX2 (csrc/cpu_isa.h); FASTDIFF_CPU_BASELINE=1
    # makes a process run the baseline build.
    if _C.cpu_isa() != "avx2":
        pytest.skip(f"this CPU runs the {_C.cpu_isa()} build only: there is no second build to compare")
    path = tmp_path / "baseline.pt"
    script = (
        "import sys, torch; sys.path[:0] = sys.argv[2:]; from fastdiff import _C; "
        "assert _C.cpu_isa() == 'baseline'; from test_fused_step_cpu import isa_outputs; "
        "torch.save(isa_outputs(), sys.argv[1])"
    )
    env = dict(os.environ, FASTDIFF_CPU_BASELINE="1")
    subprocess.run(
        [sys.executable, "-c", script, str(path), os.path.dirname(os.path.abspath(__file__)), TESTS],
        env=env,
        check=True,
        timeout=300,
    )
    baseline, avx2 = torch.load(path), isa_outputs()
    assert baseline.keys() == avx2.keys()
    for name, value in avx2.items():
        assert torch.equal(value, baseline[name]) or (
            value.is_floating_point()
            and torch.equal(value.isnan(), baseline[name].isnan())
            and torch.equal(value.nan_to_num(), baseline[name].nan_to_num())
        ), name


# ------------------------------------------------------------------------------------------------
# The op's C++ CPU kernel (fastdiff._ops) against its Python CPU kernel (fastdiff::fused_step_any)
# ------------------------------------------------------------------------------------------------


def _op_cases():
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        rnd = lambda *shape, dtype=dtype: torch.randn(shape, generator=g).to(dtype)  # noqa: E731
        coeffs = torch.randn(4, NUM_COEF, generator=g, dtype=torch.float64)
        x = rnd(3, 2, 333)
        yield f"{dtype} plain", dict(x=x, m=rnd(3, 2, 333), coeffs=coeffs, stage=2, seeds=torch.tensor([1, 2, 3]))
        yield (
            f"{dtype} all",
            dict(
                x=x,
                m=rnd(3, 2, 333),
                m_uncond=rnd(3, 2, 333),
                w=3.0,
                hist=[rnd(3, 2, 333)] * 3,
                coeffs=coeffs,
                stage=3,
                seeds=torch.tensor([4, 5, 6]),
                noise=rnd(3, 2, 333),
                clip=torch.tensor([[1.0, 1.0], [0.5, 2.0], [2.0, 1.0]]),
            ),
        )
        rows = torch.tensor([[0, 0, -1, -1, -1, 0], [2, 7, 0, -1, -1, 1], [3, 2, 1, 0, -1, -1]], dtype=torch.int32)
        yield (
            f"{dtype} per-row",
            dict(
                x=x,
                m=rnd(3, 2, 333),
                m_uncond=rnd(3, 2, 333),
                coeffs=coeffs,
                seeds=torch.tensor([7, 8, 9]),
                rows=rows,
                pool=rnd(2, 3, 2, 333),
                row_guidance=torch.tensor([1.0, 2.0, 0.5]),
            ),
        )
        if dtype != torch.float32:  # a float32 network output with a half-precision state
            yield (
                f"{dtype} f32 model",
                dict(x=x, m=torch.randn(3, 2, 333, generator=g), coeffs=coeffs, seeds=torch.tensor([1, 2, 3])),
            )


def _run_op(op, args: dict, want_h: bool) -> dict:
    args = dict(args, pool=args["pool"].clone()) if args.get("pool") is not None else args
    out = _run(op, args, _outputs(args["x"].contiguous(), want_h))
    if args.get("pool") is not None:
        out["pool"] = args["pool"]
    return out


def _same(a: dict, b: dict) -> None:
    for name, value in a.items():
        if value is not None:
            assert torch.equal(value.nan_to_num(), b[name].nan_to_num()) and torch.equal(
                value.isnan(), b[name].isnan()
            ), name


def test_the_op_runs_its_cpp_cpu_kernel():
    # `make` builds fastdiff._ops (setup.py); without it the op would quietly run its Python CPU kernel.
    assert fastdiff.kernels.op.CPU_KERNEL_IN_CPP


@pytest.mark.parametrize("name,args", list(_op_cases()), ids=[n for n, _ in _op_cases()])
def test_cpp_cpu_kernel_equals_the_python_one_bitwise_without_calling_it(monkeypatch, name, args):
    calls = []
    python_kernel = fastdiff.kernels.op.cpu_kernel
    monkeypatch.setattr(fastdiff.kernels.op, "cpu_kernel", lambda *a: (calls.append(1), python_kernel(*a)))
    want_h = args.get("rows") is None
    ours = _run_op(torch.ops.fastdiff.fused_step, args, want_h)
    assert calls == [], "the C++ fast path should take these arguments"
    theirs = _run_op(torch.ops.fastdiff.fused_step_any, args, want_h)
    assert calls == [1]
    _same(ours, theirs)


def test_what_the_cpp_fast_path_does_not_take_goes_to_the_python_kernel(monkeypatch):
    calls = []
    python_kernel = fastdiff.kernels.op.cpu_kernel
    monkeypatch.setattr(fastdiff.kernels.op, "cpu_kernel", lambda *a: (calls.append(1), python_kernel(*a)))
    g = torch.Generator().manual_seed(8)
    x, m = torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)
    coeffs = torch.randn(3, NUM_COEF, generator=g, dtype=torch.float64)
    base = dict(x=x, m=m, coeffs=coeffs, stage=1, seeds=torch.tensor([1, 2]))
    want = _run_op(torch.ops.fastdiff.fused_step, base, True)
    for change in (
        dict(m=m.double()),
        dict(m=torch.randn(40, 2, generator=g).t()),
        dict(x=x.t().contiguous().t()),
        dict(seeds=torch.tensor([1, 2], dtype=torch.int32)),
    ):
        if "m" in change:
            base_m = dict(base, m=change["m"].to(torch.float32).contiguous())
            want_m = _run_op(torch.ops.fastdiff.fused_step, base_m, True)
        else:
            want_m = want
        before = len(calls)
        _same(_run_op(torch.ops.fastdiff.fused_step, dict(base, **change), True), want_m)
        assert len(calls) == before + 1, change
    # Argument errors come from the Python kernel, as before.
    with pytest.raises(ValueError, match="pass rows as well"):
        _run_op(torch.ops.fastdiff.fused_step, dict(base, pool=torch.zeros(1, 2, 40)), True)
    with pytest.raises(ValueError, match="rows must be int32"):
        _run_op(torch.ops.fastdiff.fused_step, dict(base, rows=torch.zeros(2, 6, dtype=torch.int64)), False)
    out = _outputs(x)
    out["x_out"] = torch.empty(40, 2).t()  # a non-contiguous output: the reference computes it (float rounding)
    torch.ops.fastdiff.fused_step(*_op_args(base, out))
    torch.testing.assert_close(out["x_out"], want["x_out"], rtol=1e-6, atol=1e-6)
    assert len(calls) == 7  # the four changes, the two errors and this output


def test_the_python_cpu_kernel_can_be_chosen(tmp_path):
    script = (
        "import torch, fastdiff.kernels.op as op; assert not op.CPU_KERNEL_IN_CPP; "
        "from fastdiff import Pipeline, Schedule; "
        "p = Pipeline(lambda x, t: 0.1 * x, Schedule.vp_discrete(), device='cpu'); "
        "torch.save(p.sample((3, 5), sampler='ddpm', steps=6, seed=2, progress=False), __import__('sys').argv[1])"
    )
    path = tmp_path / "py.pt"
    subprocess.run(
        [sys.executable, "-c", script, str(path)],
        check=True,
        timeout=300,
        env=dict(os.environ, FASTDIFF_PYTHON_CPU_KERNEL="1"),
    )
    from fastdiff import Pipeline, Schedule

    pipe = Pipeline(lambda x, t: 0.1 * x, Schedule.vp_discrete(), device="cpu")
    assert torch.equal(torch.load(path), pipe.sample((3, 5), sampler="ddpm", steps=6, seed=2, progress=False))


def test_a_cpp_kernel_that_does_not_load_warns_and_leaves_the_python_one(monkeypatch, tmp_path):
    # A stale build (made against another torch, say) must not break `import fastdiff`: the loader warns and says no.
    import importlib.machinery

    from fastdiff.kernels.ops_version import TORCH_VERSION_MARKER

    broken = tmp_path / "_ops.so"  # names this torch (so the version check passes) but is no shared library
    broken.write_bytes(b"not a shared library " + TORCH_VERSION_MARKER + torch.__version__.encode() + b"\0")
    spec = importlib.machinery.ModuleSpec("fastdiff._ops", None, origin=str(broken))
    monkeypatch.setattr(fastdiff.kernels.op.importlib.util, "find_spec", lambda name: spec)
    with pytest.warns(UserWarning, match="did not load"):
        assert fastdiff.kernels.op._load_cpp_cpu_kernel() is False
    monkeypatch.setenv("FASTDIFF_PYTHON_CPU_KERNEL", "1")
    assert fastdiff.kernels.op._load_cpp_cpu_kernel() is False
