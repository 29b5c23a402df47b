// Closed forms of every schedule family, in float64 (see schedule.h for each family's time axis).
#include "schedule.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace fastdiff {
namespace {
constexpr double kPi = 3.14159265358979323846;

double cosine_phi(double t, double s) { return (t + s) / (1 + s) * kPi / 2; }
}  // namespace

Schedule Schedule::vp_discrete(const std::vector<double>& betas) {
  if (betas.empty()) throw std::invalid_argument("betas must not be empty");
  Schedule out;
  out.kind_ = Kind::VPDiscrete;
  out.betas_ = betas;
  double prod = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) {
    std::ostringstream name;
    name << "betas[" << i << "]";
    require_range(name.str().c_str(), betas[i], 0.0, 1.0, true, false);
    prod *= 1.0 - betas[i];
    out.abar_.push_back(prod);
    // sigma / alpha; infinite at a zero-terminal-SNR end.
    out.edm_sigmas_.push_back(prod > 0 ? std::sqrt((1 - prod) / prod) : INFINITY);
  }
  out.t_min_ = 0;
  out.t_max_ = static_cast<double>(betas.size() - 1);
  return out;
}

Schedule Schedule::vp_linear(double beta_min, double beta_max, double t_eps) {
  require_range("beta_min", beta_min, 0.0, INFINITY, false, true);
  require_range("beta_max", beta_max, beta_min, INFINITY, true, true);
  require_range("t_eps", t_eps, 0.0, 1.0, true, true);
  Schedule out;
  out.kind_ = Kind::VPLinear;
  out.p_[0] = beta_min;
  out.p_[1] = beta_max;
  out.t_min_ = t_eps;
  out.t_max_ = 1.0;
  return out;
}

Schedule Schedule::sub_vp(double beta_min, double beta_max, double t_eps) {
  Schedule out = vp_linear(beta_min, beta_max, t_eps);
  out.kind_ = Kind::SubVP;
  return out;
}

Schedule Schedule::vp_cosine(double s, double t_eps, double t_max) {
  require_range("s", s, 0.0, INFINITY, true, true);
  // t_max = 1 (the Python default, abar(1) = 0) is allowed: the interval is (0, 1], not (0, 1).
  // (Fix: it was open at 1, so Schedule.vp_cosine() with its defaults raised ValueError.)
  require_range("t_max", t_max, 0.0, 1.0, true, false);
  require_range("t_eps", t_eps, 0.0, t_max, true, true);
  Schedule out;
  out.kind_ = Kind::VPCosine;
  out.p_[0] = s;
  out.t_min_ = t_eps;
  out.t_max_ = t_max;
  return out;
}

Schedule Schedule::vp_tabulated(const std::vector<double>& t, const std::vector<double>& beta) {
  if (t.size() < 2) throw std::invalid_argument("t must have at least 2 points");
  if (t.size() != beta.size()) throw std::invalid_argument("t and beta must have the same length");
  for (size_t i = 0; i < t.size(); ++i) {
    require_finite("t", t[i]);
    require_range("beta", beta[i], 0.0, INFINITY, false, true);
    if (i > 0 && !(t[i] > t[i - 1])) throw std::invalid_argument("t must be strictly increasing");
  }
  // abar(t) = exp(-int_0^t beta) needs beta from t = 0. (Fix: a grid starting at t[0] > 0 used to be
  // accepted with beta extrapolated flat on [0, t[0]], a silent guess whose error the documented
  // trapezoid bound does not cover; now it is rejected.)
  if (t[0] != 0) {
    std::ostringstream msg;
    msg.precision(17);
    msg << "t must start at 0 (abar(t) = exp(-int_0^t beta) needs beta from t = 0), got t[0] = " << t[0];
    throw std::invalid_argument(msg.str());
  }
  Schedule out;
  out.kind_ = Kind::VPTabulated;
  out.grid_t_ = t;
  out.grid_beta_ = beta;
  out.grid_B_ = cumulative_trapezoid(out.grid_t_, out.grid_beta_);
  out.t_min_ = t[1];  // log-SNR is +inf at t = 0
  out.t_max_ = t.back();
  return out;
}

