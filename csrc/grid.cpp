#include "grid.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace fastdiff {
namespace {

// numpy.linspace(start, stop, num): start + i * step, with the last point set to stop exactly.
std::vector<double> np_linspace(double start, double stop, int num) {
  std::vector<double> out(num);
  if (num == 1) { out[0] = start; return out; }
  double step = (stop - start) / (num - 1);
  for (int i = 0; i < num; ++i) out[i] = start + i * step;
  out[num - 1] = stop;
  return out;
}

// numpy's round(): half to even, which std::nearbyint does in the default rounding mode.
double np_round(double v) { return std::nearbyint(v); }

// The timesteps of diffusers' DDIMScheduler.set_timesteps for the three spacings.
std::vector<double> diffusers_timesteps(int n_train, int steps, const std::string& spacing, int offset) {
  std::vector<double> ts(steps);
  if (spacing == "linspace") {
    std::vector<double> lin = np_linspace(0.0, n_train - 1.0, steps);
    for (int i = 0; i < steps; ++i) ts[i] = np_round(lin[steps - 1 - i]);
  } else if (spacing == "leading") {
    int ratio = n_train / steps;
    for (int i = 0; i < steps; ++i) ts[i] = double((steps - 1 - i) * ratio + offset);
  } else {  // trailing
    double ratio = double(n_train) / steps;
    for (int i = 0; i < steps; ++i) ts[i] = np_round(n_train - i * ratio) - 1.0;
  }
  return ts;
}

}  // namespace

std::vector<double> make_grid(const Schedule& sch, int steps, const std::string& spacing, int steps_offset,
                              double rho) {
  const bool discrete = sch.kind() == Kind::VPDiscrete;
  if (steps < 1) throw std::invalid_argument("steps must be >= 1, got " + std::to_string(steps));
  if (discrete && steps > sch.num_train_timesteps()) {
    std::ostringstream msg;
    msg << "steps must be <= num_train_timesteps (" << sch.num_train_timesteps() << ") for a discrete schedule, got "
        << steps;
    throw std::invalid_argument(msg.str());
  }
  if (steps_offset < 0) throw std::invalid_argument("steps_offset must be >= 0, got " + std::to_string(steps_offset));
  require_positive("rho", rho);

  std::vector<double> t;
  const bool clean = sch.has_clean_end();
  const int n_spaced = clean ? steps : steps + 1;
  const double hi = sch.t_max(), lo = sch.t_min();

  if (spacing == "leading" || spacing == "trailing" || spacing == "linspace") {
    if (!discrete)
      throw std::invalid_argument("spacing '" + spacing + "' needs a discrete schedule (the " + sch.name() +
                                  " schedule takes 'uniform', 'logsnr', 'karras' or 'quadratic')");
    t = diffusers_timesteps(sch.num_train_timesteps(), steps, spacing, steps_offset);
    if (t.front() > hi) {
      std::ostringstream msg;
      msg << "steps_offset " << steps_offset << " puts the first timestep at " << t.front() << ", past the last training timestep "
          << hi;
      throw std::invalid_argument(msg.str());
    }
  } else if (spacing == "uniform") {
    t = np_linspace(hi, lo, n_spaced);
  } else if (spacing == "quadratic") {
    std::vector<double> u = np_linspace(1.0, 0.0, n_spaced);
    for (double v : u) t.push_back(lo + (hi - lo) * v * v);
  } else if (spacing == "logsnr") {
    double l_hi = sch.log_snr(hi), l_lo = sch.log_snr(lo);
    if (!std::isfinite(l_hi) || !std::isfinite(l_lo))
      throw std::invalid_argument("spacing 'logsnr' needs a finite log-SNR at both ends of the " + sch.name() +
                                  " schedule");
    for (double l : np_linspace(l_hi, l_lo, n_spaced)) t.push_back(sch.t_from_log_snr(l));
    t.front() = hi;
    // Fix: with a single spaced point (steps = 1 on a schedule with a clean end) front and back are
    // the same element, and setting back = t_min moved the only model evaluation from t_max to t_min.
    if (n_spaced > 1) t.back() = lo;
  } else if (spacing == "karras") {
    double s_max = sch.edm_sigma(hi), s_min = sch.edm_sigma(lo);
    if (!std::isfinite(s_max))
      throw std::invalid_argument("spacing 'karras' needs a finite sigma/alpha at t_max of the " + sch.name() +
                                  " schedule");
    // k-diffusion's get_sigmas_karras: ramp in sigma^(1/rho).
    double a = std::pow(s_max, 1.0 / rho), b = std::pow(s_min, 1.0 / rho);
    for (int i = 0; i < n_spaced; ++i) {
      double ramp = n_spaced == 1 ? 0.0 : double(i) / (n_spaced - 1);
      t.push_back(sch.t_from_edm_sigma(std::pow(a + ramp * (b - a), rho)));
    }
    if (sch.kind() != Kind::EDM) { t.front() = hi; if (n_spaced > 1) t.back() = lo; }
  } else {
    throw std::invalid_argument("spacing must be one of 'leading', 'trailing', 'linspace', 'uniform', 'logsnr', "
                                "'karras', 'quadratic', got '" + spacing + "'");
  }
  if (clean) t.push_back(sch.clean_end());
  return t;
}

}  // namespace fastdiff
