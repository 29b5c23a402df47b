// The fused sampler step on the CPU: x0 estimate, optional clipping, guidance, history, Philox noise and
// every output in one pass over memory, float32 arithmetic from float64 coefficients (as the Triton
// kernel). Work is split into (sample, block) items over OpenMP threads; every element's result depends
// on its own inputs only and the non-finite record is reduced in a fixed order, so the output is bitwise
// the same whatever the thread count.
#include "fused_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "fast_normal.h"

namespace fastdiff {
namespace {

// Storage types: float, _Float16 (IEEE half, round-to-nearest-even conversions) and bfloat16 as raw bits.
struct BF16 {
  uint16_t bits;
};

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load(const BF16* p, int64_t i) {
  const uint32_t b = static_cast<uint32_t>(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(_Float16* p, int64_t i, float v) { p[i] = static_cast<_Float16>(v); }
inline void store(BF16* p, int64_t i, float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) {
    p[i].bits = static_cast<uint16_t>((b >> 16) | 0x40);  // quiet NaN
    return;
  }
  b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even, as torch
  p[i].bits = static_cast<uint16_t>(b >> 16);
}
// Asks for the cache lines of p[0 .. n) to be loaded (a hint: no fault, no effect on results).
template <class T>
inline void prefetch(const T* p, int n) {
  for (int i = 0; i < n; i += static_cast<int>(64 / sizeof(T))) __builtin_prefetch(p + i);
}

constexpr int kCols = 12;
// Below this many elements a step runs on the calling thread: waking a second one costs more than it saves.
constexpr int64_t kParallelElements = 32768;
enum { CX, CM, CH0, CH1, CH2, CZ, DX, DM, EX, EM, CX0, DX0 };

// One (sample, block) item of the step: kNoiseBlock elements of one sample. Returns whether a stored x_out value
// is non-finite.
template <class T, class M>
inline __attribute__((always_inline)) bool step_item(const FusedStepArgs& a, int64_t item, int64_t blocks) {
  const int64_t numel = a.numel, batch = a.batch;
  const T* x = static_cast<const T*>(a.x);
  const M* m = static_cast<const M*>(a.m);
  const M* mu = static_cast<const M*>(a.m_uncond);
  const M* noise = static_cast<const M*>(a.noise);
  T* x_out = static_cast<T*>(a.x_out);
  T* h_out = static_cast<T*>(a.h_out);
  T* x0_out = static_cast<T*>(a.x0_out);
  T* pool = static_cast<T*>(a.pool);
  const int64_t b = item / blocks, j0 = (item % blocks) * kNoiseBlock;
  const int n = static_cast<int>(std::min<int64_t>(kNoiseBlock, numel - j0));
  const int32_t* desc = a.rows ? a.rows + 6 * b : nullptr;
  const int64_t row = desc ? desc[0] : a.stage;
  const int64_t stage = desc ? desc[1] : a.stage;
  float c[kCols];
  for (int k = 0; k < kCols; ++k) c[k] = static_cast<float>(a.coeffs[row * kCols + k]);
  const float w = a.row_guidance ? a.row_guidance[b] : a.guidance_scale;
  const T* h[3] = {nullptr, nullptr, nullptr};
  float ch[3] = {0.0f, 0.0f, 0.0f};
  for (int k = 0; k < 3; ++k) {
    const T* src = nullptr;
    if (desc) {
      if (pool && desc[2 + k] >= 0) src = pool + static_cast<int64_t>(desc[2 + k]) * batch * numel;
    } else if (k < a.n_hist) {
      src = static_cast<const T*>(a.hist[k]);
    }
    if (src) {
      h[k] = src + b * numel;
      ch[k] = c[CH0 + k];
    }
  }
  T* h_dst = a.h_out ? h_out + b * numel : nullptr;
  if (desc && pool && desc[5] >= 0) h_dst = pool + (static_cast<int64_t>(desc[5]) * batch + b) * numel;
  const bool clip = a.clip != nullptr;
  const float bound = clip ? a.clip[2 * b] : 0.0f, scale = clip ? a.clip[2 * b + 1] : 1.0f;

  // The block in simple loops over local float buffers, so each loop vectorises.
  float z[kNoiseBlock], xv[kNoiseBlock], mv[kNoiseBlock], x0[kNoiseBlock], acc[kNoiseBlock];
  const bool philox = a.use_noise && !noise;
  const int64_t base = b * numel + j0;
  const T* xb = x + base;
  const M* mb = m + base;
  if (philox) {
    // Making the noise takes far longer than a read from memory: start the block's reads first, so that
    // they overlap it instead of following it.
    prefetch(xb, n);
    prefetch(mb, n);
    if (mu) prefetch(mu + base, n);
    for (const T* hk : h)
      if (hk) prefetch(hk + j0, n);
    philox_normal_block(static_cast<uint64_t>(a.seeds[b]), static_cast<uint64_t>(j0), n,
                        static_cast<uint32_t>(stage), a.stream, z);
  }
  // Few passes over the block, each a loop the compiler vectorises: the inputs, guidance, x0 and the first terms
  // of x_next in one; one per history term; the noise term, the store and the non-finite check in one. The
  // float operations and their order are those of the reference (kernels/reference.py).
  using Yes = std::true_type;
  using No = std::false_type;
  const M* ub = mu ? mu + base : nullptr;
  auto inputs = [&](auto guided, auto with_acc) __attribute__((always_inline)) {
    for (int i = 0; i < n; ++i) {
      const float xi = load(xb, i);
      float mi = load(mb, i);
      if constexpr (decltype(guided)::value) {
        const float uv = load(ub, i);
        mi = uv + w * (mi - uv);
      }
      const float e = c[EX] * xi + c[EM] * mi;
      xv[i] = xi;
      mv[i] = mi;
      x0[i] = e;
      if constexpr (decltype(with_acc)::value) acc[i] = c[CX] * xi + c[CM] * mi + c[CX0] * e;
    }
  };
  if (clip) {  // x_next reads the clipped x0: its terms wait for the clip
    if (mu) inputs(Yes{}, No{});
    else inputs(No{}, No{});
    for (int i = 0; i < n; ++i) x0[i] = std::min(std::max(x0[i], -bound), bound) * scale;
    for (int i = 0; i < n; ++i) acc[i] = c[CX] * xv[i] + c[CM] * mv[i] + c[CX0] * x0[i];
  } else if (mu) {
    inputs(Yes{}, Yes{});
  } else {
    inputs(No{}, Yes{});
  }
  for (int k = 0; k < 3; ++k) {
    if (!h[k]) continue;
    const T* hb = h[k] + j0;
    const float ck = ch[k];
    for (int i = 0; i < n; ++i) acc[i] += ck * load(hb, i);
  }
  T* ob = x_out + base;
  int any_bad = 0;
  const M* nb = noise ? noise + base : nullptr;
  // Inpainting: the noise term first, then the known region replaced by init noised to the step's end (the
  // reference's order of operations).
  const double* brow = a.blend ? a.blend + row * 3 : nullptr;
  const float bw = brow ? static_cast<float>(brow[0]) : 0.0f;
  if (brow && bw != 0.0f) {
    if (a.use_noise) {
      for (int i = 0; i < n; ++i) acc[i] += c[CZ] * (philox ? z[i] : load(nb, i));
    }
    const float ba = static_cast<float>(brow[1]), bs = static_cast<float>(brow[2]);
    const T* ib = static_cast<const T*>(a.init) + base;
    const T* kb = static_cast<const T*>(a.mask) + base;
    float zk[kNoiseBlock];
    if (a.init_noise) {
      const M* kn = static_cast<const M*>(a.init_noise) + base;
      for (int i = 0; i < n; ++i) zk[i] = load(kn, i);
    } else {
      philox_normal_block(static_cast<uint64_t>(a.seeds[b]), static_cast<uint64_t>(j0), n,
                          static_cast<uint32_t>(stage), kStreamKnown, zk);
    }
    for (int i = 0; i < n; ++i) {
      const float keep = bw * (1.0f - load(kb, i));
      const float known = ba * load(ib, i) + bs * zk[i];
      acc[i] = (1.0f - keep) * acc[i] + keep * known;
    }
  }
  const bool blended = brow && bw != 0.0f;
  auto finish = [&](auto noise_kind) __attribute__((always_inline)) {  // 0: none, 1: Philox (z), 2: explicit
    for (int i = 0; i < n; ++i) {
      float v = acc[i];
      if constexpr (decltype(noise_kind)::value == 1) v += c[CZ] * z[i];
      if constexpr (decltype(noise_kind)::value == 2) v += c[CZ] * load(nb, i);
      store(ob, i, v);
      // What was stored, so a half-precision overflow counts too; NaN and +-Inf fail the comparison.
      any_bad |= !(std::fabs(load(ob, i)) <= 3.402823466e38f);
    }
  };
  if (blended) finish(std::integral_constant<int, 0>{});  // the noise term is in acc already
  else if (philox) finish(std::integral_constant<int, 1>{});
  else if (a.use_noise) finish(std::integral_constant<int, 2>{});
  else finish(std::integral_constant<int, 0>{});
  if (h_dst) {
    T* hb = h_dst + j0;
    for (int i = 0; i < n; ++i) store(hb, i, c[DX] * xv[i] + c[DM] * mv[i] + c[DX0] * x0[i]);
  }
  if (x0_out) {
    T* x0b = x0_out + base;
    for (int i = 0; i < n; ++i) store(x0b, i, x0[i]);
  }
  return any_bad != 0;
}

// Items [lo, hi) into bad[]. Built for baseline x86-64 and for AVX2 (twice the vector width for every loop), one
// picked by cpu_isa.h; both give the same bits.
template <class T, class M>
void step_items(const FusedStepArgs& a, int64_t lo, int64_t hi, int64_t blocks, char* bad) {
  for (int64_t item = lo; item < hi; ++item) bad[item] = step_item<T, M>(a, item, blocks);
}
#if FASTDIFF_AVX2_BUILD
template <class T, class M>
FASTDIFF_TARGET_AVX2 void step_items_avx2(const FusedStepArgs& a, int64_t lo, int64_t hi, int64_t blocks,
                                                      char* bad) {
  for (int64_t item = lo; item < hi; ++item) bad[item] = step_item<T, M>(a, item, blocks);
}
#endif

template <class T, class M>
void run(const FusedStepArgs& a) {
  const int64_t numel = a.numel, batch = a.batch;
  const int64_t blocks = (numel + kNoiseBlock - 1) / kNoiseBlock, items = batch * blocks;
  std::vector<char> bad(static_cast<size_t>(items), 0);
  auto items_fn = &step_items<T, M>;
#if FASTDIFF_AVX2_BUILD
  if (use_avx2()) items_fn = &step_items_avx2<T, M>;
#endif
  constexpr int64_t kChunk = 16;  // items per task: 4096 elements
  const int64_t chunks = (items + kChunk - 1) / kChunk;
  const int threads = (chunks > 1 && batch * numel >= kParallelElements) ? std::max(1, a.threads) : 1;

  // Static chunks: each thread takes the same items every step, so the state it wrote last step is still in its own
  // core's cache (dynamic chunks moved it between cores: 3x slower at 64k elements on two cores). Which
  // thread runs an item does not change its result.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    items_fn(a, chunk * kChunk, std::min(items, (chunk + 1) * kChunk), blocks, bad.data());
  for (int64_t item = 0; item < items; ++item) {
    if (!bad[static_cast<size_t>(item)]) continue;
    const int64_t b = item / blocks;
    const int32_t stage = a.rows ? a.rows[6 * b + 1] : static_cast<int32_t>(a.stage);
    a.nonfinite[b] = std::min(a.nonfinite[b], stage);
  }
}

template <class T>
void run_state(const FusedStepArgs& a) {
  if (a.model_f32) run<T, float>(a);
  else run<T, T>(a);
}

}  // namespace

void fused_step_cpu(const FusedStepArgs& a) {
  if (a.batch <= 0 || a.numel <= 0) return;
  switch (a.state) {
    case StateType::F32: run<float, float>(a); break;
    case StateType::F16: run_state<_Float16>(a); break;
    case StateType::BF16: run_state<BF16>(a); break;
  }
}

}  // namespace fastdiff
