#include "coefficients.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace fastdiff {

namespace {
std::map<std::string, SamplerBuilder>& registry() {
  static std::map<std::string, SamplerBuilder> builders;
  return builders;
}
}  // namespace

bool register_sampler(const std::string& name, SamplerBuilder builder) {
  registry()[name] = builder;
  return true;
}

std::vector<std::string> sampler_names() {
  std::vector<std::string> out;
  for (const auto& kv : registry()) out.push_back(kv.first);
  return out;
}

const std::vector<std::string>& prediction_names() {
  static const std::vector<std::string> names = {"eps", "x0", "v", "score", "flow"};
  return names;
}

namespace {
std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", '" : "'") + v[i] + "'";
  return out;
}
}  // namespace

void prediction_to_x0_eps(const std::string& p, double a, double s, Linear& x0, Linear& eps) {
  if (p == "eps") {
    eps = {0.0, 1.0};
    x0 = {1.0 / a, -s / a};
  } else if (p == "x0") {
    x0 = {0.0, 1.0};
    eps = {1.0 / s, -a / s};
  } else if (p == "v") {  // v = a eps - s x0  =>  (a^2 + s^2) x0 = a x - s v, (a^2 + s^2) eps = s x + a v
    double d = a * a + s * s;
    x0 = {a / d, -s / d};
    eps = {s / d, a / d};
  } else if (p == "score") {  // score = -eps / s
    eps = {0.0, -s};
    x0 = {1.0 / a, s * s / a};
  } else if (p == "flow") {  // u = eps - x0  =>  (a + s) x0 = x - s u, (a + s) eps = x + a u
    double d = a + s;
    x0 = {1.0 / d, -s / d};
    eps = {1.0 / d, a / d};
  } else {
    throw std::invalid_argument("prediction must be one of " + join(prediction_names()) + ", got '" + p + "'");
  }
}

int Program::add_stage(const Schedule& sch, double t_now, int step, bool calls_model) {
  int k = stages++;
  coef.resize(stages * kNumCoef, 0.0);
  meta.resize(stages * kNumMeta, -1);
  meta_at(k, STEP) = step;
  meta_at(k, CALLS_MODEL) = calls_model ? 1 : 0;
  t.push_back(t_now);
  model_time.push_back(sch.model_time(t_now));
  return k;
}

namespace {

// x_next = alpha_s x0 + c_eps eps + sigma_eta z (DDIM with eta; docs/architecture.md), for any alpha/sigma pair:
// sigma_eta^2 = eta^2 sigma_s^2 (1 - SNR_t / SNR_s), c_eps = sqrt(sigma_s^2 - sigma_eta^2).
void ddim_row(Program& prog, int k, double as, double ss, double eta, double lsnr_t, double lsnr_s,
              const Linear& x0, const Linear& eps) {
  double var_eta = 0.0;
  if (ss > 0 && eta > 0) var_eta = eta * eta * ss * ss * -std::expm1(lsnr_t - lsnr_s);
  double c_eps = std::sqrt(std::max(ss * ss - var_eta, 0.0));
  prog.at(k, CX) = as * x0.x + c_eps * eps.x;
  prog.at(k, CM) = as * x0.m + c_eps * eps.m;
  prog.at(k, CZ) = std::sqrt(var_eta);
}

// DDPM's ancestral step (diffusers' DDPMScheduler): the posterior mean of x_s given x_t and x0-hat,
//   mu = alpha_s sigma_ts^2 / sigma_t^2 x0 + alpha_ts sigma_s^2 / sigma_t^2 x_t,
// with alpha_ts = alpha_t / alpha_s and sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2, plus noise of
// variance sigma_ts^2 sigma_s^2 / sigma_t^2 ("fixed_small") or the forward transition's variance
// sigma_ts^2 ("fixed_large"; for VP that is diffusers' beta_t = 1 - alpha_ts^2, but written as
// 1 - alpha_ts^2 it would be 0 for VE, where alpha = 1, and wrong for sub-VP). No noise on the step
// into the clean end (diffusers adds none at t = 0).
void ddpm_row(Program& prog, int k, double at, double st, double as, double ss, const std::string& variance,
              const Linear& x0) {
  double a_ts = at / as;
  double s2_ts = st * st - a_ts * a_ts * ss * ss;
  double cx0 = as * s2_ts / (st * st), cxt = a_ts * ss * ss / (st * st);
  prog.at(k, CX) = cx0 * x0.x + cxt;
  prog.at(k, CM) = cx0 * x0.m;
  double var = 0.0;
  if (ss > 0) var = variance == "fixed_small" ? s2_ts * ss * ss / (st * st) : s2_ts;
  prog.at(k, CZ) = std::sqrt(std::max(var, 0.0));
}

// Reverse-SDE Euler-Maruyama (noise = true) or probability-flow ODE Euler (noise = false) in t:
// x + [f x - w g^2 score] dt (+ g sqrt(|dt|) z), with score = -eps / sigma and w = 1 or 1/2.
void sde_euler_row(Program& prog, int k, const Schedule& sch, double t, double s, double sig, bool noise,
                   const Linear& eps) {
  double dt = s - t, f = sch.drift_coef(t), g2 = sch.g2(t);
  double w = noise ? 1.0 : 0.5;
  // -w g^2 score dt = w g^2 dt eps / sigma
  prog.at(k, CX) = 1.0 + f * dt + w * g2 * dt * eps.x / sig;
  prog.at(k, CM) = w * g2 * dt * eps.m / sig;
  prog.at(k, CZ) = noise ? std::sqrt(g2 * std::abs(dt)) : 0.0;
}

}  // namespace

