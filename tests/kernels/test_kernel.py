"""The fused step: the Triton kernel (interpreted on CPU tensors under TRITON_INTERPRET=1) against the
plain-torch reference, and the reference against a float64 evaluation of the row's formula.

Both implementations read the same float64 row, round it to float32, and evaluate
``c_x x + c_m m + sum_j c_hj h_j + c_z z`` in float32 in the same order, so in float32 they agree to
float32 rounding of the terms (``~2**-24`` times their magnitude) plus the Philox difference (the
kernel evaluates log/cos in Triton, the reference takes the C++ generator: ~5e-7 per normal, see
tests/test_philox.py). For fp16/bf16 storage both round the same float32 value to the storage dtype,
so they can differ by one unit in the last place of that dtype where the float32 values straddle a
rounding boundary: the bound below is one storage ulp (``eps_dtype * |value|``) on top of the float32
bound.

What we observe over the real sampler rows: fp32 max |kernel - reference| = 2.6e-7 of the terms'
magnitude (about 2% of elements differ at all, by an ulp or the Philox difference); fp16: 1 element in
29400 differs, by one fp16 ulp; bf16: about 40% of elements differ by one bf16 ulp, because Triton's
interpreter (3.9) converts fp32 to bf16 by truncating the mantissa (interpreter.py ``cast_impl`` passes
no rounding mode to ``_convert_float``) while torch -- and Triton on a GPU, where fptrunc is
round-to-nearest-even -- round to nearest. One bf16 ulp is inside the bound either way.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastdiff.kernels.op  # noqa: E402,F401  (registers torch.ops.fastdiff.fused_step)
from fastdiff import _C  # noqa: E402
from fastdiff.kernels.fused_step import launch_fused_step  # noqa: E402
from fastdiff.kernels.reference import NUM_COEF, fused_step_reference  # noqa: E402
from fastdiff.program import build_program, clip_form  # noqa: E402
from fastdiff.schedule import Schedule  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip(
        "the Triton kernel needs CUDA or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True
    )

INT32_MAX = torch.iinfo(torch.int32).max
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Unit roundoff of each storage dtype: one ulp of a value v is at most eps * |v|.
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# float32 arithmetic of a handful of terms plus Philox's float32 log/cos (<= 4.8e-7 measured).
F32_REL = 1e-6
PREDICTIONS = ("eps", "x0", "v", "score", "flow")
# (sampler, options, schedule) -- real rows from build_program; the SDE/ODE Euler steps on a
# continuous VP schedule, DDPM/DDIM on diffusers' discrete one.
SAMPLER_CONFIGS = [
    ("ddpm", {"variance_type": "fixed_small"}, "vp_discrete"),
    ("ddpm", {"variance_type": "fixed_large"}, "vp_discrete"),
    ("ddim", {"eta": 0.0}, "vp_discrete"),
    ("ddim", {"eta": 0.5}, "vp_discrete"),
    ("ddim", {"eta": 1.0}, "vp_discrete"),
    ("euler_maruyama", {}, "vp_linear"),
    ("pf_ode_euler", {}, "vp_linear"),
]


def _both(**kw) -> dict:
    """Runs the kernel and the reference on the same inputs; returns their outputs by name."""
    out = {}
    for name, fn in (("kernel", launch_fused_step), ("reference", fused_step_reference)):
        x = kw["x"]
        res = {
            "x_out": torch.full_like(x, float("nan")),
            "h_out": torch.full_like(x, float("nan")) if kw.get("want_h") else None,
            "x0_out": torch.full_like(x, float("nan")) if kw.get("want_x0") else None,
            "nonfinite": kw.get("nonfinite", torch.full((x.shape[0],), INT32_MAX, dtype=torch.int32)).clone(),
        }
        fn(
            x,
            kw["m"],
            kw.get("m_uncond"),
            kw.get("guidance_scale", 1.0),
            kw.get("hist", []),
            kw["coeffs"],
            kw["stage"],
            kw["seeds"],
            kw.get("stream", 0),
            kw.get("use_noise", True),
            kw.get("noise"),
            res["x_out"],
            res["h_out"],
            res["x0_out"],
            res["nonfinite"],
            kw.get("clip"),
        )
        out[name] = res
    return out


def _expected64(x, m, m_uncond, w, hist, row, z, clip=None) -> tuple:
    """The row's formula in float64 with the float32-rounded coefficients both implementations use.

    Returns ``((x_next, scale), (h_new, scale), (x0_hat, scale))``; each scale is the sum of the
    output's |terms|, the magnitude float32 rounding errors are relative to (the x0 term counts with the
    magnitude of x0's own terms).
    """
    c = row.to(torch.float32).to(torch.float64)
    x, m = x.double(), m.double()
    if m_uncond is not None:
        mu = m_uncond.double()
        m = mu + w * (m - mu)
    x0_terms = [c[8] * x, c[9] * m]
    x0, x0_scale = sum(x0_terms), sum(v.abs() for v in x0_terms)
    if clip is not None:
        bound = clip[:, 0].double().reshape(-1, *([1] * (x.dim() - 1)))
        scale = clip[:, 1].double().reshape(-1, *([1] * (x.dim() - 1)))
        x0 = torch.minimum(torch.maximum(x0, -bound), bound) * scale
        x0_scale = x0_scale * scale.abs()
    terms = [c[0] * x, c[1] * m, c[10] * x0] + [c[2 + j] * h.double() for j, h in enumerate(hist)]
    if z is not None:
        terms.append(c[5] * z.double())
    h_terms = [c[6] * x, c[7] * m, c[11] * x0]
    out = []
    for t, x0_coef in ((terms, c[10]), (h_terms, c[11])):
        out.append((sum(t), sum(v.abs() for v in t) + x0_coef.abs() * x0_scale))
    return (*out, (x0, x0_scale))


def _assert_within(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """|got - want| <= one storage ulp of want + F32_REL * scale, elementwise; returns max err / bound."""
    got64, want64 = got.double(), want.double()
    bound = EPS[dtype] * want64.abs() + F32_REL * scale + 1e-30
    err = (got64 - want64).abs()
    ratio = float((err / bound).max())
    assert ratio <= 1.0, f"{what}: max |diff| / bound = {ratio:.3g} (max |diff| = {float(err.max()):.3g})"
    return ratio


def _inputs(batch: int, sample_shape: tuple, dtype: torch.dtype, n_hist: int, gen: torch.Generator):
    shape = (batch, *sample_shape)
    rnd = lambda: torch.randn(shape, generator=gen).to(dtype)  # noqa: E731
    return rnd(), rnd(), [rnd() for _ in range(n_hist)], rnd


def _program(sampler: str, options: dict, schedule: str, prediction: str):
    sch = getattr(Schedule, schedule)()
    return build_program(sch, sch.grid(10), sampler, prediction, torch.device("cpu"), **options)


# ------------------------------------------------------------------------------------------------
# Real rows: every sampler, every prediction type, every dtype
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "config", SAMPLER_CONFIGS, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}"
)
def test_sampler_rows_kernel_matches_reference(config, prediction: str, dtype: torch.dtype) -> None:
    sampler, options, schedule = config
    prog = _program(sampler, options, schedule, prediction)
    gen = torch.Generator().manual_seed(hash((sampler, prediction, str(dtype))) % 2**31)
    x, m, _, _ = _inputs(2, (3, 5, 7), dtype, 0, gen)
    seeds = torch.tensor([7, -(2**40) + 3], dtype=torch.int64)
    # The first stage and the last one (which steps into the clean end: no noise for ddpm).
    for stage in (0, prog.stages - 1):
        use_noise = prog.uses_noise(stage)
        out = _both(
            x=x, m=m, coeffs=prog.coef_device, stage=stage, seeds=seeds, use_noise=use_noise, want_h=True, want_x0=True
        )
        k, r = out["kernel"], out["reference"]
        z = _C.philox_normal(seeds.numpy(), x[0].numel(), stage, 0) if use_noise else None
        z = torch.from_numpy(np.asarray(z)).reshape(x.shape) if z is not None else None
        expected = _expected64(x, m, None, 1.0, [], prog.coef_device[stage], z)
        for name, (want, scale) in zip(("x_out", "h_out", "x0_out"), expected):
            assert k[name].dtype == dtype
            _assert_within(k[name], r[name], scale, dtype, f"stage {stage} {name} kernel vs reference")
            _assert_within(r[name], want, scale, dtype, f"stage {stage} {name} reference vs float64")
        assert torch.equal(k["nonfinite"], r["nonfinite"]) and (k["nonfinite"] == INT32_MAX).all()


# ------------------------------------------------------------------------------------------------
# Random rows: shapes, batch sizes, history, guidance, explicit noise, h_out / x0_out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample_shape", [(1,), (7,), (3, 5, 7), (1025,)], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_random_rows_all_inputs(batch: int, sample_shape: tuple, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + len(sample_shape) * 10 + DTYPES.index(dtype))
    coeffs = torch.randn(6, NUM_COEF, generator=gen, dtype=torch.float64)
    seeds = torch.tensor([3, 2**62 + 1, -5][:batch], dtype=torch.int64)
    # Each history count once, with and without guidance, explicit noise and the optional outputs.
    cases = [
        dict(n_hist=0, guidance=None, explicit=False, want_h=False, want_x0=False, stage=0),
        dict(n_hist=1, guidance=3.5, explicit=True, want_h=True, want_x0=False, stage=1),
        dict(n_hist=2, guidance=None, explicit=False, want_h=False, want_x0=True, stage=4),
        dict(n_hist=3, guidance=7.5, explicit=False, want_h=True, want_x0=True, stage=5),
        dict(n_hist=3, guidance=0.0, explicit=True, want_h=True, want_x0=True, stage=2),
    ]
    for case in cases:
        x, m, hist, rnd = _inputs(batch, sample_shape, dtype, case["n_hist"], gen)
        mu = rnd() if case["guidance"] is not None else None
        noise = rnd() if case["explicit"] else None
        w = case["guidance"] if case["guidance"] is not None else 1.0
        out = _both(
            x=x,
            m=m,
            m_uncond=mu,
            guidance_scale=w,
            hist=hist,
            coeffs=coeffs,
            stage=case["stage"],
            seeds=seeds,
            noise=noise,
            want_h=case["want_h"],
            want_x0=case["want_x0"],
        )
        k, r = out["kernel"], out["reference"]
        if noise is None:
            z = torch.from_numpy(np.asarray(_C.philox_normal(seeds.numpy(), x[0].numel(), case["stage"], 0)))
            z = z.reshape(x.shape)
        else:
            z = noise
        (x_next, scale), h, x0 = _expected64(x, m, mu, w, hist, coeffs[case["stage"]], z)
        what = f"{case}"
        _assert_within(k["x_out"], r["x_out"], scale, dtype, f"{what} x_out kernel vs reference")
        _assert_within(r["x_out"], x_next, scale, dtype, f"{what} x_out reference vs float64")
        for name, (want, scale), asked in (("h_out", h, case["want_h"]), ("x0_out", x0, case["want_x0"])):
            if asked:
                _assert_within(k[name], r[name], scale, dtype, f"{what} {name} kernel vs reference")
                _assert_within(r[name], want, scale, dtype, f"{what} {name} reference vs float64")
            else:
                assert k[name] is None and r[name] is None
        assert (k["nonfinite"] == INT32_MAX).all() and (r["nonfinite"] == INT32_MAX).all()


def test_non_contiguous_inputs_are_read_as_their_values() -> None:
    """An expanded noise tensor, a channels-last m and a transposed history: the same step as their contiguous
    copies (the kernel reads raw pointers; launch_fused_step makes read-only inputs contiguous first)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    m = torch.randn(2, 5, 4, 3, generator=gen).permute(0, 3, 2, 1)
    h = torch.randn(2, 3, 5, 4, generator=gen).transpose(2, 3)
    noise = torch.randn(1, 3, 4, 5, generator=gen).expand(2, 3, 4, 5)
    coeffs = torch.randn(2, NUM_COEF, generator=gen, dtype=torch.float64)
    base = dict(x=x, coeffs=coeffs, stage=1, seeds=torch.tensor([1, 2]), want_h=True)
    got = _both(**base, m=m, hist=[h], noise=noise)["kernel"]
    want = _both(**base, m=m.contiguous(), hist=[h.contiguous()], noise=noise.contiguous())["kernel"]
    for name in ("x_out", "h_out"):
        assert torch.equal(got[name], want[name]), name


