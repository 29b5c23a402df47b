// UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler with predict_x0: variant bh2 (default) or bh1
// (B(h) = h), solver_order 1, 2 (default) or 3, lower_order_final. One stage per step: the network is called at the
// predicted state x_i^p; the corrector of step i-1 (which needs that very output) and the predictor
// of step i are folded into one row. Both updates of step i-1 share the terms (sigma_i/sigma_{i-1}) x^c_{i-1}
// and -alpha_i h_phi_1 x0_{i-1}, so x^c_i = x^p_i + (linear in x0_{i-1}, x0_{i-2}, x0_i): the row needs
// only x, m and the x0 history: x0_{i-1}, x0_{i-2} and, at order 3, x0_{i-3} (three rotating slots).
#include <cmath>
#include <stdexcept>

#include "coefficients.h"

namespace fastdiff {
namespace {

// Coefficients of one UniPC update from s0 to t (diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update
// with predict_x0) on x_{s0}, on the x0 estimates at s0 and the earlier points s_1, s_2 (m[0], m[1], m[2]) and, for the
// corrector, on the x0 at t (mt). lam_prev[k - 1] is lambda at s_k.
struct Update {
  double x = 0, mt = 0;
  double m[3] = {0, 0, 0};
};

// Solves the n x n system a y = b (n <= 3) by Gaussian elimination with partial pivoting.
void solve_small(int n, double a[3][3], double b[3], double y[3]) {
  for (int c = 0; c < n; ++c) {
    int piv = c;
    for (int r = c + 1; r < n; ++r)
      if (std::abs(a[r][c]) > std::abs(a[piv][c])) piv = r;
    std::swap(a[c], a[piv]);
    std::swap(b[c], b[piv]);
    for (int r = c + 1; r < n; ++r) {
      double f = a[r][c] / a[c][c];
      for (int k = c; k < n; ++k) a[r][k] -= f * a[c][k];
      b[r] -= f * b[c];
    }
  }
  for (int r = n - 1; r >= 0; --r) {
    double v = b[r];
    for (int k = r + 1; k < n; ++k) v -= a[r][k] * y[k];
    y[r] = v / a[r][r];
  }
}

Update unipc_update(int order, bool corrector, bool bh1, const double* lam_prev, double lam_s0, double lam_t,
                    double alpha_t, double sigma_t, double sigma_s0) {
  const double h = lam_t - lam_s0, hh = -h;
  const double h_phi_1 = std::expm1(hh), B_h = bh1 ? hh : std::expm1(hh);
  Update u;
  u.x = sigma_t / sigma_s0;
  u.m[0] = -alpha_t * h_phi_1;
  const double k = -alpha_t * B_h;  // multiplies the residual sum
  const int K = order - 1;          // divided differences D1_j = (m[j + 1] - m[0]) / rk_j
  double rk[3] = {0, 0, 1.0};
  for (int j = 0; j < K; ++j) rk[j] = (lam_prev[j] - lam_s0) / h;
  rk[K] = 1.0;
  double b[3] = {0, 0, 0};
  double h_phi_k = h_phi_1 / hh - 1.0, factorial = 1.0;
  for (int i = 1; i <= order; ++i) {
    b[i - 1] = h_phi_k * factorial / B_h;
    factorial *= i + 1;
    h_phi_k = h_phi_k / hh - 1.0 / factorial;
  }
  double rho[3] = {0, 0, 0};
  if (!corrector) {
    if (K == 0) return u;
    if (order == 2) {
      rho[0] = 0.5;  // diffusers' simplified second-order predictor
    } else {
      double a[3][3];
      for (int r = 0; r < K; ++r)
        for (int c = 0; c < K; ++c) a[r][c] = std::pow(rk[c], r);
      solve_small(K, a, b, rho);
    }
  } else if (order == 1) {
    rho[0] = 0.5;
  } else {
    double a[3][3];
    for (int r = 0; r < order; ++r)
      for (int c = 0; c < order; ++c) a[r][c] = std::pow(rk[c], r);
    solve_small(order, a, b, rho);
  }
  for (int j = 0; j < K; ++j) {
    u.m[j + 1] += k * rho[j] / rk[j];
    u.m[0] -= k * rho[j] / rk[j];
  }
  if (corrector) {  // D1_t = x0_t - m[0]
    u.mt += k * rho[K];
    u.m[0] -= k * rho[K];
  }
  return u;
}

void build_unipc(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
                 const SamplerOptions& opt) {
  const double order_d = opt.get("solver_order", 2.0);
  if (order_d != 1.0 && order_d != 2.0 && order_d != 3.0)
    throw std::invalid_argument("solver_order must be 1, 2 or 3 for unipc, got " + std::to_string(order_d));
  if (opt.num.count("variant")) throw std::invalid_argument("variant must be 'bh1' or 'bh2', got a number");
  const std::string variant = opt.get("variant", std::string("bh2"));
  if (variant != "bh1" && variant != "bh2")
    throw std::invalid_argument("variant must be 'bh1' or 'bh2', got '" + variant + "'");
  const bool bh1 = variant == "bh1";
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
  // lambda at the points before index i (s_1 = i - 1, s_2 = i - 2), NaN where there are none (unused then).
  auto before = [&](int i, double out[2]) {
    out[0] = i >= 1 ? lam[i - 1] : NAN;
    out[1] = i >= 2 ? lam[i - 2] : NAN;
  };
  for (int i = 0; i < n; ++i) {
    Linear x0, eps;
    prediction_to_x0_eps(prediction, a[i], s[i], x0, eps);
    int k = prog.add_stage(sch, g[i], i);
    // x^c_i = x + sum_j cq[j] x0_{i-1-j} + cd x0_i   (x = x^p_i; no corrector at stage 0)
    double cq[3] = {0, 0, 0}, cd = 0;
    if (i > 0) {
      double prev[2];
      before(i - 1, prev);
      Update p = unipc_update(ord[i - 1], false, bh1, prev, lam[i - 1], lam[i], a[i], s[i], s[i - 1]);
      Update c = unipc_update(ord[i - 1], true, bh1, prev, lam[i - 1], lam[i], a[i], s[i], s[i - 1]);
      for (int j = 0; j < 3; ++j) cq[j] = c.m[j] - p.m[j];
      cd = c.mt;
    }
    // predictor of step i: x^p_{i+1} = px x^c_i + pm[0] x0_i + pm[1] x0_{i-1} + pm[2] x0_{i-2}
    double prev[2];
    before(i, prev);
    Update p = unipc_update(ord[i], false, bh1, prev, lam[i], lam[i + 1], a[i + 1], s[i + 1], s[i]);
    const double on_x0 = p.x * cd + p.m[0];  // total weight on x0_i
    prog.at(k, CX) = p.x + on_x0 * x0.x;
    prog.at(k, CM) = on_x0 * x0.m;
    // weights on x0_{i-1}, x0_{i-2}, x0_{i-3}, kept in slots (i - 1 - j) % 3 (a stage may overwrite the slot it
    // reads: the fused step reads each element before writing it)
    const double on_hist[3] = {p.x * cq[0] + p.m[1], p.x * cq[1] + p.m[2], p.x * cq[2]};
    int r = 0;
    for (int j = 0; j < 3; ++j) {
      if (i - 1 - j < 0 || on_hist[j] == 0.0) continue;
      prog.meta_at(k, static_cast<Meta>(READ0 + r)) = (i - 1 - j) % 3;
      prog.at(k, static_cast<Coef>(CH0 + r)) = on_hist[j];
      ++r;
    }
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
