// k-diffusion / EDM samplers (Karras et al. 2022) and their rectified-flow counterparts, as coefficient
// programs (docs/architecture.md, principle 2):
//   euler, euler_ancestral, heun   integrate y = x / alpha against s = sigma / alpha (Schedule::edm_sigma),
//                                  dy/ds = (y - D) / s with D the x0-hat, and map back to the native state
//                                  x = alpha y, so every row is a float64 combination of x and m;
//   flow_euler, flow_heun          integrate the native x_t = (1 - t) x0 + t eps of Schedule::flow in t,
//                                  dx/dt = eps - x0 (diffusers' FlowMatchEuler / FlowMatchHeun).
// Heun takes two stages per step: stage 1 (network at x_i) keeps the half step x_i + (s' - s) d_i / 2 in history
// slot 0 and moves to the Euler prediction at t_{i+1}; stage 2 (network there) adds the other half slope. A step that ends at
// sigma = 0 is a plain Euler step (as k-diffusion's sample_heun and diffusers' HeunDiscrete). Both
// stages report an x0-hat for the step, so a Heun step's x0-hat is the later one (at t_{i+1}).
// EDM's churn (s_churn, s_tmin, s_tmax, s_noise) is a stage without a network call that adds noise of
// variance s_hat^2 - s^2 in y-space and moves the state to t_hat with edm_sigma(t_hat) = s_hat.
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "coefficients.h"

