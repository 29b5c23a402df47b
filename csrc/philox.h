// Counter-based Gaussian noise: Philox4x32-10 exactly as triton.language.random computes it, so the
// CPU and the Triton kernels produce the same normal for the same (seed, stage, stream, element).
//
// Counter contract (docs/architecture.md principle 4): for a sample's int64 seed s (read as uint64), stage k,
// stream r (0 = per-step noise, 1 = initial noise x_T, 2.. reserved) and element j of the sample,
// each Philox call makes the four normals of elements 4c .. 4c + 3 (c = j >> 2), as tl.randn4x does:
//   key     = (k0 = low 32 bits of s, k1 = high 32 bits of s)
//   counter = (c0 = c & 0xffffffff, c1 = c >> 32, c2 = k, c3 = r)
// Philox4x32-10 gives four words w0..w3, each made a uniform (triton's uint_to_uniform_float); the pairs
// (w0, w1) and (w2, w3) each give two Box-Muller normals (triton's pair_uniform_to_normal: cosine, then
// sine), so element j is normal j & 3 of (n0, n1, n2, n3) = (r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1),
// all in float32.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastdiff {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

// Ten Philox4x32 rounds on c (in place) under key (k0, k1); triton's philox_impl, round for round.
inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c[0];
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = static_cast<uint32_t>(pb);
    c[2] = n2;
    c[3] = static_cast<uint32_t>(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// triton.language.random.uint_to_uniform_float for 32-bit words: a float in [0, 1).
inline float philox_uint_to_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  if (i < 0) i = ~i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// The four normals of counter c = j >> 2 (elements 4c .. 4c + 3): triton's pair_uniform_to_normal on words
// (0, 1) then (2, 3), in float32 with libm's log, cos and sin.
inline void philox_normals4(uint64_t seed, uint64_t c, uint32_t stage, uint32_t stream, float z[4]) {
  uint32_t w[4] = {static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), stage, stream};
  philox4x32_10(w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int p = 0; p < 2; ++p) {
    float u1 = philox_uint_to_uniform(w[2 * p]);
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    const float th = 6.283185307179586f * philox_uint_to_uniform(w[2 * p + 1]);
    const float r = std::sqrt(-2.0f * std::log(u1));
    z[2 * p] = r * std::cos(th);
    z[2 * p + 1] = r * std::sin(th);
  }
}

// The standard normal at (seed, stage, stream, element j).
inline float philox_normal_at(uint64_t seed, uint64_t j, uint32_t stage, uint32_t stream) {
  float z[4];
  philox_normals4(seed, j >> 2, stage, stream, z);
  return z[j & 3];
}

// Fills out[b * numel + j] = philox_normal_at(seeds[b], j, stage, stream) for a [batch, numel] array.
// Arguments are not validated here (the binding does it); stage and stream must fit in 32 bits.
void philox_normal(const int64_t* seeds, int64_t batch, int64_t numel, int64_t stage, uint32_t stream, float* out);

}  // namespace fastdiff
