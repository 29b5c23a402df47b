// Philox normals for a block of consecutive elements (fast_normal.h), four per Philox call (the counter contract
// of philox.h), shaped for what limits each part:
//  - Philox (ten rounds of two 32x32->64 multiplies) is bound by the vector multiply unit. pmuludq does the
//    widening multiply directly when each 32-bit word sits in a 64-bit lane; the compiler cannot be led to that
//    layout from plain loops (it packs and unpacks the halves around every multiply), so it is written with
//    intrinsics: SSE2 (two counters per register), AVX2 where the CPU has it (four; cpu_isa.h), the scalar
//    philox4x32_10 where SSE2 is absent.
//  - Box-Muller is one long dependency chain per pair of elements (log, divide, sqrt, then cosine and sine from
//    one range reduction). It runs on 8-lane vector types (GCC/Clang vector extensions): each operation becomes
//    two independent SSE instructions (one AVX2), so two chains are in flight at once instead of the core
//    waiting on latency. It is built twice, for plain x86-64 and for AVX2 (whose three-operand forms drop the
//    register copies: ~1.7x faster), picked once (cpu_isa.h); both do the same IEEE float operations (no FMA),
//    so they give the same bits.
// Everything is branch-free.
#include "fast_normal.h"

#include <cmath>
#include <cstring>

#include "cpu_isa.h"
#include "philox.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if FASTDIFF_AVX2_BUILD
#include <immintrin.h>
#endif


