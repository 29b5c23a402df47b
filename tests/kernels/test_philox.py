"""Counter-based Philox noise: C++ vs an independent numpy Philox, C++ vs Triton (interpreted), the
counter contract, batch invariance, statistics, the custom op and derive_seeds.

What we observe (CPU, numpy 1.26, glibc): the Philox words and uniforms agree bit for bit; the normals
differ by at most ~4.8e-7 (1-4 float32 ulps; about a quarter of the elements differ at all). The whole
difference is float32 log/cos/sin: Triton's
interpreter evaluates them with numpy's float32 SIMD routines, the C++ with glibc's logf/cosf (which
are within one ulp of the float64 result rounded). Recomputing the Box-Muller step in numpy float32
from the C++ words reproduces the interpreted kernel exactly. The tolerance is the contract's 1e-5.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from scipy import stats  # noqa: E402

from fastdiff import _C  # noqa: E402
from fastdiff.kernels import philox as P  # noqa: E402
from fastdiff.kernels.grid import sample_grid  # noqa: E402

TOL = 1e-5
SEEDS = [0, 1, -1, -(2**63), 2**63 - 1, 2**32 + 17, 0x0123456789ABCDEF, -987654321012]

# ------------------------------------------------------------------------------------------------
# An independent Philox4x32-10 (numpy uint64, masked to 32 bits), straight from Salmon et al. 2011 /
# Random123, with nothing shared with the C++ or Triton code.
# ------------------------------------------------------------------------------------------------
_M = np.uint64(0xFFFFFFFF)


def philox_oracle(key: int, counters: np.ndarray) -> np.ndarray:
    key &= (1 << 64) - 1
    k0 = np.uint64(key & 0xFFFFFFFF)
    k1 = np.uint64(key >> 32)
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # < 2**64: no wrap
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [
            ((p1 >> np.uint64(32)) ^ c[1] ^ k0) & _M,
            p1 & _M,
            ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & _M,
            p0 & _M,
        ]
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M
    return np.stack(c, axis=1).astype(np.uint32)


def normal_oracle(words: np.ndarray, lanes: np.ndarray) -> np.ndarray:
    """Triton's uint_to_uniform_float + pair_uniform_to_normal (cosine for even lanes, sine for odd ones, on the
    word pair (0, 1) for lanes 0-1 and (2, 3) for lanes 2-3), the transcendental part in float64."""

    def uniform(x: np.ndarray) -> np.ndarray:
        i = x.view(np.int32)
        i = np.where(i < 0, ~i, i)
        return i.astype(np.float32) * np.float32(4.6566127342e-10)

    lanes = np.asarray(lanes)
    rows = np.arange(len(words))
    first = 2 * (lanes // 2)
    u1 = np.maximum(np.float32(1e-7), uniform(np.ascontiguousarray(words[rows, first])))
    th = np.float32(6.283185307179586) * uniform(np.ascontiguousarray(words[rows, first + 1]))
    trig = np.where(lanes % 2 == 0, np.cos(th.astype(np.float64)), np.sin(th.astype(np.float64)))
    return np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * trig


def contract_counters(j: np.ndarray, stage: int, stream: int) -> np.ndarray:
    """The Philox counter of each element index in ``j``: (c lo, c hi, stage, stream) with c = j >> 2."""
    c = np.asarray(j, dtype=np.uint64) >> np.uint64(2)
    n = c.shape[0]
    return np.stack(
        [c & _M, c >> np.uint64(32), np.full(n, stage, np.uint64), np.full(n, stream, np.uint64)], axis=1
    ).astype(np.uint32)


def contract_normals(seed: int, j: np.ndarray, stage: int, stream: int) -> np.ndarray:
    """The contract's normals at element indices ``j``, from the oracle Philox alone."""
    j = np.asarray(j, dtype=np.uint64)
    return normal_oracle(philox_oracle(seed, contract_counters(j, stage, stream)), (j & np.uint64(3)).astype(np.int64))


def test_cpp_philox_words_match_independent_oracle() -> None:
    rng = np.random.default_rng(7)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    counters[0] = 0
    counters[1] = 0xFFFFFFFF
    for seed in SEEDS:
        got = _C.philox4x32_10(np.full(64, seed, dtype=np.int64), counters)
        np.testing.assert_array_equal(got, philox_oracle(seed, counters))


