"""UniPC and DEIS: parity with diffusers on the exact GMM model, and UniPC's convergence order.

The grid is taken from diffusers' own timesteps/sigmas (including UniPC's linspace rule
np.linspace(0, N-1, steps+1).round()[::-1][:-1] and DEIS's final sigma), built into a fastdiff
Grid and run with build_program + Pipeline.run_program, from the same initial noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_helpers import pf_ode_reference

from fastdiff import Pipeline, Schedule
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.exact import GaussianMixture
from fastdiff.program import build_program
from fastdiff.samplers import get_sampler
from fastdiff.schedule import Grid

BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PTYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
CPU = torch.device("cpu")


def _grid_from_diffusers(sch: Schedule, scheduler) -> Grid:
    ts = scheduler.timesteps.numpy().astype(np.float64)
    s_last = float(scheduler.sigmas[-1])
    t_last = -1.0 if s_last == 0 else float(sch.t_from_edm_sigma(s_last))
    t = np.concatenate([ts, [t_last]])
    return Grid(t=t, alpha=sch.alpha(t), sigma=sch.sigma(t), log_snr=sch.log_snr(t), model_time=sch.model_time(t))


def _parity(
    cls, sampler: str, steps: int, spacing: str, prediction: str, variant: str | None = None, **options
) -> float:
    sch = Schedule.vp_discrete(**BETAS)
    named = {"solver_type": variant} if variant else {}
    scheduler = cls(**BETAS, timestep_spacing=spacing, prediction_type=PTYPE[prediction], **options, **named)
    scheduler.set_timesteps(steps)
    model = default_mixture().as_model(sch, prediction)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    xd = x.clone()
    for t in scheduler.timesteps:
        xd = scheduler.step(model(xd, t.to(torch.float64).expand(64)), t, xd).prev_sample
    fd_options = {k: float(v) for k, v in options.items() if k != "final_sigmas_type"}
    fd_options |= {"variant": variant} if variant else {}
    prog = build_program(sch, _grid_from_diffusers(sch, scheduler), sampler, prediction, CPU, **fd_options)
    assert prog.stages == steps
    xf = Pipeline(model, sch, prediction, device="cpu").run_program(prog, x.float())
    return float((xf.double() - xd).norm() / xd.norm())


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_unipc_matches_diffusers(steps, spacing):
    from diffusers import UniPCMultistepScheduler

    assert _parity(UniPCMultistepScheduler, "unipc", steps, spacing, "eps") < 1e-4


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_unipc_matches_diffusers_other_predictions(prediction):
    from diffusers import UniPCMultistepScheduler

    assert _parity(UniPCMultistepScheduler, "unipc", 10, "trailing", prediction) < 1e-4


def test_unipc_first_order_and_no_lower_order_final_match_diffusers():
    from diffusers import UniPCMultistepScheduler

    assert _parity(UniPCMultistepScheduler, "unipc", 10, "linspace", "eps", solver_order=1) < 1e-4
    # without lower_order_final, an order-2 step into the clean end is ill-defined (rk = 0) in both
    with pytest.raises(ValueError, match="no finite update"):
        _parity(UniPCMultistepScheduler, "unipc", 10, "linspace", "eps", lower_order_final=False)


@pytest.mark.parametrize("variant,order", [("bh1", 1), ("bh1", 2), ("bh1", 3), ("bh2", 3)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unipc_bh1_and_third_order_match_diffusers(variant, order, prediction):
    from diffusers import UniPCMultistepScheduler

    # bh1's B(h) = -h is infinite on a step into sigma = 0, where diffusers multiplies it by a zero residual (NaN):
    # its bh1 runs end on sigma_min.
    for steps in (10, 25):
        rel = _parity(
            UniPCMultistepScheduler,
            "unipc",
            steps,
            "trailing",
            prediction,
            variant,
            solver_order=order,
            final_sigmas_type="sigma_min",
        )
        assert rel < 1e-4, (steps, rel)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_deis_matches_diffusers(steps, spacing):
    from diffusers import DEISMultistepScheduler

    assert _parity(DEISMultistepScheduler, "deis", steps, spacing, "eps") < 1e-4


@pytest.mark.parametrize("steps,prediction", [(10, "v"), (25, "eps"), (10, "x0")])
def test_deis_third_order_matches_diffusers(steps, prediction):
    from diffusers import DEISMultistepScheduler

    # diffusers evaluates the order-3 log-rho integrals in float32; give it float64 sigmas so the
    # comparison measures the algorithm, not diffusers' rounding (float32 agrees to ~6e-6)
    orig = DEISMultistepScheduler.set_timesteps

    def set_timesteps64(self, *a, **k):
        orig(self, *a, **k)
        self.sigmas = self.sigmas.to(torch.float64)

    DEISMultistepScheduler.set_timesteps = set_timesteps64
    try:
        assert _parity(DEISMultistepScheduler, "deis", steps, "linspace", prediction, solver_order=3) < 1e-4
    finally:
        DEISMultistepScheduler.set_timesteps = orig


def test_bad_solver_order():
    sch = Schedule.vp_discrete()
    grid = sch.grid(10)
    with pytest.raises(ValueError, match="solver_order"):
        build_program(sch, grid, "unipc", "eps", CPU, solver_order=4.0)
    with pytest.raises(ValueError, match="variant"):
        build_program(sch, grid, "unipc", "eps", CPU, variant="bh3")
    with pytest.raises(ValueError, match="solver_order"):
        build_program(sch, grid, "deis", "eps", CPU, solver_order=4.0)
    assert get_sampler("unipc").order == 3 and not get_sampler("unipc").stochastic


@pytest.fixture(scope="module")
def smooth_reference():
    """A smooth 2-D mixture, VP-linear schedule, 16 starting points and their accurate PF-ODE endpoints."""
    gmm = GaussianMixture(torch.tensor([[-1.5, 0.5], [1.5, -0.5]]), torch.tensor([0.8, 1.0]), torch.tensor([0.6, 0.4]))
    sch = Schedule.vp_linear()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return gmm, sch, x, pf_ode_reference(gmm, sch, x.numpy(), sch.t_max, sch.t_min)


@pytest.mark.parametrize(
    "sampler,options,order",
    [
        ("unipc", {}, 3),
        ("unipc", {"variant": "bh1"}, 3),
        ("unipc", {"solver_order": 3.0}, 4),
        ("deis", {}, 2),
        ("deis", {"solver_order": 3.0}, 3),
    ],
)
def test_convergence_order(sampler, options, order, smooth_reference):
    """Error against an accurate PF-ODE solution shrinks at the theoretical rate as steps double.

    UniPC-2 with its corrector is order 3 (Zhao et al. 2023, UniC raises the order by one). A smooth
    mixture (component stds 0.8 and 1) keeps 20-80 steps in the asymptotic regime.
    """
    gmm, sch, x, ref = smooth_reference
    pipe = Pipeline(gmm.as_model(sch, "eps"), sch, "eps", device="cpu", dtype=torch.float32)
    steps_list = [20, 40, 80]
    errs = []
    for steps in steps_list:
        prog = build_program(sch, sch.grid(steps, spacing="logsnr"), sampler, "eps", CPU, **options)
        out = pipe.run_program(prog, x.float()).double().numpy()
        errs.append(float(np.sqrt(np.mean((out - ref) ** 2))))
    slope = -np.polyfit(np.log(steps_list), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (errs, slope)
