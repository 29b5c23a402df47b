// The CPU kernel of fastdiff::fused_step registered in C++ (torch's C++ extension API), so that a sampler step
// reaches the C++ step without Python in between: ~4 us of dispatch instead of ~12 us through a Python kernel.
// The op's schema is defined in Python (kernels/op.py); this library registers its CPU kernel only.
//
// The fast path takes the layouts the sampling loops pass (contiguous tensors of the state's dtype, model outputs
// in float32 or the state's dtype, valid per-row arguments) and calls fused_step_cpu (csrc/fused_step.cpp) on
// their data. Anything else (non-contiguous or mixed-dtype arguments, bad per-row arguments, tensors on other
// devices) goes to fastdiff::fused_step_any, the same op with the Python CPU kernel (kernels/cpu.py), which
// converts, falls back to the reference, or raises the argument errors; so both paths give the same results.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "../fused_step.h"

namespace fastdiff {
namespace {

constexpr int64_t kRowFields = 6;
constexpr int64_t kCoefColumns = 12;

using OptTensor = std::optional<at::Tensor>;

bool state_type(const at::Tensor& x, StateType* out) {
  switch (x.scalar_type()) {
    case at::kFloat: *out = StateType::F32; return true;
    case at::kHalf: *out = StateType::F16; return true;
    case at::kBFloat16: *out = StateType::BF16; return true;
    default: return false;
  }
}

// A contiguous CPU tensor of this dtype and these sizes.
bool is(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == sizes && t.is_contiguous();
}

bool is_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n) {
  return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n && t.is_contiguous();
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Fills a from the arguments when they are in the fast path's form; false otherwise.
bool fast_args(const at::Tensor& x, const at::Tensor& m, const OptTensor& m_uncond, double guidance_scale,
               at::TensorList hist, const at::Tensor& coeffs, int64_t stage, const at::Tensor& seeds, int64_t stream,
               bool use_noise, const OptTensor& noise, const at::Tensor& x_out, const OptTensor& h_out,
               const OptTensor& x0_out, const at::Tensor& nonfinite, const OptTensor& clip, const OptTensor& rows,
               const OptTensor& pool, const OptTensor& row_guidance, const OptTensor& init, const OptTensor& mask,
               const OptTensor& blend, const OptTensor& init_noise, FusedStepArgs& a) {
  StateType state;
  if (x.dim() < 1 || !state_type(x, &state) || hist.size() > 3 || stream < 0 || stream > 0xFFFFFFFFLL) return false;
  const at::ScalarType dtype = x.scalar_type();
  const at::IntArrayRef sizes = x.sizes();
  const int64_t batch = x.size(0);
  if (!is(x, dtype, sizes) || !is(x_out, dtype, sizes)) return false;
  if ((h_out && !is(*h_out, dtype, sizes)) || (x0_out && !is(*x0_out, dtype, sizes))) return false;
  for (const at::Tensor& h : hist)
    if (!is(h, dtype, sizes)) return false;
  // The model operands are read in one dtype: float32, or the state's when all of them are in it.
  const OptTensor& nz = use_noise ? noise : OptTensor();
  const bool model_f32 = dtype == at::kFloat || m.scalar_type() == at::kFloat ||
                         (m_uncond && m_uncond->scalar_type() == at::kFloat) || (nz && nz->scalar_type() == at::kFloat) ||
                         (init_noise && init_noise->scalar_type() == at::kFloat);
  const at::ScalarType model_dtype = model_f32 ? at::kFloat : dtype;
  if (!is(m, model_dtype, sizes) || (m_uncond && !is(*m_uncond, model_dtype, sizes)) ||
      (nz && !is(*nz, model_dtype, sizes)) || (init_noise && !is(*init_noise, model_dtype, sizes)))
    return false;
  // Inpainting: init, mask and blend together (one blend row per coefficient row), init_noise only with them.
  if (init.has_value() != blend.has_value() || mask.has_value() != blend.has_value()) return false;
  if (init_noise && !blend) return false;
  if (blend && (!is(*init, dtype, sizes) || !is(*mask, dtype, sizes) ||
                !is(*blend, at::kDouble, {coeffs.size(0), 3})))
    return false;
  if (!coeffs.device().is_cpu() || coeffs.scalar_type() != at::kDouble || coeffs.dim() != 2 ||
      coeffs.size(1) != kCoefColumns || !coeffs.is_contiguous())
    return false;
  if (!is_vector(seeds, at::kLong, batch) || !is_vector(nonfinite, at::kInt, batch)) return false;
  if (clip && !is(*clip, at::kFloat, {batch, 2})) return false;
  const int64_t table_rows = coeffs.size(0);
  if (rows) {  // per-row mode: history lives in pool; each row's coefficient row must exist
    if (!is(*rows, at::kInt, {batch, kRowFields}) || !hist.empty() || h_out) return false;
    if (row_guidance && (!is_vector(*row_guidance, at::kFloat, batch) || !m_uncond)) return false;
    if (pool && !(pool->device().is_cpu() && pool->scalar_type() == dtype && pool->dim() == x.dim() + 1 &&
                  pool->sizes().slice(1) == sizes && pool->is_contiguous()))
      return false;
    const int32_t* r = rows->data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b)
      if (r[b * kRowFields] < 0 || r[b * kRowFields] >= table_rows || r[b * kRowFields + 1] < 0) return false;
  } else if (pool || stage < 0 || stage >= table_rows) {
    return false;
  } else if (row_guidance && (!is_vector(*row_guidance, at::kFloat, batch) || !m_uncond)) {
    return false;  // one weight per sample also without rows: a captured graph serves every guidance scale
  }
  a.batch = batch;
  a.numel = batch ? x.numel() / batch : 0;
  a.state = state;
  a.model_f32 = model_f32;
  a.x = x.data_ptr();
  a.m = m.data_ptr();
  a.m_uncond = ptr(m_uncond);
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.row_guidance = static_cast<const float*>(ptr(row_guidance));
  for (size_t k = 0; k < hist.size(); ++k) a.hist[k] = hist[k].data_ptr();
  a.n_hist = static_cast<int>(hist.size());
  a.coeffs = coeffs.data_ptr<double>();
  a.stage = stage;
  a.seeds = seeds.data_ptr<int64_t>();
  a.stream = static_cast<uint32_t>(stream);
  a.use_noise = use_noise;
  a.noise = ptr(nz);
  a.x_out = x_out.data_ptr();
  a.h_out = h_out ? h_out->data_ptr() : nullptr;
  a.x0_out = x0_out ? x0_out->data_ptr() : nullptr;
  a.nonfinite = nonfinite.data_ptr<int32_t>();
  a.clip = static_cast<const float*>(ptr(clip));
  a.rows = rows ? rows->data_ptr<int32_t>() : nullptr;
  a.pool = pool ? pool->data_ptr() : nullptr;
  a.init = ptr(init);
  a.mask = ptr(mask);
  a.blend = blend ? blend->data_ptr<double>() : nullptr;
  a.init_noise = ptr(init_noise);
  a.threads = at::get_num_threads();
  return true;
}

void fused_step_cpu_kernel(const at::Tensor& x, const at::Tensor& m, const OptTensor& m_uncond, double guidance_scale,
                           at::TensorList hist, const at::Tensor& coeffs, int64_t stage, const at::Tensor& seeds,
                           int64_t stream, bool use_noise, const OptTensor& noise, const at::Tensor& x_out,
                           const OptTensor& h_out, const OptTensor& x0_out, const at::Tensor& nonfinite,
                           const OptTensor& clip, const OptTensor& rows, const OptTensor& pool,
                           const OptTensor& row_guidance, const OptTensor& init, const OptTensor& mask,
                           const OptTensor& blend, const OptTensor& init_noise) {
  FusedStepArgs a;
  if (fast_args(x, m, m_uncond, guidance_scale, hist, coeffs, stage, seeds, stream, use_noise, noise, x_out, h_out,
                x0_out, nonfinite, clip, rows, pool, row_guidance, init, mask, blend, init_noise, a)) {
    fused_step_cpu(a);
    return;
  }
  static const auto any = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("fastdiff::fused_step_any", "")
                              .typed<void(const at::Tensor&, const at::Tensor&, const OptTensor&, double,
                                          at::TensorList, const at::Tensor&, int64_t, const at::Tensor&, int64_t,
                                          bool, const OptTensor&, const at::Tensor&, const OptTensor&,
                                          const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&)>();
  any.call(x, m, m_uncond, guidance_scale, hist, coeffs, stage, seeds, stream, use_noise, noise, x_out, h_out, x0_out,
           nonfinite, clip, rows, pool, row_guidance, init, mask, blend, init_noise);
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("fused_step", &fastdiff::fused_step_cpu_kernel); }