namespace fastdiff {
namespace {

// A grid point: schedule time, alpha, the EDM sigma s = sigma / alpha and the native sigma.
struct Point {
  double t, a, s, sig;
};

Point point_at(const Schedule& sch, double t) { return {t, sch.alpha(t), sch.edm_sigma(t), sch.sigma(t)}; }

// A numeric option; a string given for it is an error rather than silently ignored.
double num_option(const SamplerOptions& opt, const std::string& name, double fallback) {
  if (opt.str.count(name)) throw std::invalid_argument(name + " must be a number, got '" + opt.str.at(name) + "'");
  double v = opt.get(name, fallback);
  if (std::isnan(v)) throw std::invalid_argument(name + " must not be NaN");
  return v;
}

struct Churn {
  double s_churn, s_tmin, s_tmax, s_noise;
};

Churn churn_options(const SamplerOptions& opt) {
  Churn c{num_option(opt, "s_churn", 0.0), num_option(opt, "s_tmin", 0.0), num_option(opt, "s_tmax", INFINITY),
          num_option(opt, "s_noise", 1.0)};
  if (!(c.s_churn >= 0) || std::isinf(c.s_churn))
    throw std::invalid_argument("s_churn must be a finite number >= 0, got " + std::to_string(c.s_churn));
  if (!(c.s_tmin >= 0)) throw std::invalid_argument("s_tmin must be >= 0, got " + std::to_string(c.s_tmin));
  if (!(c.s_tmax >= c.s_tmin))
    throw std::invalid_argument("s_tmax must be >= s_tmin, got s_tmax = " + std::to_string(c.s_tmax));
  if (!(c.s_noise >= 0) || std::isinf(c.s_noise))
    throw std::invalid_argument("s_noise must be a finite number >= 0, got " + std::to_string(c.s_noise));
  return c;
}

// Euler in (y, s) from p to an EDM sigma s_to, landing at alpha a_to: with y = x / p.a and D = x0-hat,
//   y' = y + (s_to - p.s) / p.s (y - D),   x' = a_to y'.
void euler_row(Program& prog, int k, const Point& p, double s_to, double a_to, const Linear& x0) {
  double r = (s_to - p.s) / p.s;
  prog.at(k, CX) = a_to * ((s_to / p.s) / p.a - r * x0.x);
  prog.at(k, CM) = -a_to * r * x0.m;
}

// Adds EDM's churn stage before step i when gamma > 0 and returns the point the step then starts from.
Point churn_stage(Program& prog, const Schedule& sch, const Point& p, int i, int steps, const Churn& c,
                  const char* sampler) {
  if (c.s_churn <= 0 || !(c.s_tmin <= p.s && p.s <= c.s_tmax)) return p;
  double gamma = std::min(c.s_churn / steps, std::sqrt(2.0) - 1.0);
  double s_hat = p.s * (1.0 + gamma);
  double s_top = sch.edm_sigma(sch.t_max());
  if (s_hat > s_top * (1 + 1e-12)) {
    std::ostringstream msg;
    msg.precision(10);
    msg << "sampler '" << sampler << "': s_churn raises sigma at step " << i << " from " << p.s << " to " << s_hat
        << ", beyond the schedule's largest sigma " << s_top << "; set s_tmax below " << p.s
        << " (EDM uses s_tmax = 50 with sigma_max = 80) or build the schedule with a larger sigma_max";
    throw std::invalid_argument(msg.str());
  }
  double t_hat = sch.kind() == Kind::EDM ? s_hat : sch.t_from_edm_sigma(std::min(s_hat, s_top));
  Point q = point_at(sch, t_hat);
  int k = prog.add_stage(sch, p.t, i, /*calls_model=*/false);
  // y_hat = y + s_noise sqrt(s_hat^2 - s^2) z in y-space; x_hat = alpha_hat y_hat.
  prog.at(k, CX) = q.a / p.a;
  prog.at(k, CZ) = q.a * c.s_noise * std::sqrt(std::max(q.s * q.s - p.s * p.s, 0.0));
  return q;
}

template <int Which>  // 0 euler, 1 heun
void karras_ode(Program& prog, const Schedule& sch, const std::vector<double>& grid_t, const std::string& prediction,
                const SamplerOptions& opt) {
  static const char* names[] = {"euler", "heun"};
  const Churn churn = churn_options(opt);
  const int steps = static_cast<int>(grid_t.size()) - 1;
  for (int i = 0; i < steps; ++i) {
    Point p = churn_stage(prog, sch, point_at(sch, grid_t[i]), i, steps, churn, names[Which]);
    Point q = point_at(sch, grid_t[i + 1]);
    Linear x0, eps;
    prediction_to_x0_eps(prediction, p.a, p.sig, x0, eps);
    int k = prog.add_stage(sch, p.t, i);
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    euler_row(prog, k, p, q.s, q.a, x0);
    check_row(prog, k, names[Which], prediction, p.t);
    if (Which == 0 || q.s == 0) continue;  // the step into sigma = 0 is Euler only
    // Stage 1 keeps the half step H = a' (y_i + (s' - s) / 2 d_i) (a Euler row to the middle sigma); stage 2 at the
    // Euler point x_e (t_{i+1}) adds the other half slope: y' = H / a' + (s' - s) / 2 (y_e - D_e) / s',  x' = a' y'.
    // Stage 2 thus reads the state only through its slope, as diffusers' HeunDiscrete (which steps from its stored
    // y_i whatever sample the second call passes).
    {
      double r = (q.s - p.s) / (2.0 * p.s);
      prog.at(k, DX) = q.a * ((1.0 + r) / p.a - r * x0.x);
      prog.at(k, DM) = -q.a * r * x0.m;
    }
    prog.meta_at(k, WRITE) = 0;
    Linear x0e, epse;
    prediction_to_x0_eps(prediction, q.a, q.sig, x0e, epse);
    int k2 = prog.add_stage(sch, q.t, i);
    double w = (q.s - p.s) / (2.0 * q.s);
    prog.meta_at(k2, READ0) = 0;
    prog.at(k2, CH0) = 1.0;
    prog.at(k2, CX) = w - q.a * w * x0e.x;
    prog.at(k2, CM) = -q.a * w * x0e.m;
    prog.at(k2, EX) = x0e.x;
    prog.at(k2, EM) = x0e.m;
    check_row(prog, k2, names[Which], prediction, q.t);
  }
}

// k-diffusion's get_ancestral_step: sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),
// sigma_down = sqrt(s'^2 - sigma_up^2); an Euler step to sigma_down plus s_noise sigma_up z (y-space).
void euler_ancestral(Program& prog, const Schedule& sch, const std::vector<double>& grid_t,
                     const std::string& prediction, const SamplerOptions& opt) {
  const double eta = num_option(opt, "eta", 1.0), s_noise = num_option(opt, "s_noise", 1.0);
  require_range("eta", eta, 0.0, 1.0, false, false);
  if (!(s_noise >= 0) || std::isinf(s_noise))
    throw std::invalid_argument("s_noise must be a finite number >= 0, got " + std::to_string(s_noise));
  const int steps = static_cast<int>(grid_t.size()) - 1;
  for (int i = 0; i < steps; ++i) {
    Point p = point_at(sch, grid_t[i]), q = point_at(sch, grid_t[i + 1]);
    double up = 0.0, down = q.s;
    if (eta > 0) {
      up = std::min(q.s, eta * std::sqrt(q.s * q.s * (p.s * p.s - q.s * q.s) / (p.s * p.s)));
      down = std::sqrt(q.s * q.s - up * up);
    }
    Linear x0, eps;
    prediction_to_x0_eps(prediction, p.a, p.sig, x0, eps);
    int k = prog.add_stage(sch, p.t, i);
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    euler_row(prog, k, p, down, q.a, x0);
    if (q.s > 0) prog.at(k, CZ) = q.a * s_noise * up;
    check_row(prog, k, "euler_ancestral", prediction, p.t);
  }
}

// Rectified flow in t: u = eps - x0 (the "flow" prediction), Euler x' = x + (t' - t) u and Heun
// x' = x + (t' - t) (u_i + u_e) / 2 with u_e at the Euler point; Euler only into t = 0 (diffusers'
// FlowMatchHeunDiscreteScheduler).
template <int Which>  // 0 flow_euler, 1 flow_heun
void flow_sampler(Program& prog, const Schedule& sch, const std::vector<double>& grid_t, const std::string& prediction,
                  const SamplerOptions&) {
  static const char* names[] = {"flow_euler", "flow_heun"};
  if (sch.kind() != Kind::Flow)
    throw std::invalid_argument(std::string("sampler '") + names[Which] +
                                "' needs the rectified-flow schedule (Schedule.flow), got the " + sch.name() +
                                " schedule; use 'euler' or 'heun' there");
  const int steps = static_cast<int>(grid_t.size()) - 1;
  for (int i = 0; i < steps; ++i) {
    double t = grid_t[i], s = grid_t[i + 1], dt = s - t;
    Linear x0, eps;
    prediction_to_x0_eps(prediction, sch.alpha(t), sch.sigma(t), x0, eps);
    int k = prog.add_stage(sch, t, i);
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    prog.at(k, CX) = 1.0 + dt * (eps.x - x0.x);
    prog.at(k, CM) = dt * (eps.m - x0.m);
    check_row(prog, k, names[Which], prediction, t);
    if (Which == 0 || s == 0) continue;
    prog.at(k, DX) = 1.0;
    prog.meta_at(k, WRITE) = 0;
    Linear x0e, epse;
    prediction_to_x0_eps(prediction, sch.alpha(s), sch.sigma(s), x0e, epse);
    int k2 = prog.add_stage(sch, s, i);
    // x' = (x_i + x_e) / 2 + dt u_e / 2, since x_e = x_i + dt u_i.
    prog.meta_at(k2, READ0) = 0;
    prog.at(k2, CH0) = 0.5;
    prog.at(k2, CX) = 0.5 + 0.5 * dt * (epse.x - x0e.x);
    prog.at(k2, CM) = 0.5 * dt * (epse.m - x0e.m);
    prog.at(k2, EX) = x0e.x;
    prog.at(k2, EM) = x0e.m;
    check_row(prog, k2, names[Which], prediction, s);
  }
}

const bool kRegistered = register_sampler("euler", &karras_ode<0>) && register_sampler("heun", &karras_ode<1>) &&
                         register_sampler("euler_ancestral", &euler_ancestral) &&
                         register_sampler("flow_euler", &flow_sampler<0>) &&
                         register_sampler("flow_heun", &flow_sampler<1>);

}  // namespace
}  // namespace fastdiff
