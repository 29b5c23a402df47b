// Noise schedules in float64: alpha(t), sigma(t) and the forward SDE of each family.
// The state convention is x_t = alpha(t) x0 + sigma(t) eps for every schedule (docs/architecture.md, principle 1).
#pragma once
#include <string>
#include <vector>

namespace fastdiff {

enum class Kind { VPDiscrete, VPLinear, VPCosine, VPTabulated, SubVP, VE, EDM, Flow };

// One schedule. t is the schedule's own time axis:
//  - VPDiscrete: the training timestep index, continuous in [0, N-1]; t = -1 is the clean end
//    (alpha = 1, sigma = 0), where diffusers' samplers finish (set_alpha_to_one / final sigma 0).
//    Between table entries sigma/alpha is interpolated linearly in t, as diffusers' Euler schedulers do.
//  - VPLinear, VPCosine, SubVP: continuous t in [t_min, t_max].
//  - VPTabulated: a continuous beta(t) given on a grid; its integral is tabulated by the trapezoid
//    rule (quadrature.cpp) and abar(t) = exp(-int beta) is read by cubic Hermite interpolation.
//  - VE: t in [0, 1], sigma(t) = sigma_min (sigma_max / sigma_min)^t.
//  - EDM: t is sigma itself, in [sigma_min, sigma_max]; t = 0 is the clean end.
//  - Flow: rectified flow, alpha = 1 - t, sigma = t, t in [t_min, t_max]; t = 0 is the clean end and
//    the network is fed t * time_scale (1000 for diffusers' flow-matching transformers).
class Schedule {
 public:
  static Schedule vp_discrete(const std::vector<double>& betas);
  static Schedule vp_linear(double beta_min, double beta_max, double t_eps);
  static Schedule vp_cosine(double s, double t_eps, double t_max);
  static Schedule vp_tabulated(const std::vector<double>& t, const std::vector<double>& beta);
  static Schedule sub_vp(double beta_min, double beta_max, double t_eps);
  static Schedule ve(double sigma_min, double sigma_max);
  static Schedule edm(double sigma_min, double sigma_max, double sigma_data);
  static Schedule flow(double t_min, double t_max, double time_scale);

  Kind kind() const { return kind_; }
  std::string name() const;
  double t_min() const { return t_min_; }
  double t_max() const { return t_max_; }
  // Whether the schedule has a clean end (alpha = 1 or sigma = 0) beyond t_min that grids finish on.
  bool has_clean_end() const { return kind_ == Kind::VPDiscrete || kind_ == Kind::EDM || kind_ == Kind::Flow; }
  double clean_end() const { return kind_ == Kind::VPDiscrete ? -1.0 : 0.0; }
  int num_train_timesteps() const { return static_cast<int>(abar_.size()); }
  const std::vector<double>& alphas_cumprod() const { return abar_; }
  const std::vector<double>& betas() const { return betas_; }
  double sigma_data() const { return kind_ == Kind::EDM ? p_[2] : 0.0; }
  // Standard deviation of the prior the sampler starts from at t_max (1 for VP-like, sigma_max for VE/EDM).
  double prior_std() const;

  double alpha(double t) const;
  double sigma(double t) const;
  double log_snr(double t) const;         // log(alpha^2 / sigma^2)
  double edm_sigma(double t) const;       // sigma / alpha, the noise level of x / alpha
  double drift_coef(double t) const;      // f(x, t) = drift_coef(t) * x
  double g2(double t) const;              // squared diffusion coefficient g(t)^2
  double model_time(double t) const;      // what the network is fed
  // Inverse of a strictly monotone function of t, by bisection in float64 over [t_min, t_max].
  double t_from_log_snr(double lam) const;
  double t_from_edm_sigma(double s) const;

 private:
  Kind kind_ = Kind::VPLinear;
  double p_[3] = {0, 0, 0};  // family parameters (beta_min/max, s, sigma_min/max, sigma_data, time_scale)
  double t_min_ = 0, t_max_ = 1;
  std::vector<double> abar_, betas_, edm_sigmas_;
  std::vector<double> grid_t_, grid_beta_, grid_B_;  // VPTabulated: beta(t) and its integral on a grid
  void check_t(double t) const;
  double beta_integral(double t) const;  // int_0^t beta(s) ds for VP-like continuous schedules
  double beta(double t) const;
  double discrete_edm_sigma(double t) const;
};

// Validation helpers: throw std::invalid_argument (ValueError in Python) naming the argument.
void require_finite(const char* name, double v);
void require_positive(const char* name, double v);
void require_range(const char* name, double v, double lo, double hi, bool lo_open, bool hi_open);

// Betas of a discrete VP schedule, as diffusers defines them, computed in float64.
std::vector<double> make_betas(int num_train_timesteps, const std::string& beta_schedule, double beta_start,
                               double beta_end, bool rescale_zero_terminal_snr);

// Cumulative integral of f tabulated on an increasing grid t, by the composite trapezoid rule.
// Error bound (quadrature.cpp): |I_k - exact| <= (t_k - t_0) * h_max^2 * max|f''| / 12.
std::vector<double> cumulative_trapezoid(const std::vector<double>& t, const std::vector<double>& f);
// The bound above for a given grid and a bound M2 on |f''|.
double trapezoid_error_bound(const std::vector<double>& t, double max_abs_f2);
// Value at x of the cubic Hermite interpolant of F with derivative f on the grid t (x inside the grid).
double hermite_interpolate(const std::vector<double>& t, const std::vector<double>& F,
                           const std::vector<double>& f, double x);

}  // namespace fastdiff