Schedule Schedule::ve(double sigma_min, double sigma_max) {
  require_range("sigma_min", sigma_min, 0.0, INFINITY, true, true);
  require_range("sigma_max", sigma_max, sigma_min, INFINITY, true, true);
  Schedule out;
  out.kind_ = Kind::VE;
  out.p_[0] = sigma_min;
  out.p_[1] = sigma_max;
  out.t_min_ = 0;
  out.t_max_ = 1;
  return out;
}

Schedule Schedule::edm(double sigma_min, double sigma_max, double sigma_data) {
  require_range("sigma_min", sigma_min, 0.0, INFINITY, true, true);
  require_range("sigma_max", sigma_max, sigma_min, INFINITY, true, true);
  require_range("sigma_data", sigma_data, 0.0, INFINITY, true, true);
  Schedule out;
  out.kind_ = Kind::EDM;
  out.p_[0] = sigma_min;
  out.p_[1] = sigma_max;
  out.p_[2] = sigma_data;
  out.t_min_ = sigma_min;
  out.t_max_ = sigma_max;
  return out;
}

Schedule Schedule::flow(double t_min, double t_max, double time_scale) {
  require_range("t_max", t_max, 0.0, 1.0, true, false);
  require_range("t_min", t_min, 0.0, t_max, true, true);
  require_range("time_scale", time_scale, 0.0, INFINITY, true, true);
  Schedule out;
  out.kind_ = Kind::Flow;
  out.p_[2] = time_scale;
  out.t_min_ = t_min;
  out.t_max_ = t_max;
  return out;
}

std::string Schedule::name() const {
  switch (kind_) {
    case Kind::VPDiscrete: return "vp_discrete";
    case Kind::VPLinear: return "vp_linear";
    case Kind::VPCosine: return "vp_cosine";
    case Kind::VPTabulated: return "vp_tabulated";
    case Kind::SubVP: return "sub_vp";
    case Kind::VE: return "ve";
    case Kind::EDM: return "edm";
    case Kind::Flow: return "flow";
  }
  return "?";
}

void Schedule::check_t(double t) const {
  double lo = has_clean_end() ? std::min(clean_end(), t_min_) : 0.0;
  if (kind_ == Kind::VPDiscrete) lo = -1.0;
  if (!(t >= lo - 1e-12 && t <= t_max_ + 1e-12)) {
    std::ostringstream msg;
    msg.precision(17);
    msg << "t must be in [" << lo << ", " << t_max_ << "] for the " << name() << " schedule, got " << t;
    throw std::invalid_argument(msg.str());
  }
}

double Schedule::beta(double t) const {
  switch (kind_) {
    case Kind::VPLinear:
    case Kind::SubVP: return p_[0] + t * (p_[1] - p_[0]);
    case Kind::VPCosine: return kPi / (1 + p_[0]) * std::tan(cosine_phi(t, p_[0]));
    case Kind::VPTabulated: {
      size_t hi = std::upper_bound(grid_t_.begin(), grid_t_.end(), t) - grid_t_.begin();
      hi = std::min(std::max<size_t>(hi, 1), grid_t_.size() - 1);
      double w = (t - grid_t_[hi - 1]) / (grid_t_[hi] - grid_t_[hi - 1]);
      return (1 - w) * grid_beta_[hi - 1] + w * grid_beta_[hi];
    }
    case Kind::VPDiscrete: {
      // The VP SDE whose Euler-Maruyama discretisation with unit steps is the DDPM chain.
      if (t <= 0) return betas_[0];
      size_t lo = std::min(static_cast<size_t>(t), betas_.size() - 1);
      size_t hi = std::min(lo + 1, betas_.size() - 1);
      double w = t - static_cast<double>(lo);
      return (1 - w) * betas_[lo] + w * betas_[hi];
    }
    default: return 0.0;
  }
}

double Schedule::beta_integral(double t) const {
  switch (kind_) {
    case Kind::VPLinear:
    case Kind::SubVP: return p_[0] * t + 0.5 * (p_[1] - p_[0]) * t * t;
    case Kind::VPCosine: {
      double s = p_[0];
      return -2.0 * (std::log(std::cos(cosine_phi(t, s))) - std::log(std::cos(cosine_phi(0.0, s))));
    }
    case Kind::VPTabulated: return hermite_interpolate(grid_t_, grid_B_, grid_beta_, t);
    default: return 0.0;
  }
}

