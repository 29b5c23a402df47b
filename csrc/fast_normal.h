// Philox normals for a block of consecutive elements, written so the compiler vectorises them: the same
// counter contract and Box-Muller (cosine branch) as philox.h, with log and cos evaluated by float32
// polynomials instead of libm calls (which do not vectorise). Measured against philox_normal_at: max
// |difference| ~1e-6 over 4M normals (tests/test_fused_step_cpu.py), inside the contract's 1e-5.
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>

#include "philox.h"


namespace fastdiff {

constexpr int kNoiseBlock = 256;

// log(u) for u in [1e-7, 1): u = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m-1)/(m+1).
inline float fast_logf(float u) {
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xff) - 127;
  uint32_t mbits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mbits, 4);
  const int big = m > 1.41421356f;  // fold m into [sqrt(1/2), sqrt(2))
  m *= 1.0f - 0.5f * static_cast<float>(big);
  e += big;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float p = s * (2.0f + s2 * (0.666666667f + s2 * (0.4f + s2 * (0.285714286f + s2 * 0.222222222f))));
  return static_cast<float>(e) * 0.693147181f + p;
}

// cos(th) for th in [0, 2 pi]: quadrant reduction to [-pi/4, pi/4], then Taylor polynomials of degree 8/9.
inline float fast_cosf(float th) {
  const int qi = static_cast<int>(th * 0.636619772f + 0.5f);  // round(th / (pi / 2)), th >= 0
  const float q = static_cast<float>(qi);
  const float r = (th - q * 1.57079637f) + q * 4.37113883e-8f;  // two-part pi/2 keeps r accurate
  const float r2 = r * r;
  const float c = 1.0f + r2 * (-0.5f + r2 * (4.16666679e-2f + r2 * (-1.38888890e-3f + r2 * 2.48015873e-5f)));
  const float s = r * (1.0f + r2 * (-0.166666672f + r2 * (8.33333377e-3f + r2 * (-1.98412701e-4f + r2 * 2.75573188e-6f))));
  const float odd = static_cast<float>(qi & 1);
  const float sign = 1.0f - static_cast<float>((qi + 1) & 2);  // quadrants 1 and 2 are negative
  return sign * (odd * s + (1.0f - odd) * c);
}

// Ten Philox4x32 rounds on the counters (c0..c3)[i], i < n, in place: philox4x32_10 lane by lane, written as
// loops over the block so the compiler vectorises them (hand-written SSE2 measured no faster).
inline void philox_rounds(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, int n, uint32_t k0, uint32_t k1) {
  uint32_t a = k0, b = k1;
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < n; ++i) {
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[i] ^ a;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[i] ^ b;
      c1[i] = static_cast<uint32_t>(pb);
      c3[i] = static_cast<uint32_t>(pa);
      c0[i] = n0;
      c2[i] = n2;
    }
    a += kPhiloxKeyA;
    b += kPhiloxKeyB;
  }
}

// philox_uint_to_uniform without a branch (so the loop vectorises).
inline float uniform_branchless(uint32_t x) {
  const int32_t i = static_cast<int32_t>(x);
  return static_cast<float>(i ^ (i >> 31)) * 4.6566127342e-10f;
}

// out[i] = the normal at (seed, element j0 + i, stage, stream) for i < n (n <= kNoiseBlock).
inline void philox_normal_block(uint64_t seed, uint64_t j0, int n, uint32_t stage, uint32_t stream, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0[kNoiseBlock], c1[kNoiseBlock], c2[kNoiseBlock], c3[kNoiseBlock];
  for (int i = 0; i < n; ++i) {
    const uint64_t j = j0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(j);
    c1[i] = static_cast<uint32_t>(j >> 32);
    c2[i] = stage;
    c3[i] = stream;
  }
  philox_rounds(c0, c1, c2, c3, n, k0, k1);
  float u1[kNoiseBlock], u2[kNoiseBlock];
  for (int i = 0; i < n; ++i) {
    u1[i] = std::max(uniform_branchless(c0[i]), 1.0e-7f);
    u2[i] = uniform_branchless(c1[i]);
  }
  for (int i = 0; i < n; ++i) out[i] = std::sqrt(-2.0f * fast_logf(u1[i]));
  for (int i = 0; i < n; ++i) out[i] *= fast_cosf(6.283185307179586f * u2[i]);
}

}  // namespace fastdiff