def test_cpp_philox_known_answer_vectors() -> None:
    # Random123's kat_vectors for philox4x32_10 (counter, key -> output), key = k0 | k1 << 32.
    counters = np.array(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], dtype=np.uint32
    )
    keys = np.array([0, -1, (0x299F31D0 << 32) | 0xA4093822], dtype=np.int64)
    expected = np.array(
        [
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ],
        dtype=np.uint32,
    )
    np.testing.assert_array_equal(_C.philox4x32_10(keys, counters), expected)
    for i in range(3):
        np.testing.assert_array_equal(philox_oracle(int(keys[i]), counters[i : i + 1])[0], expected[i])


@pytest.mark.parametrize("stage,stream", [(0, 0), (3, 1), (2**32 - 1, 7)])
def test_cpp_normals_follow_the_counter_contract(stage: int, stream: int) -> None:
    numel = 3000
    seeds = np.array(SEEDS, dtype=np.int64)
    got = _C.philox_normal(seeds, numel, stage, stream)
    assert got.dtype == np.float32 and got.shape == (len(SEEDS), numel)
    for b, seed in enumerate(SEEDS):
        want = contract_normals(seed, np.arange(numel), stage, stream)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# C++ vs Triton (interpreted under TRITON_INTERPRET=1 on CPU tensors)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 1000, 4097])
def test_cpu_matches_triton_elementwise(numel: int) -> None:
    seeds = torch.tensor([0, -1, 2**32 + 17, -(2**40) - 3, 123456789], dtype=torch.int64)
    combos = [(k, r) for k in range(4) for r in (0, 1)] if numel < 4000 else [(0, 0), (3, 1)]
    worst = 0.0
    for stage, stream in combos:
        cpu = P.philox_normal(seeds, numel, stage, stream)
        tri = P.launch_philox_normal_triton(seeds, numel, stage, stream)
        assert cpu.shape == tri.shape == (5, numel) and tri.dtype == torch.float32
        diff = (cpu - tri).abs().max().item()
        worst = max(worst, diff)
        assert diff <= TOL, (stage, stream, diff)
    assert worst <= 1e-6  # observed <= 4.8e-7: a few float32 ulps from libm differences in log/cos


@triton.jit
def _helper_probe_kernel(
    seed_ptr, out_ptr, j0, n, stage, BLOCK: tl.constexpr, STREAM: tl.constexpr, WIDE: tl.constexpr
):
    # The way a fused kernel calls the helper: int32 or int64 indices, stream as a constexpr.
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if WIDE:
        j = j0 + offs.to(tl.int64)
    else:
        j = offs
    z = P.normal_at(tl.load(seed_ptr), j, stage, STREAM)
    tl.store(out_ptr + offs, z, mask=mask)


@pytest.mark.parametrize("wide", [False, True])
def test_triton_helper_int32_and_high_indices(wide: bool) -> None:
    seed, stage, stream, n = -(2**62) + 5, 5, 1, 100
    j0 = 2**35 + 2**34 - 50 if wide else 0  # the counter j >> 2 crosses 2**32: c1 changes within the block
    out = torch.empty(n, dtype=torch.float32)
    _helper_probe_kernel[(1,)](torch.tensor([seed]), out, j0, n, stage, BLOCK=128, STREAM=stream, WIDE=wide)
    want = contract_normals(seed, np.arange(j0, j0 + n, dtype=np.uint64), stage, stream)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=TOL)
    if not wide:
        np.testing.assert_allclose(out.numpy(), P.philox_normal(torch.tensor([seed]), n, stage, stream)[0], atol=TOL)


