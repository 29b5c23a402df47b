// fastdiff._C: float64 schedules, time grids, sampler coefficient tables and CPU Philox noise.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff's C++ core (no torch headers: numpy arrays in, numpy arrays out)";
  fastdiff::bind_schedule(m);
  fastdiff::bind_philox(m);
  fastdiff::bind_coefficients(m);
  fastdiff::bind_fused_step(m);
}
