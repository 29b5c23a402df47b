// Sampler coefficient programs (docs/architecture.md, principle 2).
//
// A program is a list of stages. Stage k feeds the network the current state at model_time[k] and
// then applies one row of float64 coefficients:
//   x0_hat = e_x x + e_m m          (the denoised estimate; the kernel may clip it to x0c)
//   x_next = c_x x + c_m m + c_x0 x0c + c_h0 h0 + c_h1 h1 + c_h2 h2 + c_z z
//   h_new  = d_x x + d_m m + d_x0 x0c  (written to a history slot for later stages)
// Builders leave c_x0 = d_x0 = 0 (linear in x and m); fastdiff.program.clip_form moves m into the x0c
// terms when x0 is clipped or thresholded (kernels/reference.py).
// with the prediction type (eps, x0, v, score, flow) already folded in, so the kernel never divides
// by alpha or sigma. meta[k] names the history slots the row reads (h0..h2, -1 = unused), the slot
// h_new goes to (-1 = none), the sampler step the stage belongs to, and whether the stage calls the
// network first (a stage that does not, e.g. EDM's churn noise, reads m as zero: its c_m is 0).
//
// Samplers register a builder under their name (register_sampler, from a static initialiser in their
// own source file), so each family lives in its own file.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "schedule.h"

namespace fastdiff {

constexpr int kNumCoef = 12;  // c_x, c_m, c_h0, c_h1, c_h2, c_z, d_x, d_m, e_x, e_m, c_x0, d_x0
constexpr int kNumMeta = 6;   // read slot 0, read slot 1, read slot 2, write slot, step index, calls model
enum Coef { CX, CM, CH0, CH1, CH2, CZ, DX, DM, EX, EM, CX0, DX0 };
enum Meta { READ0, READ1, READ2, WRITE, STEP, CALLS_MODEL };

// Named sampler options (eta, variance_type, s_churn, ...). Python validates which names a sampler
// takes; builders read theirs with a default.
struct SamplerOptions {
  std::map<std::string, double> num;
  std::map<std::string, std::string> str;
  double get(const std::string& name, double fallback) const {
    auto it = num.find(name);
    return it == num.end() ? fallback : it->second;
  }
  std::string get(const std::string& name, const std::string& fallback) const {
    auto it = str.find(name);
    return it == str.end() ? fallback : it->second;
  }
};

struct Program {
  int stages = 0;
  std::vector<double> coef;       // [stages, kNumCoef]
  std::vector<int32_t> meta;      // [stages, kNumMeta]
  std::vector<double> t;          // [stages] schedule time of the state the network sees
  std::vector<double> model_time; // [stages] what the network is fed

  // Appends a stage with every coefficient zero and no history; returns its index.
  int add_stage(const Schedule& sch, double t_now, int step, bool calls_model = true);
  double& at(int stage, Coef c) { return coef[stage * kNumCoef + c]; }
  int32_t& meta_at(int stage, Meta m) { return meta[stage * kNumMeta + m]; }
};

// x0 and eps as linear functions of (x, m) for a prediction type at (alpha, sigma).
struct Linear {
  double x = 0, m = 0;
};
void prediction_to_x0_eps(const std::string& prediction, double alpha, double sigma, Linear& x0, Linear& eps);

const std::vector<std::string>& prediction_names();

// A sampler builder appends the stages of one run over grid_t (noisiest first) to an empty program.
using SamplerBuilder = void (*)(Program& prog, const Schedule& sch, const std::vector<double>& grid_t,
                                const std::string& prediction, const SamplerOptions& options);
// Registers a builder; call from a static initialiser: static const bool kReg = register_sampler(...).
bool register_sampler(const std::string& name, SamplerBuilder builder);
std::vector<std::string> sampler_names();

// The common start of a one-stage step from grid_t[i] to grid_t[i + 1]: alpha/sigma at both ends, x0 and eps
// as linear functions of (x, m) at t, and a new model-calling stage k whose x0-hat coefficients are set.
struct Step {
  int k;
  double t, s, at, st, as, ss;
  Linear x0, eps;
};
Step begin_step(Program& prog, const Schedule& sch, const std::vector<double>& grid_t, int i,
                const std::string& prediction);

// Throws a ValueError-mapped exception when a row of stage k has a non-finite update coefficient.
void check_row(const Program& prog, int k, const std::string& sampler, const std::string& prediction, double t);

Program make_program(const Schedule& schedule, const std::vector<double>& grid_t, const std::string& sampler,
                     const std::string& prediction, const SamplerOptions& options);

}  // namespace fastdiff