namespace fastdiff {
namespace {

// The helpers are forced inline so that each build of box_muller_block (plain and AVX2) compiles them for its
// own instruction set; their vectors therefore never cross a call, and the warning that a vector result's
// ABI depends on AVX being enabled does not apply.
#define FASTDIFF_LANES inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int kLanes = 8;
typedef float F8 __attribute__((vector_size(4 * kLanes)));
typedef int32_t I8 __attribute__((vector_size(4 * kLanes)));

FASTDIFF_LANES I8 as_int(const F8& v) {
  I8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
FASTDIFF_LANES F8 as_float(const I8& v) {
  F8 r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
// mask ? a : b lane by lane for masks of all-ones / all-zeros lanes, in bit operations (vector ?: is lowered
// to per-lane branches on plain SSE2).
FASTDIFF_LANES F8 select(const I8& mask, const F8& a, const F8& b) {
  return as_float((as_int(a) & mask) | (as_int(b) & ~mask));
}

// Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer held in the low mantissa bits; these
// round and convert with float adds and integer ops rather than conversions, which share a pipe with the
// divide and the square root.
constexpr float kRound = 12582912.0f;
FASTDIFF_LANES F8 int_to_float(const I8& v) { return as_float(v + as_int(F8{} + kRound)) - kRound; }  // |v| < 2^22

// -2 log(u) for positive normal floats u. u = 2^e m with m in [sqrt(1/2), sqrt(2)) split off the bits with
// integer ops (no compare or convert on the chain); log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172,
// as an odd polynomial evaluated in Estrin form (a shorter chain than Horner). The -2 is folded into the
// coefficients (an exact power-of-two scaling).
FASTDIFF_LANES F8 minus_two_log(const F8& u) {
  const I8 ix = as_int(u);
  const I8 t = ix - 0x3f3504f3;                     // the bits of sqrt(1/2)
  const I8 e = t >> 23;                             // arithmetic shift: the exponent of u / sqrt(1/2)
  const F8 m = as_float(ix - (t & int32_t(0xff800000u)));  // u / 2^e
  const F8 s = (m - 1.0f) / (m + 1.0f), s2 = s * s, s4 = s2 * s2;
  const F8 lo = -4.0f + s2 * -1.33333334f, hi = -0.8f + s2 * -0.571428571f;
  const F8 q = lo + s4 * (hi + s4 * -0.444444444f);
  return int_to_float(e) * -1.38629436f + s * q;
}

// cos(th) and sin(th) for th in [0, 2 pi): th = q pi + r with r in [-pi/2, pi/2] (a two-part pi keeps r accurate),
// then cos th = (-1)^q cos r and sin th = (-1)^q sin r, each by one polynomial (least-squares fits on Chebyshev
// nodes, max error ~1.7e-7 and ~1.9e-7 in float32) in Estrin form.
FASTDIFF_LANES void sincos_0_2pi(const F8& th, F8& cos_th, F8& sin_th) {
  const F8 k = th * 0.318309886f + kRound;  // round(th / pi) in the low mantissa bits
  const F8 q = k - kRound;
  const F8 r = (th - q * 3.14159274f) + q * 8.74227766e-8f, r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const F8 c = ((1.0f + r2 * -0.5f) + r4 * (4.16666679e-2f + r2 * -1.38888846e-3f)) +
               r8 * ((2.48010401e-5f + r2 * -2.75246975e-7f) + r4 * 1.99078531e-9f);
  const F8 s = r * (((1.0f + r2 * -1.66666672e-1f) + r4 * (8.33333284e-3f + r2 * -1.98410868e-4f)) +
                    r8 * (2.75364778e-6f + r2 * -2.40804745e-8f));
  const I8 sign = as_int(k) << 31;  // the sign of (-1)^q
  cos_th = as_float(as_int(c) ^ sign);
  sin_th = as_float(as_int(s) ^ sign);
}

// triton.language.random.uint_to_uniform_float without a branch: a float in [0, 1).
FASTDIFF_LANES F8 uniform(const I8& x) { return __builtin_convertvector(x ^ (x >> 31), F8) * 4.6566127342e-10f; }

// The two Box-Muller normals (cosine, sine) of each lane's Philox word pair (wa[l], wb[l]).
FASTDIFF_LANES void box_muller(const uint32_t* wa, const uint32_t* wb, F8& z_cos, F8& z_sin) {
  I8 a, b;
  std::memcpy(&a, wa, sizeof a);
  std::memcpy(&b, wb, sizeof b);
  const F8 u = uniform(a), lowest = F8{} + 1.0e-7f, u1 = select(u > lowest, u, lowest);
  F8 r = minus_two_log(u1);
  for (int l = 0; l < kLanes; ++l) r[l] = std::sqrt(r[l]);  // vectorised (no errno)
  F8 c, s;
  sincos_0_2pi(6.283185307179586f * uniform(b), c, s);
  z_cos = r * c;
  z_sin = r * s;
}

#if defined(__SSE2__)
inline __m128i broadcast(uint32_t v) { return _mm_set1_epi64x(v); }
#endif

// The key (k0, k1) and the counter words 2 and 3 (stage, stream) of a block's counters; with SSE2 also the
// round keys, broadcast once per block rather than per four counters.
struct PhiloxBlock {
  uint32_t k0, k1, stage, stream;
#if defined(__SSE2__)
  __m128i ka[10], kb[10];
#endif
  PhiloxBlock(uint64_t seed, uint32_t stage_, uint32_t stream_)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)), stage(stage_), stream(stream_) {
#if defined(__SSE2__)
    for (uint32_t r = 0; r < 10; ++r) {
      ka[r] = broadcast(k0 + r * kPhiloxKeyA);
      kb[r] = broadcast(k1 + r * kPhiloxKeyB);
    }
#endif
  }
};

// The four Philox4x32-10 words of the kLanes counters (c .. c + kLanes - 1, stage, stream), one by one.
inline void philox_words_scalar(const PhiloxBlock& p, uint64_t c, uint32_t* const w[4]) {
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t ci = c + static_cast<uint64_t>(i);
    uint32_t x[4] = {static_cast<uint32_t>(ci), static_cast<uint32_t>(ci >> 32), p.stage, p.stream};
    philox4x32_10(x, p.k0, p.k1);
    for (int k = 0; k < 4; ++k) w[k][i] = x[k];
  }
}

#if defined(__SSE2__)
// The same with SSE2, round for round. Each word of two counters is held in one register, in the low halves of
// its 64-bit lanes: pmuludq reads only those, so a product's high half never needs clearing. The multiplier
// limits this, so the products that are the same for all the counters are made once, in scalar: counter
// words 1 (the high half of c, when the counters share it), 2 and 3 are common, hence round 1's stage product
// and round 2's word-0 product.
inline void philox_words(const PhiloxBlock& p, uint64_t c, uint32_t* const w[4]) {
  constexpr int kRegs = kLanes / 2;
  const uint32_t hi = static_cast<uint32_t>(c >> 32);
  if (static_cast<uint32_t>((c + kLanes - 1) >> 32) != hi) {  // the counters straddle 2^32: word 1 differs
    philox_words_scalar(p, c, w);
    return;
  }
  const __m128i ma = broadcast(kPhiloxRoundA), mb = broadcast(kPhiloxRoundB);
  __m128i x0[kRegs], x1[kRegs], x2[kRegs], x3[kRegs];
  // Rounds 1 and 2 with the common words in scalar.
  const uint64_t pb1 = static_cast<uint64_t>(kPhiloxRoundB) * p.stage;
  const uint32_t x0c = static_cast<uint32_t>(pb1 >> 32) ^ hi ^ p.k0, x1c = static_cast<uint32_t>(pb1);
  const uint64_t pa2 = static_cast<uint64_t>(kPhiloxRoundA) * x0c;
  const uint32_t ka1 = p.k0 + kPhiloxKeyA, kb1 = p.k1 + kPhiloxKeyB;
  for (int r = 0; r < kRegs; ++r) {
    const uint64_t a = c + 2 * r, b = a + 1;
    const __m128i pa = _mm_mul_epu32(_mm_set_epi64x(static_cast<int64_t>(b), static_cast<int64_t>(a)), ma);
    const __m128i x2r = _mm_xor_si128(_mm_srli_epi64(pa, 32), broadcast(p.stream ^ p.k1));
    const __m128i pb = _mm_mul_epu32(x2r, mb);
    x0[r] = _mm_xor_si128(_mm_srli_epi64(pb, 32), broadcast(x1c ^ ka1));
    x2[r] = _mm_xor_si128(pa, broadcast(static_cast<uint32_t>(pa2 >> 32) ^ kb1));
    x1[r] = pb;
    x3[r] = broadcast(static_cast<uint32_t>(pa2));
  }
  for (int round = 2; round < 10; ++round) {
    const __m128i vka = p.ka[round], vkb = p.kb[round];
    for (int r = 0; r < kRegs; ++r) {  // the key is xored first, off the chain through the multiply
      const __m128i pa = _mm_mul_epu32(x0[r], ma), pb = _mm_mul_epu32(x2[r], mb);
      x0[r] = _mm_xor_si128(_mm_srli_epi64(pb, 32), _mm_xor_si128(x1[r], vka));
      x2[r] = _mm_xor_si128(_mm_srli_epi64(pa, 32), _mm_xor_si128(x3[r], vkb));
      x1[r] = pb;
      x3[r] = pa;
    }
  }
  const auto low_halves = [](__m128i p, __m128i q) {  // lanes 0 and 2 of p, then of q
    return _mm_castps_si128(_mm_shuffle_ps(_mm_castsi128_ps(p), _mm_castsi128_ps(q), _MM_SHUFFLE(2, 0, 2, 0)));
  };
  const __m128i* const words[4] = {x0, x1, x2, x3};
  for (int k = 0; k < 4; ++k)
    for (int r = 0; r < kRegs; r += 2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w[k] + 2 * r), low_halves(words[k][r], words[k][r + 1]));
}
#else
inline void philox_words(const PhiloxBlock& p, uint64_t c, uint32_t* const w[4]) { philox_words_scalar(p, c, w); }
#endif

