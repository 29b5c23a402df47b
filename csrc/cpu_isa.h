// Which build of the vectorised CPU loops runs (csrc/fast_normal.cpp, csrc/fused_step.cpp): the AVX2 build where
// the CPU has AVX2, the baseline x86-64 build otherwise or when the environment sets FASTDIFF_CPU_BASELINE=1
// (read once; tests run both builds and compare them bit for bit). Both builds do the same IEEE float operations
// in the same order (no FMA: -ffp-contract=off), so they give the same bits.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define FASTDIFF_AVX2_BUILD 1
#define FASTDIFF_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define FASTDIFF_AVX2_BUILD 0
#endif

namespace fastdiff {

inline bool use_avx2() {
#if FASTDIFF_AVX2_BUILD
  static const bool yes = [] {
    const char* env = std::getenv("FASTDIFF_CPU_BASELINE");
    if (env && *env && std::strcmp(env, "0") != 0) return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace fastdiff
