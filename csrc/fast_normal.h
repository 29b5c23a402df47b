// Philox normals for a block of consecutive elements, fast on the CPU (fast_normal.cpp): the same counter
// contract (four normals per Philox call) and Box-Muller as philox.h, with log, cos and sin evaluated by float32
// polynomials instead of libm calls (which do not vectorise). Measured against philox_normal_at: max |difference| ~1e-6,
// 3 float32 ulps of max(|z|, 1), over 16M normals (tests/test_fused_step_cpu.py), inside the contract's 1e-5.
#pragma once
#include <cstdint>

namespace fastdiff {

constexpr int kNoiseBlock = 256;

// out[i] = the normal at (seed, element j0 + i, stage, stream) for i < n (n <= kNoiseBlock). out has room for
// kNoiseBlock floats: when j0 is a multiple of 4, n is rounded up to whole lane groups and the normals past n
// are scratch.
void philox_normal_block(uint64_t seed, uint64_t j0, int n, uint32_t stage, uint32_t stream, float* out);

}  // namespace fastdiff
