// Rows for two samplers whose nonlinear part (if any) runs outside the program:
//  - "pc": score-SDE's reverse-diffusion predictor (Song et al. 2021, ReverseDiffusionPredictor) from t
//    to s, written for any alpha/sigma: with a = alpha_t/alpha_s and G^2 = sigma_t^2 - a^2 sigma_s^2
//    (VP: beta_i, VE: sigma_t^2 - sigma_s^2), x_s = (2 - a) x + G^2 score + G z; the last step adds no
//    noise (score-SDE's denoised x_mean). The Langevin corrector runs before each row in
//    fastdiff/corrector.py (its step size needs per-sample norms).
//  - "consistency": multistep consistency sampling: x0 = f(x, t_i) (the network's x0 estimate),
//    x_{i+1} = alpha(t_{i+1}) x0 + sigma(t_{i+1}) z; the last row returns x0 itself.
#include <cmath>

#include "coefficients.h"

namespace fastdiff {
namespace {

void build_pc_predictor(Program& prog, const Schedule& sch, const std::vector<double>& g,
                        const std::string& prediction, const SamplerOptions&) {
  const int n = static_cast<int>(g.size()) - 1;
  for (int i = 0; i < n; ++i) {
    const Step p = begin_step(prog, sch, g, i, prediction);
    double ar = p.at / p.as, G2 = p.st * p.st - ar * ar * p.ss * p.ss;
    // score = -eps / sigma_t
    prog.at(p.k, CX) = 2.0 - ar - G2 * p.eps.x / p.st;
    prog.at(p.k, CM) = -G2 * p.eps.m / p.st;
    prog.at(p.k, CZ) = i == n - 1 ? 0.0 : std::sqrt(std::max(G2, 0.0));
    check_row(prog, p.k, "pc", prediction, p.t);
  }
}

void build_consistency(Program& prog, const Schedule& sch, const std::vector<double>& g,
                       const std::string& prediction, const SamplerOptions&) {
  const int n = static_cast<int>(g.size()) - 1;
  for (int i = 0; i < n; ++i) {
    double t = g[i];
    Linear x0, eps;
    prediction_to_x0_eps(prediction, sch.alpha(t), sch.sigma(t), x0, eps);
    int k = prog.add_stage(sch, t, i);
    double an = i == n - 1 ? 1.0 : sch.alpha(g[i + 1]), sn = i == n - 1 ? 0.0 : sch.sigma(g[i + 1]);
    prog.at(k, CX) = an * x0.x;
    prog.at(k, CM) = an * x0.m;
    prog.at(k, CZ) = sn;
    prog.at(k, EX) = x0.x;
    prog.at(k, EM) = x0.m;
    check_row(prog, k, "consistency", prediction, t);
  }
}

const bool kReg = register_sampler("pc", &build_pc_predictor) && register_sampler("consistency", &build_consistency);

}  // namespace
}  // namespace fastdiff
