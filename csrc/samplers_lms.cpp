// Linear multistep samplers with constant-free history, as coefficient programs:
//   pndm  PLMS (Liu et al. 2022, pseudo linear multistep), diffusers' PNDMScheduler with skip_prk_steps, and
//         pndm_prk its default: a warm-up of three pseudo Runge-Kutta steps (prk_step below, four stages each, their
//         first outputs starting the history; a fourth slot, kSlots, holds a step's partial outputs):
//         the transfer x' = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) e (DDIM's eta = 0 step, which
//         is diffusers' formula (9) written for any alpha/sigma) applied to a combination e of the last
//         network outputs, converted to eps with the current state: step 0 is a Heun-like pair of stages
//         (the output at x_0, then the average of it and the output at the Euler point, applied from x_0
//         again), later steps use the Adams-Bashforth weights (3, -1)/2, (23, -16, 5)/12 and
//         (55, -59, 37, -9)/24. diffusers combines the raw outputs (epsilon or v) and converts the
//         combination with the current sample; so does this (for every prediction type).
//   lms   k-diffusion's sample_lms / diffusers' LMSDiscreteScheduler: in y = x / alpha against the EDM sigma
//         s = sigma / alpha, y' = y + sum_j c_j d_{i-j} with d = (y - x0_hat) / s and c_j the integral over
//         [s_i, s_{i+1}] of the Lagrange basis polynomial of node s_{i-j} (orders warm up 1, 2, ... to
//         `order`, default 4). The integrals are exact (4-point Gauss-Legendre on a cubic at most).
// Both keep their history (raw outputs / derivatives) in three rotating slots (the kernel's MAX_HISTORY, which
// the serving engine's pool also has): a fourth-order stage reads all three and overwrites the oldest, which
// the fused step allows (each element is read before it is written, as in its per-row mode).
#include <cmath>
#include <stdexcept>
#include <string>

#include "coefficients.h"