def test_triton_helper_matches_tl_randn4x_at_stage0_stream0() -> None:
    # With stage = stream = 0 the contract is exactly tl.randn4x(seed, c): its four outputs are elements 4c .. 4c + 3.
    @triton.jit
    def randn4x_kernel(seed_ptr, out_ptr, BLOCK: tl.constexpr):
        c = tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(tl.load(seed_ptr), c)
        tl.store(out_ptr + 4 * c, n0)
        tl.store(out_ptr + 4 * c + 1, n1)
        tl.store(out_ptr + 4 * c + 2, n2)
        tl.store(out_ptr + 4 * c + 3, n3)

    seed = torch.tensor([2**40 + 3])
    out = torch.empty(4 * 128)
    randn4x_kernel[(1,)](seed, out, BLOCK=128)
    torch.testing.assert_close(P.launch_philox_normal_triton(seed, 4 * 128, 0, 0)[0], out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Invariance and independence
# ------------------------------------------------------------------------------------------------


def test_batch_invariance_cpu_and_triton() -> None:
    numel = 50
    ref = P.philox_normal(P.derive_seeds(42, 64), numel, 2, 0)
    for batch in (1, 7, 64):
        seeds = P.derive_seeds(42, batch)
        torch.testing.assert_close(seeds, P.derive_seeds(42, 64)[:batch], rtol=0, atol=0)
        torch.testing.assert_close(P.philox_normal(seeds, numel, 2, 0), ref[:batch], rtol=0, atol=0)
    # Triton too, and in any order: a row depends on its own seed only.
    seeds = P.derive_seeds(42, 7)
    perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])
    tri = P.launch_philox_normal_triton(seeds[perm], numel, 2, 0)
    torch.testing.assert_close(tri, ref[:7][perm], rtol=0, atol=TOL)
    one = P.launch_philox_normal_triton(seeds[3:4], numel, 2, 0)
    torch.testing.assert_close(one[0], tri[5], rtol=0, atol=0)
    # numel does not change a prefix either.
    torch.testing.assert_close(
        P.philox_normal(seeds, 20, 2, 0), P.philox_normal(seeds, numel, 2, 0)[:, :20], rtol=0, atol=0
    )


def test_different_seed_stage_stream_give_different_noise() -> None:
    n = 20000
    base = P.philox_normal(torch.tensor([11]), n, 0, 0)[0]
    others = {
        "seed": P.philox_normal(torch.tensor([12]), n, 0, 0)[0],
        "seed_hi": P.philox_normal(torch.tensor([11 + 2**32]), n, 0, 0)[0],
        "stage": P.philox_normal(torch.tensor([11]), n, 1, 0)[0],
        "stream": P.philox_normal(torch.tensor([11]), n, 0, 1)[0],
    }
    # Independent N(0,1) streams: correlation ~ N(0, 1/n); 5 sigma = 0.035.
    for name, other in others.items():
        assert (other != base).float().mean() > 0.999, name
        r = float(np.corrcoef(base.numpy(), other.numpy())[0, 1])
        assert abs(r) < 5 / np.sqrt(n), (name, r)


def test_statistics_of_the_noise() -> None:
    # 1e5 samples over 4 seeds x 25000 elements, two stages (fixed seeds: the test is deterministic).
    z = P.philox_normal(P.derive_seeds(2024, 4), 25000, 3, 0).double().flatten().numpy()
    n = z.size
    # Mean ~ N(0, 1/n), sample std ~ N(1, 1/(2n)): 5-sigma bounds (0.016 and 0.011 at n = 1e5).
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    # KS against N(0, 1). For a correct generator the p-value is uniform on (0, 1), so p > 1e-3 fails a
    # correct generator one time in a thousand seeds (D < ~0.0062 here); a mean shift of 0.01 or a
    # 1% scale error already gives p ~ 1e-3..1e-5, and broken Box-Muller/uniform mapping p ~ 0.
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Tails: P(|z| > 3) = 0.0027 -> expect 270 +- 16; 5-sigma window.
    tail = int((np.abs(z) > 3).sum())
    assert abs(tail - 0.0027 * n) < 5 * np.sqrt(0.0027 * n)
    # Uniform words: Box-Muller caps |z| at sqrt(-2 ln 1e-7) = 5.68.
    assert np.abs(z).max() <= 5.68