#if FASTDIFF_AVX2_BUILD
// The words of counters c .. c + counters - 1 (counters a multiple of kLanes) with AVX2: the SSE2 rounds above on
// 256-bit registers, four counters per register, the round keys broadcast once per block.
FASTDIFF_TARGET_AVX2 void philox_block_words_avx2(const PhiloxBlock& p, uint64_t c, int counters,
                                                  uint32_t* const w[4]) {
  constexpr int kRegs = kLanes / 4;
  const __m256i ma = _mm256_set1_epi64x(kPhiloxRoundA), mb = _mm256_set1_epi64x(kPhiloxRoundB);
  __m256i ka[10], kb[10];
  for (uint32_t r = 0; r < 10; ++r) {
    ka[r] = _mm256_set1_epi64x(static_cast<uint32_t>(p.k0 + r * kPhiloxKeyA));
    kb[r] = _mm256_set1_epi64x(static_cast<uint32_t>(p.k1 + r * kPhiloxKeyB));
  }
  const uint64_t pb1 = static_cast<uint64_t>(kPhiloxRoundB) * p.stage;
  const uint32_t ka1 = p.k0 + kPhiloxKeyA, kb1 = p.k1 + kPhiloxKeyB;
  for (int i = 0; i < counters; i += kLanes) {
    const uint64_t ci = c + static_cast<uint64_t>(i);
    const uint32_t hi = static_cast<uint32_t>(ci >> 32);
    if (static_cast<uint32_t>((ci + kLanes - 1) >> 32) != hi) {  // the counters straddle 2^32: word 1 differs
      uint32_t* const wi[4] = {w[0] + i, w[1] + i, w[2] + i, w[3] + i};
      philox_words_scalar(p, ci, wi);
      continue;
    }
    const uint32_t x0c = static_cast<uint32_t>(pb1 >> 32) ^ hi ^ p.k0, x1c = static_cast<uint32_t>(pb1);
    const uint64_t pa2 = static_cast<uint64_t>(kPhiloxRoundA) * x0c;
    __m256i x0[kRegs], x1[kRegs], x2[kRegs], x3[kRegs];
    for (int r = 0; r < kRegs; ++r) {  // rounds 1 and 2, the common words in scalar
      const uint64_t a = ci + 4 * r;
      const __m256i ctr = _mm256_set_epi64x(static_cast<int64_t>(a + 3), static_cast<int64_t>(a + 2),
                                            static_cast<int64_t>(a + 1), static_cast<int64_t>(a));
      const __m256i pa = _mm256_mul_epu32(ctr, ma);
      const __m256i x2r = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), _mm256_set1_epi64x(p.stream ^ p.k1));
      const __m256i pb = _mm256_mul_epu32(x2r, mb);
      x0[r] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), _mm256_set1_epi64x(x1c ^ ka1));
      x2[r] = _mm256_xor_si256(pa, _mm256_set1_epi64x(static_cast<uint32_t>(pa2 >> 32) ^ kb1));
      x1[r] = pb;
      x3[r] = _mm256_set1_epi64x(static_cast<uint32_t>(pa2));
    }
    for (int round = 2; round < 10; ++round) {
      for (int r = 0; r < kRegs; ++r) {
        const __m256i pa = _mm256_mul_epu32(x0[r], ma), pb = _mm256_mul_epu32(x2[r], mb);
        x0[r] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), _mm256_xor_si256(x1[r], ka[round]));
        x2[r] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), _mm256_xor_si256(x3[r], kb[round]));
        x1[r] = pb;
        x3[r] = pa;
      }
    }
    const __m256i* const words[4] = {x0, x1, x2, x3};
    for (int k = 0; k < 4; ++k) {  // the low halves of the 64-bit lanes, counters in order
      const __m256 both = _mm256_shuffle_ps(_mm256_castsi256_ps(words[k][0]), _mm256_castsi256_ps(words[k][1]),
                                            _MM_SHUFFLE(2, 0, 2, 0));  // c0 c1 c4 c5 | c2 c3 c6 c7
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + i),
                          _mm256_permute4x64_epi64(_mm256_castps_si256(both), _MM_SHUFFLE(3, 1, 2, 0)));
    }
  }
}
#endif

