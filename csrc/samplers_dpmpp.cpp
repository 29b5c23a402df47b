// DPM-Solver++ multistep (Lu et al. 2022) as coefficient programs: dpmpp_2m, dpmpp_3m and their SDE
// variants dpmpp_2m_sde, dpmpp_3m_sde, following diffusers' DPMSolverMultistepScheduler
// (algorithm_type "dpmsolver++" / "sde-dpmsolver++") and k-diffusion's sample_dpmpp_2m(_sde)/3m_sde.
//
// With lambda = log(alpha / sigma), h = lambda' - lambda, eta in [0, 1] (0 for the ODE solvers) and
// H = (1 + eta) h, one step from (alpha, sigma) to (alpha', sigma') is, on the native state,
//   x' = sigma'/sigma e^{-eta h} x + alpha' [phi1 D0 + phi2 D1 - phi3 D2] + sigma' sqrt(1 - e^{-2 eta h}) s_noise z
// with phi1 = 1 - e^{-H}, phi2 = (e^{-H} - 1)/H + 1, phi3 = phi2 / H - 1/2 and D0, D1, D2 the x0-hat
// and its first and second divided differences over the last steps (diffusers' D0/D1/D2 with
// r0 = h_prev / h, r1 = h_prev2 / h). Second-order steps use solver_type "midpoint" (phi1 D1 / 2,
// diffusers' default) or "heun" (phi2 D1, what k-diffusion's 3m_sde uses). For the SDE third order
// this is k-diffusion's sample_dpmpp_3m_sde; diffusers' sde-dpmsolver++ order 3 has the opposite sign
// on the 1/2 in phi3, which is not a third-order method.
//
// Every stage writes its x0-hat into history slot (step % order) and reads the previous ones, so a
// step costs one network call and one fused launch. The order warms up (1, 2, then 3) and, as
// diffusers' lower_order_final, steps into sigma = 0 are first order, and with lower_order_final (the
// default) and fewer than 15 steps the last step is first order and the one before at most second;
// euler_at_final makes the last step first order whatever the step count (diffusers' option of that name).
#include <cmath>
#include <stdexcept>

#include "coefficients.h"

