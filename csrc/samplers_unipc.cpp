// UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler defaults: predict_x0, variant bh2,
// solver_order 2 (1 allowed), lower_order_final. One stage per step: the network is called at the
// predicted state x_i^p; the corrector of step i-1 (which needs that very output) and the predictor
// of step i are folded into one row. Both updates of step i-1 share the terms (sigma_i/sigma_{i-1}) x^c_{i-1}
// and -alpha_i h_phi_1 x0_{i-1}, so x^c_i = x^p_i + (linear in x0_{i-1}, x0_{i-2}, x0_i): the row needs
// only x, m and the x0 history (slots rotate over three so a stage never overwrites what it reads).
#include <cmath>
#include <stdexcept>

#include "coefficients.h"

namespace fastdiff {
namespace {

// Coefficients of one UniPC update from s0 to t on (x_{s0}, x0_{s0}, x0_{s1}, x0_t) (x0_t: corrector only).
struct Update {
  double x = 0, m0 = 0, m1 = 0, mt = 0;
};

Update unipc_update(int order, bool corrector, double lam_s1, double lam_s0, double lam_t, double alpha_t,
                    double sigma_t, double sigma_s0) {
  const double h = lam_t - lam_s0, hh = -h;
  const double h_phi_1 = std::expm1(hh), B_h = std::expm1(hh);  // bh2
  Update u;
  u.x = sigma_t / sigma_s0;
  u.m0 = -alpha_t * h_phi_1;
  const double k = -alpha_t * B_h;  // multiplies the residual sum
  if (!corrector) {
    if (order == 2) {  // rhos_p = [0.5], D1 = (x0_{s1} - x0_{s0}) / rk
      double rk = (lam_s1 - lam_s0) / h;
      u.m1 += k * 0.5 / rk;
      u.m0 -= k * 0.5 / rk;
    }
    return u;
  }
  if (order == 1) {  // rhos_c = [0.5], D1_t = x0_t - x0_{s0}
    u.mt += k * 0.5;
    u.m0 -= k * 0.5;
    return u;
  }
  // order 2: solve R rho = b with R = [[1, 1], [rk, 1]], b_i = h_phi_{i+1} i! / B_h
  double rk = (lam_s1 - lam_s0) / h;
  double h_phi_k = h_phi_1 / hh - 1.0;
  double b1 = h_phi_k / B_h;
  h_phi_k = h_phi_k / hh - 0.5;
  double b2 = h_phi_k * 2.0 / B_h;
  double det = 1.0 - rk;
  double rho0 = (b1 - b2) / det, rho1 = (b2 - rk * b1) / det;
  u.m1 += k * rho0 / rk;
  u.m0 -= k * rho0 / rk;
  u.mt += k * rho1;
  u.m0 -= k * rho1;
  return u;
}

void build_unipc(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
                 const SamplerOptions& opt) {
  const double order_d = opt.get("solver_order", 2.0);
  if (order_d != 1.0 && order_d != 2.0)
    throw std::invalid_argument("solver_order must be 1 or 2 for unipc, got " + std::to_string(order_d));
  const int order = static_cast<int>(order_d);
  const bool lower_order_final = opt.get("lower_order_final", 1.0) != 0.0;
  const int n = static_cast<int>(g.size()) - 1;
  std::vector<double> a(n + 1), s(n + 1), lam(n + 1);
  for (int i = 0; i <= n; ++i) {
    a[i] = sch.alpha(g[i]);
    s[i] = sch.sigma(g[i]);
    lam[i] = std::log(a[i]) - std::log(s[i]);  // +inf at a clean end
  }
  std::vector<int> ord(n);
  for (int i = 0; i < n; ++i) {
    int o = lower_order_final ? std::min(order, n - i) : order;
    ord[i] = std::min(o, i + 1);  // warm-up
  }
  for (int i = 0; i < n; ++i) {
    Linear x0, eps;
    prediction_to_x0_eps(prediction, a[i], s[i], x0, eps);
    int k = prog.add_stage(sch, g[i], i);
    // x^c_i = x + cq * x0_{i-1} + cr * x0_{i-2} + cd * x0_i   (x = x^p_i; no corrector at stage 0)
    double cq = 0, cr = 0, cd = 0;
    if (i > 0) {
      double lam_s1 = i >= 2 ? lam[i - 2] : NAN;
      Update p = unipc_update(ord[i - 1], false, lam_s1, lam[i - 1], lam[i], a[i], s[i], s[i - 1]);
      Update c = unipc_update(ord[i - 1], true, lam_s1, lam[i - 1], lam[i], a[i], s[i], s[i - 1]);
      cq = c.m0 - p.m0;
      cr = ord[i - 1] == 2 ? c.m1 - p.m1 : 0.0;
      cd = c.mt;
    }
    // predictor of step i: x^p_{i+1} = px x^c_i + pq x0_i + pr x0_{i-1}
    Update p = unipc_update(ord[i], false, i >= 1 ? lam[i - 1] : NAN, lam[i], lam[i + 1], a[i + 1], s[i + 1], s[i]);
    double pr = ord[i] == 2 ? p.m1 : 0.0;
    double on_x0 = p.x * cd + p.m0;  // total weight on x0_i
    prog.at(k, CX) = p.x + on_x0 * x0.x;
    prog.at(k, CM) = on_x0 * x0.m;
    int r0 = -1, r1 = -1;
    if (i >= 1) {
      r0 = (i - 1) % 3;
      prog.at(k, CH0) = p.x * cq + pr;
    }
    if (i >= 2 && p.x * cr != 0.0) {
      r1 = (i - 2) % 3;
      prog.at(k, CH1) = p.x * cr;
    }
    prog.meta_at(k, READ0) = r0;
    prog.meta_at(k, READ1) = r1;
    prog.meta_at(k, WRITE) = i % 3;
    prog.at(k, DX) = x0.x;
    prog.at(k, DM) = x0.m;
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    check_row(prog, k, "unipc", prediction, g[i]);
  }
}

const bool kReg = register_sampler("unipc", &build_unipc);

}  // namespace
}  // namespace fastdiff