void check_row(const Program& prog, int k, const std::string& sampler, const std::string& prediction, double t) {
  for (int c : {CX, CM, CH0, CH1, CH2, CZ, DX, DM, CX0, DX0}) {
    if (!std::isfinite(prog.coef[k * kNumCoef + c])) {
      std::ostringstream msg;
      msg.precision(10);
      msg << "sampler '" << sampler << "' with prediction '" << prediction << "' has no finite update at t = " << t
          << " (alpha or sigma is 0 there, e.g. a zero-terminal-SNR schedule with eps prediction; use prediction='v'"
          << " or start below t_max)";
      throw std::invalid_argument(msg.str());
    }
  }
}

Step begin_step(Program& prog, const Schedule& sch, const std::vector<double>& grid_t, int i,
                const std::string& prediction) {
  Step st;
  st.t = grid_t[i];
  st.s = grid_t[i + 1];
  st.at = sch.alpha(st.t);
  st.st = sch.sigma(st.t);
  st.as = sch.alpha(st.s);
  st.ss = sch.sigma(st.s);
  prediction_to_x0_eps(prediction, st.at, st.st, st.x0, st.eps);
  st.k = prog.add_stage(sch, st.t, i);
  prog.at(st.k, EX) = st.x0.x;
  prog.at(st.k, EM) = st.x0.m;
  return st;
}

namespace {

// The first-order samplers of the sampling core: one stage per step, from grid_t[i] to grid_t[i+1].
template <int Which>
void first_order(Program& prog, const Schedule& sch, const std::vector<double>& grid_t, const std::string& prediction,
                 const SamplerOptions& opt) {
  static const char* names[] = {"ddim", "ddpm", "euler_maruyama", "pf_ode_euler"};
  const double eta = opt.get("eta", 0.0);
  const std::string variance = opt.get("variance_type", std::string("fixed_small"));
  require_range("eta", eta, 0.0, 1.0, false, false);
  if (variance != "fixed_small" && variance != "fixed_large")
    throw std::invalid_argument("variance_type must be 'fixed_small' or 'fixed_large', got '" + variance + "'");
  const int steps = static_cast<int>(grid_t.size()) - 1;
  for (int i = 0; i < steps; ++i) {
    const Step p = begin_step(prog, sch, grid_t, i, prediction);
    const int k = p.k;
    const double t = p.t, s = p.s, at = p.at, st = p.st, as = p.as, ss = p.ss;
    const Linear& x0 = p.x0;
    const Linear& eps = p.eps;
    if (Which == 0) {
      ddim_row(prog, k, as, ss, eta, sch.log_snr(t), ss > 0 ? sch.log_snr(s) : INFINITY, x0, eps);
    } else if (Which == 1) {
      ddpm_row(prog, k, at, st, as, ss, variance, x0);
    } else {
      sde_euler_row(prog, k, sch, t, s, st, Which == 2, eps);
    }
    check_row(prog, k, names[Which], prediction, t);
  }
}

const bool kRegistered = register_sampler("ddim", &first_order<0>) && register_sampler("ddpm", &first_order<1>) &&
                         register_sampler("euler_maruyama", &first_order<2>) &&
                         register_sampler("pf_ode_euler", &first_order<3>);

}  // namespace

Program make_program(const Schedule& sch, const std::vector<double>& grid_t, const std::string& sampler,
                     const std::string& prediction, const SamplerOptions& opt) {
  if (grid_t.size() < 2) throw std::invalid_argument("the grid must have at least 2 points");
  auto it = registry().find(sampler);
  if (it == registry().end())
    throw std::invalid_argument("sampler must be one of " + join(sampler_names()) + ", got '" + sampler + "'");
  Linear x0, eps;
  prediction_to_x0_eps(prediction, 1.0, 1.0, x0, eps);  // validates the name
  Program prog;
  it->second(prog, sch, grid_t, prediction, opt);
  return prog;
}

}  // namespace fastdiff