namespace fastdiff {
namespace {

double num_option(const SamplerOptions& opt, const std::string& name, double fallback) {
  if (opt.str.count(name)) throw std::invalid_argument(name + " must be a number, got '" + opt.str.at(name) + "'");
  double v = opt.get(name, fallback);
  if (std::isnan(v)) throw std::invalid_argument(name + " must not be NaN");
  return v;
}

template <int Order, bool Sde>
void dpmpp_multistep(Program& prog, const Schedule& sch, const std::vector<double>& grid_t,
                     const std::string& prediction, const SamplerOptions& opt) {
  const std::string name = std::string("dpmpp_") + (Order == 2 ? "2m" : "3m") + (Sde ? "_sde" : "");
  const double lof = num_option(opt, "lower_order_final", 1.0);
  if (lof != 0.0 && lof != 1.0)
    throw std::invalid_argument("lower_order_final must be a bool, got " + std::to_string(lof));
  const double euler_final = num_option(opt, "euler_at_final", 0.0);
  if (euler_final != 0.0 && euler_final != 1.0)
    throw std::invalid_argument("euler_at_final must be a bool, got " + std::to_string(euler_final));
  const double legacy = num_option(opt, "legacy_third_order", 0.0);
  if (legacy != 0.0 && legacy != 1.0)
    throw std::invalid_argument("legacy_third_order must be a bool, got " + std::to_string(legacy));
  // The second-derivative term of the third-order step is -phi3 h^2 x0''; D2 estimates h^2 x0'' / 2,
  // so it enters with -2 phi3. diffusers, k-diffusion and the reference DPM-Solver code use -phi3,
  // which leaves an O(h^3) local error (second order overall); legacy_third_order reproduces them.
  const double d2_scale = legacy != 0.0 ? 1.0 : 2.0;
  if (opt.num.count("solver_type"))
    throw std::invalid_argument("solver_type must be 'midpoint' or 'heun', got a number");
  const std::string solver_type = opt.get("solver_type", std::string("midpoint"));
  if (solver_type != "midpoint" && solver_type != "heun")
    throw std::invalid_argument("solver_type must be 'midpoint' or 'heun', got '" + solver_type + "'");
  double eta = 0.0, s_noise = 1.0;
  if (Sde) {
    eta = num_option(opt, "eta", 1.0);
    s_noise = num_option(opt, "s_noise", 1.0);
    require_range("eta", eta, 0.0, 1.0, false, false);
    if (!(s_noise >= 0) || std::isinf(s_noise))
      throw std::invalid_argument("s_noise must be a finite number >= 0, got " + std::to_string(s_noise));
  }
  const int steps = static_cast<int>(grid_t.size()) - 1;
  const bool short_run = lof != 0.0 && steps < 15;
  std::vector<double> lam(grid_t.size());
  for (size_t i = 0; i < grid_t.size(); ++i) lam[i] = 0.5 * sch.log_snr(grid_t[i]);

  for (int i = 0; i < steps; ++i) {
    const double t = grid_t[i], s = grid_t[i + 1];
    const double a = sch.alpha(t), sig = sch.sigma(t), a2 = sch.alpha(s), sig2 = sch.sigma(s);
    Linear x0, eps;
    prediction_to_x0_eps(prediction, a, sig, x0, eps);
    int k = prog.add_stage(sch, t, i);
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    prog.at(k, DX) = x0.x;  // this step's x0-hat, for the next steps
    prog.at(k, DM) = x0.m;
    prog.meta_at(k, WRITE) = i % Order;

    int order = std::min(Order, i + 1);
    if (i == steps - 1 && (sig2 == 0 || short_run || euler_final != 0.0)) order = 1;
    if (i == steps - 2 && short_run) order = std::min(order, 2);

    double cx, a0 = 0, a1 = 0, a2c = 0, cz = 0;
    if (sig2 == 0) {  // into the clean end: x' = alpha' D0 (h = inf)
      cx = 0.0;
      a0 = a2;
    } else {
      const double h = lam[i + 1] - lam[i], H = (1.0 + eta) * h;
      const double phi1 = a2 * -std::expm1(-H);
      const double phi2 = a2 * (std::expm1(-H) / H + 1.0);
      const double phi3 = d2_scale * a2 * ((std::expm1(-H) / H + 1.0) / H - 0.5);
      cx = sig2 / sig * (eta > 0 ? std::exp(-eta * h) : 1.0);  // (0 * inf at alpha = 0 would be NaN)
      if (eta > 0) cz = sig2 * std::sqrt(-std::expm1(-2.0 * eta * h)) * s_noise;
      if (order == 1) {
        a0 = phi1;
      } else if (order == 2) {
        const double r0 = (lam[i] - lam[i - 1]) / h;
        const double c1 = solver_type == "midpoint" ? 0.5 * phi1 : phi2;  // coefficient of D1 = (D0 - D_-1) / r0
        a0 = phi1 + c1 / r0;
        a1 = -c1 / r0;
      } else {
        const double r0 = (lam[i] - lam[i - 1]) / h, r1 = (lam[i - 1] - lam[i - 2]) / h;
        // D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1),
        // D1_0 = (D0 - D_-1)/r0, D1_1 = (D_-1 - D_-2)/r1.
        const double k10 = phi2 * (1.0 + r0 / (r0 + r1)) - phi3 / (r0 + r1);
        const double k11 = -phi2 * r0 / (r0 + r1) + phi3 / (r0 + r1);
        a0 = phi1 + k10 / r0;
        a1 = -k10 / r0 + k11 / r1;
        a2c = -k11 / r1;
      }
    }
    prog.at(k, CX) = cx + a0 * x0.x;
    prog.at(k, CM) = a0 * x0.m;
    prog.at(k, CZ) = cz;
    if (order >= 2) {
      prog.meta_at(k, READ0) = (i - 1) % Order;
      prog.at(k, CH0) = a1;
    }
    if (order >= 3) {
      prog.meta_at(k, READ1) = (i - 2) % Order;
      prog.at(k, CH1) = a2c;
    }
    check_row(prog, k, name, prediction, t);
  }
}

const bool kRegistered =
    register_sampler("dpmpp_2m", &dpmpp_multistep<2, false>) &&
    register_sampler("dpmpp_3m", &dpmpp_multistep<3, false>) &&
    register_sampler("dpmpp_2m_sde", &dpmpp_multistep<2, true>) &&
    register_sampler("dpmpp_3m_sde", &dpmpp_multistep<3, true>);

}  // namespace
}  // namespace fastdiff
