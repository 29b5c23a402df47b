// The fused sampler step on the CPU (the row form of kernels/reference.py, in one pass over memory).
#pragma once
#include <cstdint>

namespace fastdiff {

// The Philox stream of the known region's noise (kernels/reference.py's STREAM_KNOWN).
constexpr uint32_t kStreamKnown = 1u << 16;

enum class StateType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Pointers are the data of contiguous tensors; optional ones are null when absent. The state tensors (x,
// hist, pool, x_out, h_out, x0_out) share one storage type; the model outputs (m, m_uncond) and explicit
// noise are either float32 (model_f32) or that same type.
struct FusedStepArgs {
  int64_t batch = 0, numel = 0;
  StateType state = StateType::F32;
  bool model_f32 = true;
  const void* x = nullptr;
  const void* m = nullptr;
  const void* m_uncond = nullptr;
  float guidance_scale = 1.0f;
  const float* row_guidance = nullptr;  // [batch] (per-row mode)
  const void* hist[3] = {nullptr, nullptr, nullptr};
  int n_hist = 0;
  const double* coeffs = nullptr;  // [R, 12]
  int64_t stage = 0;
  const int64_t* seeds = nullptr;
  uint32_t stream = 0;
  bool use_noise = false;
  const void* noise = nullptr;
  void* x_out = nullptr;
  void* h_out = nullptr;
  void* x0_out = nullptr;
  int32_t* nonfinite = nullptr;
  const float* clip = nullptr;    // [batch, 2]: bound, scale
  const int32_t* rows = nullptr;  // [batch, 6] (per-row mode)
  void* pool = nullptr;           // [slots, batch, numel] (per-row mode)
  // Inpainting (all three or none): init and mask in the state's type, blend [R, 3] (on, alpha, sigma) indexed like
  // coeffs; init_noise (optional, the model operands' type) replaces the known region's Philox noise.
  const void* init = nullptr;
  const void* mask = nullptr;
  const double* blend = nullptr;
  const void* init_noise = nullptr;
  int threads = 1;
};

void fused_step_cpu(const FusedStepArgs& a);

}  // namespace fastdiff