namespace fastdiff {
namespace {

constexpr int kSlots = 3;

// x' = tx x + te eps: the deterministic transfer from (a, s) to (a2, s2).
struct Transfer {
  double tx, te;
};
Transfer transfer(double a, double s, double a2, double s2) { return {a2 / a, s2 - a2 * s / a}; }

// diffusers' pseudo Runge-Kutta step (step_prk) from g[i] to g[i + 1] as four stages. Every stage moves the step's
// start x_s by the transfer T with a combination of the outputs e1..e4 (eps converted with x_s at g[i], as diffusers
// does): x1 = T(s -> mid_a, e1), x2 = T(s -> mid_b, e2), x3 = T(s -> end, e3), x4 = T(s -> end, (e1 + 2 e2 + 2 e3 +
// e4) / 6), the network fed mid_b at x1 and x2. On a discrete schedule diffusers' half points are mid_a = t -
// (N // steps) // 2 and mid_b = t2 + (N // steps) // 2 (they differ by one for an odd step), elsewhere the midpoint.
// x_s is no stage's input after the first, so each row recovers it from its input state and a stored output: with
// x1 = pa x_s + qa e1, x2 = pb x_s + qb e2 and x3 = p2 x_s + q2 e3 (the transfers' weights), stage 1 keeps e1 in
// `ets` (the PLMS history, slot ets % 3), stage 2 keeps e2 in `tmp`, stage 3 overwrites it with h3 = x2 + beta e3,
// and stage 4 is c x3 + gamma h3 + q2 e1 / 6 + q2 e4 / 6, the one combination of x3 and h3 that carries
// p2 x_s + q2 (e2 + e3) / 3.
void prk_step(Program& prog, const Schedule& sch, const std::vector<double>& g, int i, const std::string& prediction,
              int ets, int tmp) {
  const double t = g[i], t2 = g[i + 1];
  const bool discrete = sch.kind() == Kind::VPDiscrete;
  const double half = discrete ? std::floor((t - t2) / 2.0) : 0.5 * (t - t2);
  const double mid_a = t - half, mid_b = t2 + half;
  const double a = sch.alpha(t), s = sch.sigma(t);
  Linear x0, eps;
  prediction_to_x0_eps(prediction, a, s, x0, eps);
  auto weights = [&](double to, double& p, double& q) {
    const Transfer tr = transfer(a, s, sch.alpha(to), sch.sigma(to));
    p = tr.tx + tr.te * eps.x;
    q = tr.te * eps.m;
  };
  double pa, qa, pb, qb, p2, q2;
  weights(mid_a, pa, qa);
  weights(mid_b, pb, qb);
  weights(t2, p2, q2);
  const double gamma = q2 / (3.0 * qb), c = 1.0 - gamma * pb / p2, beta = (q2 / 3.0 - c * q2) / gamma;
  const double times[4] = {t, mid_b, mid_b, t2};
  int k[4];
  for (int j = 0; j < 4; ++j) {
    k[j] = prog.add_stage(sch, times[j], i);
    Linear x0j, epsj;
    prediction_to_x0_eps(prediction, sch.alpha(times[j]), sch.sigma(times[j]), x0j, epsj);
    prog.at(k[j], EX) = x0j.x;
    prog.at(k[j], EM) = x0j.m;
  }
  prog.at(k[0], CX) = pa;  // x1 = pa x_s + qa e1; keep e1
  prog.at(k[0], CM) = qa;
  prog.meta_at(k[0], WRITE) = ets % kSlots;
  prog.at(k[0], DM) = 1.0;
  prog.at(k[1], CX) = pb / pa;  // x2 = (pb / pa) (x1 - qa e1) + qb e2; keep e2
  prog.at(k[1], CM) = qb;
  prog.meta_at(k[1], READ0) = ets % kSlots;
  prog.at(k[1], CH0) = -pb * qa / pa;
  prog.meta_at(k[1], WRITE) = tmp;
  prog.at(k[1], DM) = 1.0;
  prog.at(k[2], CX) = p2 / pb;  // x3 = (p2 / pb) (x2 - qb e2) + q2 e3; h3 = x2 + beta e3
  prog.at(k[2], CM) = q2;
  prog.meta_at(k[2], READ0) = tmp;
  prog.at(k[2], CH0) = -p2 * qb / pb;
  prog.meta_at(k[2], WRITE) = tmp;
  prog.at(k[2], DX) = 1.0;
  prog.at(k[2], DM) = beta;
  prog.at(k[3], CX) = c;  // x4 = c x3 + gamma h3 + q2 e1 / 6 + q2 e4 / 6
  prog.at(k[3], CM) = q2 / 6.0;
  prog.meta_at(k[3], READ0) = tmp;
  prog.at(k[3], CH0) = gamma;
  prog.meta_at(k[3], READ1) = ets % kSlots;
  prog.at(k[3], CH1) = q2 / 6.0;
  for (int j = 0; j < 4; ++j) check_row(prog, k[j], "pndm", prediction, times[j]);
}

// PLMS after `prk` pseudo Runge-Kutta steps (0: the Heun-like start of skip_prk_steps).
void plms(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction, int prk) {
  static const double kAB[4][4] = {{1, 0, 0, 0}, {1.5, -0.5, 0, 0}, {23.0 / 12, -16.0 / 12, 5.0 / 12, 0},
                                   {55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24}};
  const int n = static_cast<int>(g.size()) - 1;
  if (prk > 0 && n <= prk)
    throw std::invalid_argument("pndm_prk needs more than " + std::to_string(prk) + " steps (its " +
                                std::to_string(prk) + " Runge-Kutta steps come first), got " + std::to_string(n));
  for (int i = 0; i < prk; ++i) prk_step(prog, sch, g, i, prediction, i, kSlots);
  for (int i = prk; i < n; ++i) {
    const Step p = begin_step(prog, sch, g, i, prediction);
    const Transfer tr = transfer(p.at, p.st, p.as, p.ss);
    // Outputs appended so far (diffusers' ets): the Runge-Kutta steps' first outputs (or step 0's first output),
    // then one per later step.
    const int order = std::min(i + 1, 4);
    prog.at(p.k, CX) = tr.tx + tr.te * p.eps.x;
    prog.at(p.k, CM) = tr.te * p.eps.m * kAB[order - 1][0];
    for (int j = 1; j < order; ++j) {
      prog.meta_at(p.k, static_cast<Meta>(READ0 + j - 1)) = (i - j) % kSlots;
      prog.at(p.k, static_cast<Coef>(CH0 + j - 1)) = tr.te * p.eps.m * kAB[order - 1][j];
    }
    if (i < n - 1) {  // this step's raw output, for the next steps
      prog.meta_at(p.k, WRITE) = i % kSlots;
      prog.at(p.k, DM) = 1.0;
    }
    check_row(prog, p.k, "pndm", prediction, p.t);
    if (i > 0 || n == 1) continue;
    // Step 0's second stage: the network at x_1 (fed t_1); from x_0 again with the averaged output,
    //   x' = T(x_0, (m_0 + m_1) / 2) = x_1 + te eps.m (m_1 - m_0) / 2   (the eps.x part is T's, at x_0).
    // Its output is not kept (diffusers does not append it).
    Linear x0e, epse;
    prediction_to_x0_eps(prediction, p.as, p.ss, x0e, epse);
    const int k2 = prog.add_stage(sch, p.s, 0);
    const double half = 0.5 * tr.te * p.eps.m;
    prog.at(k2, CX) = 1.0;
    prog.at(k2, CM) = half;
    prog.meta_at(k2, READ0) = 0;
    prog.at(k2, CH0) = -half;
    prog.at(k2, EX) = x0e.x;
    prog.at(k2, EM) = x0e.m;
    check_row(prog, k2, "pndm", prediction, p.s);
  }
}

// int_{lo}^{hi} prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]) dtau, exactly for up to 4 nodes.
double lagrange_integral(const std::vector<double>& nodes, int j, double lo, double hi) {
  static const double x[4] = {-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526};
  static const double w[4] = {0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538};
  double half = 0.5 * (hi - lo), mid = 0.5 * (hi + lo), sum = 0.0;
  for (int q = 0; q < 4; ++q) {
    double tau = mid + half * x[q], prod = 1.0;
    for (size_t k = 0; k < nodes.size(); ++k)
      if (static_cast<int>(k) != j) prod *= (tau - nodes[k]) / (nodes[j] - nodes[k]);
    sum += w[q] * prod;
  }
  return half * sum;
}

void build_lms(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
               const SamplerOptions& opt) {
  if (opt.str.count("order")) throw std::invalid_argument("order must be 1, 2, 3 or 4, got '" + opt.str.at("order") + "'");
  const double order_d = opt.get("order", 4.0);
  if (order_d != 1.0 && order_d != 2.0 && order_d != 3.0 && order_d != 4.0)
    throw std::invalid_argument("order must be 1, 2, 3 or 4 for lms, got " + std::to_string(order_d));
  const int max_order = static_cast<int>(order_d);
  const int n = static_cast<int>(g.size()) - 1;
  std::vector<double> s(n + 1);
  for (int i = 0; i <= n; ++i) s[i] = sch.edm_sigma(g[i]);
  for (int i = 0; i < n; ++i) {
    const Step p = begin_step(prog, sch, g, i, prediction);
    const int order = std::min(i + 1, max_order);
    std::vector<double> nodes(order);
    for (int j = 0; j < order; ++j) nodes[j] = s[i - j];
    // d_i = (x / a - x0_hat) / s_i, linear in (x, m).
    const double dx = (1.0 / p.at - p.x0.x) / s[i], dm = -p.x0.m / s[i];
    const double c0 = lagrange_integral(nodes, 0, s[i], s[i + 1]);
    prog.at(p.k, CX) = p.as * (1.0 / p.at + c0 * dx);
    prog.at(p.k, CM) = p.as * c0 * dm;
    for (int j = 1; j < order; ++j) {
      prog.meta_at(p.k, static_cast<Meta>(READ0 + j - 1)) = (i - j) % kSlots;
      prog.at(p.k, static_cast<Coef>(CH0 + j - 1)) = p.as * lagrange_integral(nodes, j, s[i], s[i + 1]);
    }
    if (i < n - 1) {
      prog.meta_at(p.k, WRITE) = i % kSlots;
      prog.at(p.k, DX) = dx;
      prog.at(p.k, DM) = dm;
    }
    check_row(prog, p.k, "lms", prediction, p.t);
  }
}

void build_pndm(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
                const SamplerOptions&) {
  plms(prog, sch, g, prediction, 0);
}

// diffusers' PNDMScheduler default (pndm_order 4): three Runge-Kutta steps, then PLMS.
void build_pndm_prk(Program& prog, const Schedule& sch, const std::vector<double>& g, const std::string& prediction,
                    const SamplerOptions&) {
  plms(prog, sch, g, prediction, 3);
}

const bool kRegistered = register_sampler("pndm", &build_pndm) && register_sampler("pndm_prk", &build_pndm_prk) &&
                         register_sampler("lms", &build_lms);

}  // namespace
}  // namespace fastdiff
