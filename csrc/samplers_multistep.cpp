// DEIS (Zhang & Chen 2023), log-rho multistep, as diffusers' DEISMultistepScheduler (algorithm_type
// "deis"): the eps prediction is integrated in rho = sigma/alpha with Lagrange polynomials in log rho,
//   x_t = alpha_t (x / alpha_s0 + sum_j coef_j eps_j),  coef_j = int_{rho_s0}^{rho_t} L_j(log rho) d rho,
// orders 1..3 (solver_order, default 2 as diffusers), lower-order warm-up, and lower_order_final's
// first/second-order last steps when there are fewer than 15 steps (diffusers' rule).
// One stage per step; eps_i goes to history slot i % 3, so a row reads eps_{i-1}, eps_{i-2}.
#include <cmath>
#include <stdexcept>

#include "coefficients.h"

namespace fastdiff {
namespace {

// Antiderivatives from diffusers' ind_fn; at rho = 0 (a clean end) they vanish (t log^k t -> 0).
double ind2(double t, double b, double c) {
  if (t == 0.0) return 0.0;
  return t * (-std::log(c) + std::log(t) - 1.0) / (std::log(b) - std::log(c));
}
double ind3(double t, double b, double c, double d) {
  if (t == 0.0) return 0.0;
  double lt = std::log(t), lc = std::log(c), ld = std::log(d), lb = std::log(b);
  double num = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
  return num / ((lb - lc) * (lb - ld));
}

void build_deis(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
                const SamplerOptions& opt) {
  const double order_d = opt.get("solver_order", 2.0);
  if (order_d != 1.0 && order_d != 2.0 && order_d != 3.0)
    throw std::invalid_argument("solver_order must be 1, 2 or 3 for deis, got " + std::to_string(order_d));
  const int order = static_cast<int>(order_d);
  const int n = static_cast<int>(g.size()) - 1;
  const bool lof = opt.get("lower_order_final", 1.0) != 0.0 && n < 15;
  std::vector<double> a(n + 1), s(n + 1), rho(n + 1);
  for (int i = 0; i <= n; ++i) {
    a[i] = sch.alpha(g[i]);
    s[i] = sch.sigma(g[i]);
    rho[i] = s[i] / a[i];
  }
  for (int i = 0; i < n; ++i) {
    Linear x0, eps;
    prediction_to_x0_eps(prediction, a[i], s[i], x0, eps);
    int k = prog.add_stage(sch, g[i], i);
    int o;
    if (order == 1 || i < 1 || (lof && i == n - 1)) o = 1;
    else if (order == 2 || i < 2 || (lof && i == n - 2)) o = 2;
    else o = 3;
    double at = a[i + 1], rt = rho[i + 1], r0 = rho[i];
    double c0 = 0, c1 = 0, c2 = 0;  // weights on eps_i, eps_{i-1}, eps_{i-2} (inside alpha_t * (...))
    if (o == 1) {
      // x_t = alpha_t/alpha_s x - sigma_t (e^h - 1) eps = alpha_t (x/alpha_s - (rho_s - rho_t) eps)
      c0 = -(r0 - rt);
    } else if (o == 2) {
      double r1 = rho[i - 1];
      c0 = ind2(rt, r0, r1) - ind2(r0, r0, r1);
      c1 = ind2(rt, r1, r0) - ind2(r0, r1, r0);
    } else {
      double r1 = rho[i - 1], r2 = rho[i - 2];
      c0 = ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2);
      c1 = ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0);
      c2 = ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1);
    }
    prog.at(k, CX) = at / a[i] + at * c0 * eps.x;
    prog.at(k, CM) = at * c0 * eps.m;
    if (o >= 2) {
      prog.meta_at(k, READ0) = (i - 1) % 3;
      prog.at(k, CH0) = at * c1;
    }
    if (o >= 3) {
      prog.meta_at(k, READ1) = (i - 2) % 3;
      prog.at(k, CH1) = at * c2;
    }
    if (i < n - 1) {
      prog.meta_at(k, WRITE) = i % 3;
      prog.at(k, DX) = eps.x;
      prog.at(k, DM) = eps.m;
    }
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    check_row(prog, k, "deis", prediction, g[i]);
  }
}

const bool kReg = register_sampler("deis", &build_deis);

}  // namespace
}  // namespace fastdiff
