// The Python binding of the fused CPU step (fused_step.h) and of its noise helpers, for kernels/cpu.py and tests.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings.h"
#include "cpu_isa.h"
#include "fast_normal.h"
#include "fused_step.h"

namespace py = pybind11;

namespace fastdiff {

void bind_fused_step(py::module_& m) {
  // Pointers travel as integers (Tensor.data_ptr()): the extension has no torch headers. The caller
  // (kernels/cpu.py) checks devices, dtypes, shapes and contiguity before calling.
  m.def(
      "fused_step_cpu",
      [](int64_t batch, int64_t numel, int state, bool model_f32, uintptr_t x, uintptr_t mptr, uintptr_t mu,
         double guidance_scale, uintptr_t row_guidance, uintptr_t h0, uintptr_t h1, uintptr_t h2, int n_hist,
         uintptr_t coeffs, int64_t stage, uintptr_t seeds, int64_t stream, bool use_noise, uintptr_t noise,
         uintptr_t x_out, uintptr_t h_out, uintptr_t x0_out, uintptr_t nonfinite, uintptr_t clip, uintptr_t rows,
         uintptr_t pool, int threads, uintptr_t init, uintptr_t mask, uintptr_t blend, uintptr_t init_noise) {
        if (state < 0 || state > 2) throw std::invalid_argument("state must be 0 (f32), 1 (f16) or 2 (bf16)");
        FusedStepArgs a;
        a.batch = batch;
        a.numel = numel;
        a.state = static_cast<StateType>(state);
        a.model_f32 = model_f32;
        a.x = reinterpret_cast<const void*>(x);
        a.m = reinterpret_cast<const void*>(mptr);
        a.m_uncond = reinterpret_cast<const void*>(mu);
        a.guidance_scale = static_cast<float>(guidance_scale);
        a.row_guidance = reinterpret_cast<const float*>(row_guidance);
        a.hist[0] = reinterpret_cast<const void*>(h0);
        a.hist[1] = reinterpret_cast<const void*>(h1);
        a.hist[2] = reinterpret_cast<const void*>(h2);
        a.n_hist = n_hist;
        a.coeffs = reinterpret_cast<const double*>(coeffs);
        a.stage = stage;
        a.seeds = reinterpret_cast<const int64_t*>(seeds);
        a.stream = static_cast<uint32_t>(stream);
        a.use_noise = use_noise;
        a.noise = reinterpret_cast<const void*>(noise);
        a.x_out = reinterpret_cast<void*>(x_out);
        a.h_out = reinterpret_cast<void*>(h_out);
        a.x0_out = reinterpret_cast<void*>(x0_out);
        a.nonfinite = reinterpret_cast<int32_t*>(nonfinite);
        a.clip = reinterpret_cast<const float*>(clip);
        a.rows = reinterpret_cast<const int32_t*>(rows);
        a.pool = reinterpret_cast<void*>(pool);
        a.threads = threads;
        a.init = reinterpret_cast<const void*>(init);
        a.mask = reinterpret_cast<const void*>(mask);
        a.blend = reinterpret_cast<const double*>(blend);
        a.init_noise = reinterpret_cast<const void*>(init_noise);
        py::gil_scoped_release release;
        fused_step_cpu(a);
      },
      py::arg("batch"), py::arg("numel"), py::arg("state"), py::arg("model_f32"), py::arg("x"), py::arg("m"),
      py::arg("m_uncond"), py::arg("guidance_scale"), py::arg("row_guidance"), py::arg("h0"), py::arg("h1"),
      py::arg("h2"), py::arg("n_hist"), py::arg("coeffs"), py::arg("stage"), py::arg("seeds"), py::arg("stream"),
      py::arg("use_noise"), py::arg("noise"), py::arg("x_out"), py::arg("h_out"), py::arg("x0_out"),
      py::arg("nonfinite"), py::arg("clip"), py::arg("rows"), py::arg("pool"), py::arg("threads"),
      py::arg("init") = 0, py::arg("mask") = 0, py::arg("blend") = 0, py::arg("init_noise") = 0,
      "The fused sampler step on CPU data pointers (see kernels/cpu.py, which validates the tensors).");
  m.def(
      "philox_normal_fast",
      [](uint64_t seed, uint64_t j0, int n, uint32_t stage, uint32_t stream) {
        if (n < 0 || n > kNoiseBlock) throw std::invalid_argument("n must be in [0, 256]");
        float out[kNoiseBlock];
        philox_normal_block(seed, j0, n, stage, stream, out);
        py::list res;
        for (int i = 0; i < n; ++i) res.append(out[i]);
        return res;
      },
      "The fused CPU step's vectorised normals for elements j0 .. j0 + n - 1 of one sample (testing).");
  m.def(
      "cpu_isa", [] { return use_avx2() ? "avx2" : "baseline"; },
      "Which build of the vectorised CPU loops runs: 'avx2', or 'baseline' (no AVX2, or FASTDIFF_CPU_BASELINE=1).");
}

}  // namespace fastdiff