double Schedule::discrete_edm_sigma(double t) const {
  if (t <= -1) return 0.0;
  if (t < 0) return (t + 1) * edm_sigmas_[0];
  size_t lo = std::min(static_cast<size_t>(t), edm_sigmas_.size() - 1);
  size_t hi = std::min(lo + 1, edm_sigmas_.size() - 1);
  double w = t - static_cast<double>(lo);
  if (w == 0) return edm_sigmas_[lo];
  return (1 - w) * edm_sigmas_[lo] + w * edm_sigmas_[hi];
}

double Schedule::alpha(double t) const {
  check_t(t);
  switch (kind_) {
    case Kind::VPDiscrete: {
      double r = std::round(t);
      if (r == t && t >= 0) return std::sqrt(abar_[static_cast<size_t>(t)]);
      double s = discrete_edm_sigma(t);
      if (std::isinf(s)) return 0.0;
      return 1.0 / std::sqrt(1.0 + s * s);
    }
    case Kind::VPLinear:
    case Kind::VPCosine:
    case Kind::VPTabulated:
    case Kind::SubVP: return std::exp(-0.5 * beta_integral(t));
    case Kind::Flow: return 1.0 - t;
    default: return 1.0;
  }
}

double Schedule::sigma(double t) const {
  check_t(t);
  switch (kind_) {
    case Kind::VPDiscrete: {
      double r = std::round(t);
      if (r == t && t >= 0) return std::sqrt(1.0 - abar_[static_cast<size_t>(t)]);
      double s = discrete_edm_sigma(t);
      if (std::isinf(s)) return 1.0;
      return s / std::sqrt(1.0 + s * s);
    }
    case Kind::VPLinear:
    case Kind::VPCosine:
    case Kind::VPTabulated: return std::sqrt(-std::expm1(-beta_integral(t)));
    case Kind::SubVP: return -std::expm1(-beta_integral(t));
    case Kind::VE: return p_[0] * std::pow(p_[1] / p_[0], t);
    case Kind::EDM:
    case Kind::Flow: return t;
  }
  return 0.0;
}

double Schedule::log_snr(double t) const {
  check_t(t);
  switch (kind_) {
    case Kind::VPLinear:
    case Kind::VPCosine:
    case Kind::VPTabulated: {
      double B = beta_integral(t);
      return -B - std::log(-std::expm1(-B));
    }
    case Kind::SubVP: {
      double B = beta_integral(t);
      return -B - 2.0 * std::log(-std::expm1(-B));
    }
    default: {
      double a = alpha(t), s = sigma(t);
      return 2.0 * (std::log(a) - std::log(s));
    }
  }
}

double Schedule::edm_sigma(double t) const {
  check_t(t);
  if (kind_ == Kind::VPDiscrete) return discrete_edm_sigma(t);
  return sigma(t) / alpha(t);
}

double Schedule::drift_coef(double t) const {
  check_t(t);
  switch (kind_) {
    case Kind::VE:
    case Kind::EDM: return 0.0;
    case Kind::Flow: return -1.0 / (1.0 - t);
    default: return -0.5 * beta(t);
  }
}

double Schedule::g2(double t) const {
  check_t(t);
  switch (kind_) {
    case Kind::SubVP: return beta(t) * -std::expm1(-2.0 * beta_integral(t));
    case Kind::VE: {
      double s = sigma(t);
      return 2.0 * s * s * std::log(p_[1] / p_[0]);
    }
    case Kind::EDM: return 2.0 * t;
    // x_t = (1 - t) x0 + t eps: g^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2.
    case Kind::Flow: return 2.0 * t / (1.0 - t);
    default: return beta(t);
  }
}

double Schedule::model_time(double t) const {
  check_t(t);
  return kind_ == Kind::Flow ? t * p_[2] : t;
}

double Schedule::prior_std() const {
  return (kind_ == Kind::VE || kind_ == Kind::EDM) ? sigma(t_max_) : 1.0;
}