def test_use_noise_false_ignores_c_z() -> None:
    coeffs = torch.zeros(1, NUM_COEF, dtype=torch.float64)
    coeffs[0, 0], coeffs[0, 5] = 1.0, 100.0
    x = torch.randn(2, 33)
    out = _both(x=x, m=x, coeffs=coeffs, stage=0, seeds=torch.tensor([1, 2]), use_noise=False)
    for res in out.values():
        assert torch.equal(res["x_out"], x)


# ------------------------------------------------------------------------------------------------
# Clipped x0 (diffusers' clip_sample and thresholding) and the clip form of a row
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_per_sample_bounds(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(21)
    coeffs = torch.randn(3, NUM_COEF, generator=gen, dtype=torch.float64)
    x, m, hist, _ = _inputs(3, (5, 7), dtype, 1, gen)
    x, m = x * 3, m * 3  # so that a good share of x0 lies outside the bounds
    # Static clipping (bound 1, scale 1), thresholding (bound s, scale 1/s) and a bound nothing reaches.
    clip = torch.tensor([[1.0, 1.0], [2.5, 0.4], [1e30, 1.0]], dtype=torch.float32)
    seeds = torch.tensor([1, 2, 3])
    out = _both(x=x, m=m, hist=hist, coeffs=coeffs, stage=1, seeds=seeds, clip=clip, want_h=True, want_x0=True)
    z = torch.from_numpy(np.asarray(_C.philox_normal(seeds.numpy(), x[0].numel(), 1, 0))).reshape(x.shape)
    expected = _expected64(x, m, None, 1.0, hist, coeffs[1], z, clip)
    for name, (want, scale) in zip(("x_out", "h_out", "x0_out"), expected):
        _assert_within(out["kernel"][name], out["reference"][name], scale, dtype, f"{name} kernel vs reference")
        _assert_within(out["reference"][name], want, scale, dtype, f"{name} reference vs float64")
    x0 = out["reference"]["x0_out"].float()
    assert float(x0[0].abs().max()) <= 1.0 and float(x0[1].abs().max()) <= 1.0 + 1e-6
    assert float(x0[2].abs().max()) > 1.0


def test_clip_form_is_the_same_step_without_clipping_and_diffusers_step_with_it() -> None:
    sch = Schedule.vp_discrete()
    prog = build_program(sch, sch.grid(10), "ddim", "eps", torch.device("cpu"), eta=0.0)
    rows = clip_form(prog.coef)
    assert (rows[:, 1] == 0).all() and (rows[:, 10] != 0).all()
    gen = torch.Generator().manual_seed(4)
    x, eps = torch.randn(2, 64, generator=gen) * 2, torch.randn(2, 64, generator=gen) * 2
    seeds = torch.tensor([1, 2])
    k = 3
    plain = _both(x=x, m=eps, coeffs=prog.coef_device, stage=k, seeds=seeds, use_noise=False, want_x0=True)
    folded = _both(x=x, m=eps, coeffs=torch.from_numpy(rows), stage=k, seeds=seeds, use_noise=False, want_x0=True)
    for impl in ("kernel", "reference"):
        torch.testing.assert_close(folded[impl]["x_out"], plain[impl]["x_out"], rtol=1e-5, atol=1e-5)
    # With clipping: diffusers' DDIM (eta 0) clips x0, recomputes eps from it and steps with both.
    clipped = _both(
        x=x,
        m=eps,
        coeffs=torch.from_numpy(rows),
        stage=k,
        seeds=seeds,
        use_noise=False,
        clip=torch.tensor([[1.0, 1.0]] * 2),
        want_x0=True,
    )
    a_t, a_s = float(prog.grid.alpha[k]) ** 2, float(prog.grid.alpha[k + 1]) ** 2
    xd, ed = x.double(), eps.double()
    x0 = ((xd - (1 - a_t) ** 0.5 * ed) / a_t**0.5).clamp(-1, 1)
    eps_c = (xd - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    want = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps_c
    assert float((x0.abs() == 1).float().mean()) > 0.1  # the bound is active
    for impl in ("kernel", "reference"):
        torch.testing.assert_close(clipped[impl]["x_out"].double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clipped[impl]["x0_out"].double(), x0, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Per-row programs (the serving engine): one coefficient row, stage, history slots and guidance per sample
# ------------------------------------------------------------------------------------------------


def _per_row_case(dtype: torch.dtype, batch: int = 4, sample_shape: tuple = (3, 7), slots: int = 3):
    gen = torch.Generator().manual_seed(99 + DTYPES.index(dtype))
    coeffs = torch.randn(9, NUM_COEF, generator=gen, dtype=torch.float64)
    x, m, _, rnd = _inputs(batch, sample_shape, dtype, 0, gen)
    mu = rnd()
    pool = torch.stack([rnd() for _ in range(slots)])
    # (coefficient row, noise stage, read slots, write slot) per sample: different rows, stages and slot
    # patterns, including a sample that reads and writes the same slot and one with no history at all.
    rows = torch.tensor(
        [[0, 0, -1, -1, -1, 0], [5, 7, 0, -1, -1, 1], [8, 2, 2, 1, 0, 2], [3, 11, 1, 0, -1, -1]][:batch],
        dtype=torch.int32,
    )
    guidance = torch.tensor([1.0, 7.5, 0.0, 3.0][:batch], dtype=torch.float32)
    seeds = torch.tensor([5, -7, 2**40, 9][:batch], dtype=torch.int64)
    return coeffs, x, m, mu, pool, rows, guidance, seeds


def _run_per_row(fn, coeffs, x, m, mu, pool, rows, guidance, seeds, clip=None):
    out = {
        "x_out": torch.full_like(x, float("nan")),
        "x0_out": torch.full_like(x, float("nan")),
        "pool": pool.clone(),
        "nonfinite": torch.full((x.shape[0],), INT32_MAX, dtype=torch.int32),
    }
    fn(
        x,
        m,
        mu,
        1.0,
        [],
        coeffs,
        0,
        seeds,
        0,
        True,
        None,
        out["x_out"],
        None,
        out["x0_out"],
        out["nonfinite"],
        clip,
        rows,
        out["pool"],
        guidance,
    )
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_kernel_matches_reference(dtype: torch.dtype) -> None:
    case = _per_row_case(dtype)
    clip = torch.tensor([[1.0, 1.0], [2.0, 0.5], [1e30, 1.0], [0.5, 2.0]], dtype=torch.float32)
    for c in (None, clip):
        k = _run_per_row(launch_fused_step, *case, clip=c)
        r = _run_per_row(fused_step_reference, *case, clip=c)
        coeffs, x, m, mu, pool, rows, guidance, seeds = case
        for b in range(x.shape[0]):
            stage = int(rows[b, 1])
            z = torch.from_numpy(np.asarray(_C.philox_normal(seeds[b : b + 1].numpy(), x[0].numel(), stage, 0)))
            hist = [pool[s, b : b + 1] if s >= 0 else torch.zeros_like(x[b : b + 1]) for s in rows[b, 2:5].tolist()]
            expected = _expected64(
                x[b : b + 1],
                m[b : b + 1],
                mu[b : b + 1],
                float(guidance[b]),
                hist,
                coeffs[int(rows[b, 0])],
                z.reshape(x[b : b + 1].shape),
                None if c is None else c[b : b + 1],
            )
            (x_next, xs), (h_new, hs), (x0, x0s) = expected
            _assert_within(k["x_out"][b : b + 1], r["x_out"][b : b + 1], xs, dtype, f"sample {b} x_out kernel vs ref")
            _assert_within(r["x_out"][b : b + 1], x_next, xs, dtype, f"sample {b} x_out ref vs float64")
            _assert_within(k["x0_out"][b : b + 1], x0, x0s, dtype, f"sample {b} x0_out kernel vs float64")
            write = int(rows[b, 5])
            for s in range(pool.shape[0]):
                if s == write:
                    _assert_within(k["pool"][s, b : b + 1], h_new, hs, dtype, f"sample {b} slot {s} kernel")
                    _assert_within(r["pool"][s, b : b + 1], h_new, hs, dtype, f"sample {b} slot {s} reference")
                else:  # slots a sample does not write are left alone
                    assert torch.equal(k["pool"][s, b], pool[s, b]) and torch.equal(r["pool"][s, b], pool[s, b])
        assert (k["nonfinite"] == INT32_MAX).all() and (r["nonfinite"] == INT32_MAX).all()


def test_per_row_reference_equals_single_program_calls_bitwise() -> None:
    """Each sample of a per-row call gets exactly what a one-sample call of its own program gives."""
    coeffs, x, m, mu, pool, rows, guidance, seeds = _per_row_case(torch.float32)
    together = _run_per_row(fused_step_reference, coeffs, x, m, mu, pool, rows, guidance, seeds)
    for b in range(x.shape[0]):
        stage = int(rows[b, 1])
        table = torch.zeros(stage + 1, NUM_COEF, dtype=torch.float64)
        table[stage] = coeffs[int(rows[b, 0])]
        reads = [s for s in rows[b, 2:5].tolist()]
        hist = [pool[s, b : b + 1].clone() if s >= 0 else torch.zeros_like(x[b : b + 1]) for s in reads]
        x_out, h_out, x0_out = (torch.empty_like(x[b : b + 1]) for _ in range(3))
        nonfinite = torch.full((1,), INT32_MAX, dtype=torch.int32)
        fused_step_reference(
            x[b : b + 1],
            m[b : b + 1],
            mu[b : b + 1],
            float(guidance[b]),
            hist,
            table,
            stage,
            seeds[b : b + 1],
            0,
            True,
            None,
            x_out,
            h_out,
            x0_out,
            nonfinite,
        )
        assert torch.equal(together["x_out"][b : b + 1], x_out), b
        assert torch.equal(together["x0_out"][b : b + 1], x0_out), b
        if int(rows[b, 5]) >= 0:
            assert torch.equal(together["pool"][int(rows[b, 5]), b : b + 1], h_out), b


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_per_row_nonfinite_records_each_samples_own_stage(impl: str) -> None:
    fn = launch_fused_step if impl == "kernel" else fused_step_reference
    coeffs, x, m, mu, pool, rows, guidance, seeds = _per_row_case(torch.float32)
    m = m.clone()
    m[1, 0, 0] = float("nan")
    m[3, 2, 6] = float("inf")
    out = _run_per_row(fn, coeffs, x, m, mu, pool, rows, guidance, seeds)
    assert out["nonfinite"].tolist() == [INT32_MAX, 7, INT32_MAX, 11]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_per_row_bad_arguments(impl: str) -> None:
    fn = launch_fused_step if impl == "kernel" else fused_step_reference
    coeffs, x, m, mu, pool, rows, guidance, seeds = _per_row_case(torch.float32)
    with pytest.raises(ValueError, match="rows must be int32"):
        _run_per_row(fn, coeffs, x, m, mu, pool, rows.long(), guidance, seeds)
    with pytest.raises(ValueError, match="rows must be int32"):
        _run_per_row(fn, coeffs, x, m, mu, pool, rows[:2], guidance, seeds)
    with pytest.raises(ValueError, match="pool must be"):
        _run_per_row(fn, coeffs, x, m, mu, pool[:, :2], rows, guidance, seeds)
    with pytest.raises(ValueError, match="row_guidance"):
        _run_per_row(fn, coeffs, x, m, mu, pool, rows, guidance.double(), seeds)
    with pytest.raises(ValueError, match="pass rows"):
        _run_per_row(fn, coeffs, x, m, mu, pool, None, guidance, seeds)
    with pytest.raises(ValueError, match="hist must be"):
        fn(
            x,
            m,
            mu,
            1.0,
            [x],
            coeffs,
            0,
            seeds,
            0,
            True,
            None,
            torch.empty_like(x),
            None,
            None,
            torch.zeros(4, dtype=torch.int32),
            None,
            rows,
            pool,
            guidance,
        )


# ------------------------------------------------------------------------------------------------
# Philox noise element by element
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [0, 1])
def test_philox_noise_elementwise(stream: int) -> None:
    # A row that is pure noise: x_out = z. 1025 elements span two kernel blocks (BLOCK = 1024), so
    # the element index of the second block is checked too.
    coeffs = torch.zeros(4, NUM_COEF, dtype=torch.float64)
    coeffs[:, 5] = 1.0
    seeds = torch.tensor([0, -1, 2**33 + 5], dtype=torch.int64)
    x = torch.zeros(3, 1025)
    for stage in (0, 3):
        out = _both(x=x, m=x, coeffs=coeffs, stage=stage, seeds=seeds, stream=stream)
        want = torch.from_numpy(np.asarray(_C.philox_normal(seeds.numpy(), 1025, stage, stream)))
        torch.testing.assert_close(out["reference"]["x_out"], want, rtol=0, atol=0)  # the C++ generator itself
        diff = float((out["kernel"]["x_out"] - want).abs().max())
        assert diff <= 1e-6, (stage, diff)  # observed <= 4.8e-7
    # Different stages and samples get different noise (a counter bug would repeat it).
    a = _both(x=x, m=x, coeffs=coeffs, stage=0, seeds=seeds, stream=stream)["kernel"]["x_out"]
    b = _both(x=x, m=x, coeffs=coeffs, stage=3, seeds=seeds, stream=stream)["kernel"]["x_out"]
    assert not torch.allclose(a, b) and not torch.allclose(a[0], a[1])


# ------------------------------------------------------------------------------------------------
# The non-finite recorder
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_nonfinite_records_first_stage_per_sample(impl: str, poison: str) -> None:
    fn = launch_fused_step if impl == "kernel" else fused_step_reference
    coeffs = torch.zeros(8, NUM_COEF, dtype=torch.float64)
    coeffs[:, 0], coeffs[:, 1] = 0.9, 0.1
    seeds = torch.tensor([1, 2, 3], dtype=torch.int64)
    nonfinite = torch.full((3,), INT32_MAX, dtype=torch.int32)
    x = torch.randn(3, 1025)
    x[1, 1000] = float(poison)  # sample 1, in the first block
    out = torch.empty_like(x)
    fn(x, x.clone(), None, 1.0, [], coeffs, 3, seeds, 0, False, None, out, None, None, nonfinite)
    assert nonfinite.tolist() == [INT32_MAX, 3, INT32_MAX]
    # A later stage: sample 1 is still bad (its first stage stays 3), sample 0 goes bad in the second
    # block (element 1024) through m, sample 2 stays finite.
    m = x.clone()
    m[0, 1024] = float(poison)
    fn(x, m, None, 1.0, [], coeffs, 6, seeds, 0, False, None, out, None, None, nonfinite)
    assert nonfinite.tolist() == [6, 3, INT32_MAX]
    # An even later clean call changes nothing.
    fn(
        torch.zeros_like(x),
        torch.zeros_like(x),
        None,
        1.0,
        [],
        coeffs,
        7,
        seeds,
        0,
        False,
        None,
        out,
        None,
        None,
        nonfinite,
    )
    assert nonfinite.tolist() == [6, 3, INT32_MAX]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy cast
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_nonfinite_from_fp16_overflow(impl: str) -> None:
    # Finite inputs whose update overflows float16 (max 65504) are caught too: the check reads the stored value.
    fn = launch_fused_step if impl == "kernel" else fused_step_reference
    coeffs = torch.zeros(3, NUM_COEF, dtype=torch.float64)
    coeffs[:, 0] = 1e4
    x = torch.zeros(2, 9, dtype=torch.float16)
    x[1, 4] = 10.0
    nonfinite = torch.full((2,), INT32_MAX, dtype=torch.int32)
    out = torch.empty_like(x)
    fn(x, x, None, 1.0, [], coeffs, 2, torch.tensor([0, 1]), 0, False, None, out, None, None, nonfinite)
    assert torch.isinf(out[1, 4]) and nonfinite.tolist() == [INT32_MAX, 2]


# ------------------------------------------------------------------------------------------------
# The registered op
# ------------------------------------------------------------------------------------------------


def _op_args(with_optional: bool) -> tuple:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=gen)
    m = torch.randn(2, 3, 4, generator=gen)
    coeffs = torch.randn(3, NUM_COEF, generator=gen, dtype=torch.float64)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    nonfinite = torch.full((2,), INT32_MAX, dtype=torch.int32)
    if not with_optional:
        return (x, m, None, 1.0, [], coeffs, 1, seeds, 0, True, None, torch.empty_like(x), None, None, nonfinite)
    return (
        x,
        m,
        torch.randn(2, 3, 4, generator=gen),
        2.0,
        [torch.randn_like(x), torch.randn_like(x)],
        coeffs,
        2,
        seeds,
        0,
        True,
        torch.randn_like(x),
        torch.empty_like(x),
        torch.empty_like(x),
        torch.empty_like(x),
        nonfinite,
    )


@pytest.mark.parametrize("with_optional", [False, True])
def test_op_opcheck_cpu(with_optional: bool) -> None:
    torch.library.opcheck(torch.ops.fastdiff.fused_step.default, _op_args(with_optional))


def test_op_opcheck_cpu_per_row_and_clip() -> None:
    coeffs, x, m, mu, pool, rows, guidance, seeds = _per_row_case(torch.float32)
    clip = torch.tensor([[1.0, 1.0]] * 4)
    args = (
        x,
        m,
        mu,
        1.0,
        [],
        coeffs,
        0,
        seeds,
        0,
        True,
        None,
        torch.empty_like(x),
        None,
        torch.empty_like(x),
        torch.full((4,), INT32_MAX, dtype=torch.int32),
        clip,
        rows,
        pool.clone(),
        guidance,
    )
    torch.library.opcheck(torch.ops.fastdiff.fused_step.default, args)


def test_op_cpu_equals_reference() -> None:
    args = _op_args(True)
    a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    b = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    torch.ops.fastdiff.fused_step(*a)
    fused_step_reference(*b)
    for i in (11, 12, 13, 14):
        assert torch.equal(a[i], b[i])


class _OpCounter(TorchDispatchMode):
    """Records every aten/custom op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket if hasattr(func, "overloadpacket") else func))
        return func(*args, **(kwargs or {}))


def test_one_op_per_step() -> None:
    args = list(_op_args(True))
    steps = 4
    with _OpCounter() as counter:
        for k in range(steps):
            args[6] = k % 3
            torch.ops.fastdiff.fused_step(*args)
    assert counter.ops == ["fastdiff.fused_step"] * steps, counter.ops


def test_pipeline_loop_dispatches_one_step_op_per_stage() -> None:
    # The whole sampling loop, with a network that dispatches nothing: between the first and the last
    # step op there must be nothing but step ops (no per-step noise, copy or check ops).
    from fastdiff.pipeline import Pipeline

    sch = Schedule.vp_discrete()
    out_m = torch.zeros(3, 4)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out_m

    pipe = Pipeline(model, sch, device="cpu")
    with _OpCounter() as counter:
        pipe.sample((3, 4), sampler="ddpm", steps=6, progress=False)
    steps = [i for i, op in enumerate(counter.ops) if op == "fastdiff.fused_step"]
    assert len(steps) == 6, counter.ops
    assert counter.ops[steps[0] : steps[-1] + 1] == ["fastdiff.fused_step"] * 6, counter.ops