def test_the_four_normals_of_one_counter_are_independent() -> None:
    # Elements 4c .. 4c + 3 share a Philox call: (r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1). Each lane is N(0, 1),
    # lanes are uncorrelated, and a Box-Muller pair's squared radius is chi-square with 2 degrees of freedom
    # (exponential, mean 2), which fails if a lane repeated another's angle or radius.
    z = P.philox_normal(P.derive_seeds(7, 4), 40000, 1, 0).double().reshape(-1, 4).numpy()
    n = len(z)
    for lane in range(4):
        assert stats.kstest(z[:, lane], "norm").pvalue > 1e-3, lane
    corr = np.corrcoef(z.T)
    assert np.all(np.abs(corr[np.triu_indices(4, 1)]) < 5 / np.sqrt(n)), corr
    for pair in ((0, 1), (2, 3), (0, 2), (1, 3)):
        radius2 = z[:, pair[0]] ** 2 + z[:, pair[1]] ** 2
        assert stats.kstest(radius2, "expon", args=(0, 2)).pvalue > 1e-3, pair
    # The squares of a pair are not dependent through a shared radius beyond what independence gives.
    assert abs(np.corrcoef(z[:, 0] ** 2, z[:, 1] ** 2)[0, 1]) < 5 / np.sqrt(n)


# ------------------------------------------------------------------------------------------------
# The custom op
# ------------------------------------------------------------------------------------------------


def test_custom_op_opcheck_cpu() -> None:
    seeds = torch.tensor([3, -4, 2**35], dtype=torch.int64)
    for args in [(seeds, 37, 2, 1), (seeds, 1, 0, 0), (seeds[:0], 5, 1, 0)]:
        torch.library.opcheck(torch.ops.fastdiff.philox_normal.default, args)


def test_custom_op_fake_and_compile() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        seeds = torch.empty(6, dtype=torch.int64)
        out = torch.ops.fastdiff.philox_normal(seeds, 11, 0, 1)
        assert out.shape == (6, 11) and out.dtype == torch.float32

    def f(seeds: torch.Tensor) -> torch.Tensor:
        return 2 * torch.ops.fastdiff.philox_normal(seeds, 9, 1, 0)

    seeds = torch.tensor([1, 2])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(seeds), f(seeds), rtol=0, atol=0)


def test_philox_normal_validation() -> None:
    s = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="numel"):
        P.philox_normal(s, -1, 0)
    with pytest.raises(ValueError, match="stage"):
        P.philox_normal(s, 4, -1)
    with pytest.raises(ValueError, match="stage"):
        P.philox_normal(s, 4, 2**32)
    with pytest.raises(ValueError, match="stream"):
        P.philox_normal(s, 4, 0, -2)
    with pytest.raises(ValueError, match="seeds"):
        P.philox_normal(torch.zeros(2, 2, dtype=torch.int64), 4, 0)
    with pytest.raises(TypeError, match="seeds"):
        P.philox_normal(torch.zeros(2), 4, 0)
    with pytest.raises(TypeError, match="stage"):
        P.philox_normal(s, 4, 1.0)
    with pytest.raises(ValueError, match="numel"):
        P.launch_philox_normal_triton(s, -3, 0, 0)
    assert P.philox_normal(s, 0, 0).shape == (2, 0)
    assert P.launch_philox_normal_triton(s[:0], 5, 0, 0).shape == (0, 5)


