// Quadrature for schedules given as a tabulated beta(t).
//
// The cumulative integral uses the composite trapezoid rule. On an interval of width h the rule's
// error is -h^3 f''(xi) / 12, so the accumulated error up to t_k is bounded by
//   sum_i h_i^3 |f''| / 12 <= (t_k - t_0) * h_max^2 * max|f''| / 12,
// which trapezoid_error_bound returns and tests/test_quadrature.py checks on a beta(t) with a known
// integral. Between grid points the integral is read by cubic Hermite interpolation using beta as its
// derivative, exact whenever beta is linear on the interval.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "schedule.h"

namespace fastdiff {

std::vector<double> cumulative_trapezoid(const std::vector<double>& t, const std::vector<double>& f) {
  if (t.size() != f.size()) throw std::invalid_argument("t and beta must have the same length");
  std::vector<double> out(t.size(), 0.0);
  for (size_t i = 1; i < t.size(); ++i) out[i] = out[i - 1] + 0.5 * (t[i] - t[i - 1]) * (f[i] + f[i - 1]);
  return out;
}

double trapezoid_error_bound(const std::vector<double>& t, double max_abs_f2) {
  double h_max = 0;
  for (size_t i = 1; i < t.size(); ++i) h_max = std::max(h_max, t[i] - t[i - 1]);
  return (t.back() - t.front()) * h_max * h_max * max_abs_f2 / 12.0;
}

double hermite_interpolate(const std::vector<double>& t, const std::vector<double>& F,
                           const std::vector<double>& f, double x) {
  size_t hi = std::upper_bound(t.begin(), t.end(), x) - t.begin();
  hi = std::min(std::max<size_t>(hi, 1), t.size() - 1);
  size_t lo = hi - 1;
  double h = t[hi] - t[lo];
  double s = (x - t[lo]) / h;
  double h00 = (1 + 2 * s) * (1 - s) * (1 - s), h10 = s * (1 - s) * (1 - s);
  double h01 = s * s * (3 - 2 * s), h11 = s * s * (s - 1);
  return h00 * F[lo] + h10 * h * f[lo] + h01 * F[hi] + h11 * h * f[hi];
}

}  // namespace fastdiff
