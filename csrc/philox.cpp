// CPU Philox normal noise (see philox.h for the counter contract) and its Python binding.
#include "philox.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace fastdiff {

namespace {

// Fills flat elements [begin, end) of the [batch, numel] output.
void philox_normal_range(const int64_t* seeds, int64_t numel, uint32_t stage, uint32_t stream, float* out,
                         int64_t begin, int64_t end) {
  int64_t b = begin / numel, j = begin % numel;
  for (int64_t flat = begin; flat < end; ++b, j = 0) {
    const uint64_t s = static_cast<uint64_t>(seeds[b]);
    const int64_t stop = std::min(numel, j + (end - flat));
    while (j < stop) {  // one Philox call per four elements (a row may start or end inside a group)
      float z[4];
      philox_normals4(s, static_cast<uint64_t>(j) >> 2, stage, stream, z);
      for (int q = static_cast<int>(j & 3); q < 4 && j < stop; ++q, ++j, ++flat) out[flat] = z[q];
    }
  }
}

}  // namespace

void philox_normal(const int64_t* seeds, int64_t batch, int64_t numel, int64_t stage, uint32_t stream, float* out) {
  const int64_t total = batch * numel;
  if (total <= 0) return;
  const uint32_t k = static_cast<uint32_t>(stage);
  // Each element depends only on its own counter, so splitting the range over threads changes nothing
  // in the result; small requests stay on the calling thread.
  constexpr int64_t kPerThread = int64_t{1} << 18;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t nthreads = std::min<int64_t>(hw, (total + kPerThread - 1) / kPerThread);
  if (nthreads <= 1) {
    philox_normal_range(seeds, numel, k, stream, out, 0, total);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(nthreads - 1);
  const int64_t chunk = (total + nthreads - 1) / nthreads;
  for (int64_t t = 1; t < nthreads; ++t) {
    const int64_t lo = std::min(total, t * chunk), hi = std::min(total, lo + chunk);
    workers.emplace_back(philox_normal_range, seeds, numel, k, stream, out, lo, hi);
  }
  philox_normal_range(seeds, numel, k, stream, out, 0, std::min(total, chunk));
  for (auto& w : workers) w.join();
}

namespace {

constexpr int64_t kMaxU32 = 0xFFFFFFFFLL;

void require_counter_word(const char* name, int64_t v) {
  if (v < 0 || v > kMaxU32) {
    std::ostringstream msg;
    msg << name << " must be in [0, 4294967295] (it fills one 32-bit Philox counter word), got " << v;
    throw std::invalid_argument(msg.str());
  }
}

// Accepts a 1-D numpy array of any integer dtype; returns it as C-contiguous int64 (uint64 bits kept).
py::array_t<int64_t, py::array::c_style> seeds_as_int64(const py::array& seeds) {
  if (seeds.ndim() != 1) {
    std::ostringstream msg;
    msg << "seeds must be a 1-D integer array of shape (batch,), got " << seeds.ndim() << " dimensions";
    throw std::invalid_argument(msg.str());
  }
  const char kind = seeds.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error("seeds must have an integer dtype (int64 preferred), got dtype kind '" +
                         std::string(1, kind) + "'");
  }
  // An integer-to-int64 cast (numpy's unsafe casting keeps uint64 bit patterns).
  return py::array_t<int64_t, py::array::c_style>(seeds.attr("astype")("int64"));
}

}  // namespace

void bind_philox(py::module_& m) {
  m.def(
      "philox_normal",
      [](const py::array& seeds, int64_t numel, int64_t stage, int64_t stream) {
        if (numel < 0) {
          throw std::invalid_argument("numel must be >= 0, got " + std::to_string(numel));
        }
        require_counter_word("stage", stage);
        require_counter_word("stream", stream);
        auto s = seeds_as_int64(seeds);
        const int64_t batch = s.shape(0);
        py::array_t<float> out({batch, numel});
        const int64_t* sp = s.data();
        float* op = out.mutable_data();
        {
          py::gil_scoped_release release;
          philox_normal(sp, batch, numel, stage, static_cast<uint32_t>(stream), op);
        }
        return out;
      },
      py::arg("seeds"), py::arg("numel"), py::arg("stage"), py::arg("stream"),
      "Standard normals (float32, shape (batch, numel)) from Philox4x32-10 exactly as Triton's tl.randn4x\n"
      "computes them: row b is keyed by seeds[b]; element j is normal j % 4 of the counter\n"
      "(c lo, c hi, stage, stream), c = j // 4.");

  m.def(
      "philox4x32_10",
      [](const py::array& seeds, py::array_t<uint32_t, py::array::c_style | py::array::forcecast> counters) {
        auto s = seeds_as_int64(seeds);
        if (counters.ndim() != 2 || counters.shape(1) != 4 || counters.shape(0) != s.shape(0)) {
          throw std::invalid_argument("counters must have shape (len(seeds), 4)");
        }
        const int64_t n = s.shape(0);
        py::array_t<uint32_t> out({n, int64_t{4}});
        auto c = counters.unchecked<2>();
        auto o = out.mutable_unchecked<2>();
        const int64_t* sp = s.data();
        for (int64_t i = 0; i < n; ++i) {
          uint32_t w[4] = {c(i, 0), c(i, 1), c(i, 2), c(i, 3)};
          const uint64_t key = static_cast<uint64_t>(sp[i]);
          philox4x32_10(w, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
          for (int q = 0; q < 4; ++q) o(i, q) = w[q];
        }
        return out;
      },
      py::arg("seeds"), py::arg("counters"),
      "Raw Philox4x32-10 output words (uint32, shape (n, 4)) for key seeds[i] (k0 = low, k1 = high 32\n"
      "bits) and counter row counters[i]; exposed for testing against an independent implementation.");
}

}  // namespace fastdiff
