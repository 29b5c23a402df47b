// Time grids: the steps + 1 points a sampler visits, first (noisiest) to terminal.
#pragma once
#include <string>
#include <vector>

#include "schedule.h"

namespace fastdiff {

// Spacings: "leading", "trailing", "linspace" (diffusers' DDIM/DDPM timesteps, discrete schedules only),
// "uniform" (in t), "logsnr" (uniform in log-SNR), "karras" (EDM's rho-spaced sigma/alpha),
// "quadratic" (t - t_min grows quadratically). Schedules with a clean end (discrete VP, EDM, flow)
// take `steps` spaced points in [t_min, t_max] and finish on the clean end, as diffusers and
// k-diffusion do; the others take `steps + 1` spaced points from t_max to t_min.
std::vector<double> make_grid(const Schedule& schedule, int steps, const std::string& spacing, int steps_offset,
                              double rho);

}  // namespace fastdiff