def test_cpp_binding_validation() -> None:
    s = np.array([1, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="numel"):
        _C.philox_normal(s, -1, 0, 0)
    with pytest.raises(ValueError, match="stage"):
        _C.philox_normal(s, 3, -1, 0)
    with pytest.raises(ValueError, match="stream"):
        _C.philox_normal(s, 3, 0, -1)
    with pytest.raises(ValueError, match="stream"):
        _C.philox_normal(s, 3, 0, 2**32)
    with pytest.raises(ValueError, match="seeds"):
        _C.philox_normal(np.zeros((2, 2), dtype=np.int64), 3, 0, 0)
    with pytest.raises(TypeError, match="seeds"):
        _C.philox_normal(np.zeros(2), 3, 0, 0)
    # Other integer dtypes keep their bits (uint64 2**64 - 1 is the int64 seed -1).
    np.testing.assert_array_equal(
        _C.philox_normal(np.array([2**64 - 1], dtype=np.uint64), 5, 0, 0),
        _C.philox_normal(np.array([-1], dtype=np.int64), 5, 0, 0),
    )


# ------------------------------------------------------------------------------------------------
# derive_seeds
# ------------------------------------------------------------------------------------------------


def _splitmix64_reference(seed: int, b: int) -> int:
    """splitmix64.c (Vigna): state = seed; for each call state += gamma, then mix. Output b is call b+1."""
    m = (1 << 64) - 1
    z = (seed + (b + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _to_i64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def test_derive_seeds_from_int() -> None:
    # Known first outputs of splitmix64 seeded with 0 (also java.util.SplittableRandom's mixing).
    s0 = P.derive_seeds(0, 3)
    assert s0.dtype == torch.int64 and s0.shape == (3,)
    assert [x & ((1 << 64) - 1) for x in s0.tolist()] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    for seed in (1, -1, 2**63, 2**64 - 1, -(2**63), 123456789):
        got = P.derive_seeds(seed, 5).tolist()
        assert got == [_to_i64(_splitmix64_reference(seed & ((1 << 64) - 1), b)) for b in range(5)]
    # Prefix property (batch-size invariance) and distinct seeds.
    big = P.derive_seeds(7, 1000)
    assert torch.equal(P.derive_seeds(7, 10), big[:10])
    assert len(set(big.tolist())) == 1000
    assert not torch.equal(P.derive_seeds(8, 10), big[:10])
    assert P.derive_seeds(np.int64(7), 4).tolist() == big[:4].tolist()
    assert P.derive_seeds(7, 0).shape == (0,)


def test_derive_seeds_explicit() -> None:
    assert P.derive_seeds([5, -6, 2**64 - 1], 3).tolist() == [5, -6, -1]
    assert P.derive_seeds((1, 2), 2).tolist() == [1, 2]
    t = torch.tensor([9, 8, 7], dtype=torch.int32)
    out = P.derive_seeds(t, 3)
    assert out.dtype == torch.int64 and out.tolist() == [9, 8, 7]
    assert P.derive_seeds(np.array([4, 5], dtype=np.uint32), 2).tolist() == [4, 5]


@pytest.mark.parametrize(
    "seed,batch,exc,match",
    [
        ([1, 2], 3, ValueError, "expected 3 seeds"),
        (torch.tensor([1, 2]), 3, ValueError, "shape"),
        (torch.tensor([[1, 2]]), 2, ValueError, "shape"),
        (torch.tensor([1.0, 2.0]), 2, TypeError, "integer dtype"),
        (torch.tensor([True, False]), 2, TypeError, "integer dtype"),
        (np.array([1.0]), 1, TypeError, "integer dtype"),
        ([1, 2.5], 2, TypeError, r"seed\[1\]"),
        ([1, 2**64], 2, ValueError, r"seed\[1\]"),
        (2**64, 2, ValueError, "seed"),
        (-(2**63) - 1, 2, ValueError, "seed"),
        (1.5, 2, TypeError, "seed"),
        (True, 2, TypeError, "seed"),
        ("12", 2, TypeError, "seed"),
        (None, 2, TypeError, "seed"),
        (3, -1, ValueError, "batch"),
        (3, 2.0, TypeError, "batch"),
    ],
)
def test_derive_seeds_errors(seed: object, batch: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        P.derive_seeds(seed, batch)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# One stage per sample (the serving engine)
# ------------------------------------------------------------------------------------------------


def test_philox_normal_rows_equals_per_sample_calls_and_triton() -> None:
    seeds = torch.tensor([3, -1, 2**40 + 7, 3], dtype=torch.int64)
    stages = torch.tensor([0, 5, 2, 9], dtype=torch.int32)
    rows = P.philox_normal_rows(seeds, 1030, stages, 0)
    for b in range(4):
        assert torch.equal(rows[b : b + 1], P.philox_normal(seeds[b : b + 1], 1030, int(stages[b]), 0))
    assert not torch.equal(rows[0], rows[3])  # same seed, other stage: other noise
    out = torch.empty(4, 1030)
    P.philox_normal_rows_kernel[sample_grid(4, 1030, 1024)](seeds, stages, out, 1030, 0, BLOCK=1024)
    assert float((out - rows).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="stages must be"):
        P.philox_normal_rows(seeds, 10, stages[:2], 0)