namespace {
// Bisection for the t in [lo, hi] where an increasing (sign = +1) or decreasing (sign = -1)
// function reaches target.
template <class F>
double bisect(F f, double target, double lo, double hi, double sign) {
  for (int i = 0; i < 200 && hi - lo > 1e-15 * std::max(1.0, std::abs(hi)); ++i) {
    double mid = 0.5 * (lo + hi);
    if (sign * (f(mid) - target) < 0) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}


// Rejects a target outside the range [min(a, b), max(a, b)] that the function takes on [t_min, t_max]:
// bisection would silently clamp it to an end. A relative slack of 1e-9 absorbs rounding in the
// targets the grid builders compute (e.g. pow(pow(sigma_max, 1/rho), rho)).
void require_reached(const char* name, double v, double a, double b) {
  double lo = std::min(a, b), hi = std::max(a, b), scale = 1.0;
  if (std::isfinite(lo)) scale = std::max(scale, std::abs(lo));
  if (std::isfinite(hi)) scale = std::max(scale, std::abs(hi));
  if (!(v >= lo - 1e-9 * scale && v <= hi + 1e-9 * scale)) {
    std::ostringstream msg;
    msg.precision(17);
    msg << name << " must be in [" << lo << ", " << hi << "] (its range over [t_min, t_max]), got " << v;
    throw std::invalid_argument(msg.str());
  }
}
}  // namespace

// (Fix: both inverses used to clamp out-of-range targets to t_min or t_max without a word.)
double Schedule::t_from_log_snr(double lam) const {
  require_finite("log_snr", lam);
  require_reached("log_snr", lam, log_snr(t_min_), log_snr(t_max_));
  return bisect([this](double t) { return log_snr(t); }, lam, t_min_, t_max_, -1.0);
}

double Schedule::t_from_edm_sigma(double s) const {
  require_finite("sigma", s);
  require_reached("sigma", s, edm_sigma(t_min_), edm_sigma(t_max_));
  if (kind_ == Kind::EDM) return s;
  return bisect([this](double t) { return edm_sigma(t); }, s, t_min_, t_max_, 1.0);
}

std::vector<double> make_betas(int n, const std::string& beta_schedule, double beta_start, double beta_end,
                               bool rescale_zero_terminal_snr) {
  if (n < 2) throw std::invalid_argument("num_train_timesteps must be >= 2, got " + std::to_string(n));
  std::vector<double> betas(n);
  if (beta_schedule == "linear" || beta_schedule == "scaled_linear") {
    require_range("beta_start", beta_start, 0.0, 1.0, true, true);
    require_range("beta_end", beta_end, beta_start, 1.0, false, true);
    bool scaled = beta_schedule == "scaled_linear";
    double a = scaled ? std::sqrt(beta_start) : beta_start, b = scaled ? std::sqrt(beta_end) : beta_end;
    for (int i = 0; i < n; ++i) {
      double v = a + (b - a) * i / (n - 1);
      betas[i] = scaled ? v * v : v;
    }
  } else if (beta_schedule == "squaredcos_cap_v2") {
    auto abar = [](double t) { double c = std::cos((t + 0.008) / 1.008 * kPi / 2); return c * c; };
    for (int i = 0; i < n; ++i)
      betas[i] = std::min(1.0 - abar(double(i + 1) / n) / abar(double(i) / n), 0.999);
  } else {
    throw std::invalid_argument("beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', got '" +
                                beta_schedule + "'");
  }
  if (rescale_zero_terminal_snr) {
    // Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that the last step has abar = 0.
    std::vector<double> sq(n);
    double prod = 1.0;
    for (int i = 0; i < n; ++i) { prod *= 1.0 - betas[i]; sq[i] = std::sqrt(prod); }
    double s0 = sq[0], sT = sq[n - 1];
    double prev = 1.0;
    for (int i = 0; i < n; ++i) {
      double v = (sq[i] - sT) * s0 / (s0 - sT);
      double ab = v * v;
      betas[i] = 1.0 - (i == 0 ? ab : ab / prev);
      prev = ab;
    }
  }
  return betas;
}

}  // namespace fastdiff
