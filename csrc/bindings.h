// Each C++ module registers its Python bindings through one of these (called from module.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace fastdiff {
void bind_schedule(pybind11::module_& m);
void bind_philox(pybind11::module_& m);
void bind_coefficients(pybind11::module_& m);
void bind_fused_step(pybind11::module_& m);
}  // namespace fastdiff