// out[4i .. 4i + 3] = the four normals of counter i's words (w[0][i] .. w[3][i]) for i < counters, a multiple
// of kLanes. Built twice (baseline and AVX2, see cpu_isa.h).
FASTDIFF_LANES void box_muller_lanes(const uint32_t* const w[4], int counters, float* out) {
  for (int i = 0; i < counters; i += kLanes) {
    F8 z[4];  // (r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1) of each lane's counter
    box_muller(w[0] + i, w[1] + i, z[0], z[1]);
    box_muller(w[2] + i, w[3] + i, z[2], z[3]);
    float* o = out + 4 * i;
    for (int l = 0; l < kLanes; ++l)
      for (int k = 0; k < 4; ++k) o[4 * l + k] = z[k][l];
  }
}
void box_muller_block_baseline(const uint32_t* const w[4], int counters, float* out) {
  box_muller_lanes(w, counters, out);
}
#if FASTDIFF_AVX2_BUILD
FASTDIFF_TARGET_AVX2 void box_muller_block_avx2(const uint32_t* const w[4], int counters, float* out) {
  box_muller_lanes(w, counters, out);
}
#endif
void box_muller_block(const uint32_t* const w[4], int counters, float* out) {
#if FASTDIFF_AVX2_BUILD
  if (use_avx2()) return box_muller_block_avx2(w, counters, out);
#endif
  box_muller_block_baseline(w, counters, out);
}

}  // namespace

void philox_normal_block(uint64_t seed, uint64_t j0, int n, uint32_t stage, uint32_t stream, float* out) {
  constexpr int kMaxCounters = kNoiseBlock / 4 + kLanes;  // room for a block that starts inside a group of four
  const PhiloxBlock p(seed, stage, stream);
  const int skip = static_cast<int>(j0 & 3);
  const int counters = (skip + n + 4 * kLanes - 1) / (4 * kLanes) * kLanes;
  alignas(16) uint32_t w0[kMaxCounters], w1[kMaxCounters], w2[kMaxCounters], w3[kMaxCounters];
  uint32_t* const w[4] = {w0, w1, w2, w3};
#if FASTDIFF_AVX2_BUILD
  if (use_avx2()) {
    philox_block_words_avx2(p, j0 >> 2, counters, w);
  } else
#endif
  {
    for (int i = 0; i < counters; i += kLanes) {
      uint32_t* const wi[4] = {w0 + i, w1 + i, w2 + i, w3 + i};
      philox_words(p, (j0 >> 2) + i, wi);
    }
  }
  if (skip == 0) {  // the fused step's blocks: whole groups of four, written in place
    box_muller_block(w, counters, out);
    return;
  }
  float all[4 * kMaxCounters];
  box_muller_block(w, counters, all);
  std::memcpy(out, all + skip, sizeof(float) * n);
}

}  // namespace fastdiff
