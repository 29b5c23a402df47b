"""Score-SDE's predictor-corrector sampler (Song et al. 2021): Langevin corrector + reverse-diffusion predictor.

The predictor is a coefficient program row (``"pc"`` in csrc/samplers_pc.cpp, run by the fused step
op). The corrector is a Langevin step ``x <- x + eps_i score + sqrt(2 eps_i) z`` with a signal-to-noise
step size; ``step_rule`` picks how ``eps_i`` is set:

* ``"expected"`` (default): ``eps_i = 2 alpha_i snr^2 sigma_i^2``, score-SDE's rule with the norms replaced
  by their expected values under the Gaussian perturbation kernel (``E||z||^2 = D``,
  ``E||grad log p(x_t | x_0)||^2 = D / sigma_i^2``). It depends on no sample, so results are
  batch-independent, and it never blows up where a sample's score happens to be small, which made the
  norm rule diverge in low dimension (2-D mixture, 100 steps: sliced W2 1.12 with "norms", see
  docs/samplers.md). In high dimension the norms concentrate at those expected values and the two rules agree.
* ``"norms"``: score-SDE's ``eps_i = 2 alpha_i (snr ||z|| / ||score||)^2`` with each sample's own norms
  (score-SDE averages them over the batch, which would make a sample depend on its batch).

``alpha_i = (alpha(t_i) / alpha(t_{i+1}))^2`` is score-SDE's ``1 - beta_i`` for VP and 1 for VE. The corrector
runs as a separate small torch computation before each predictor row: two launches per step. Each
step costs ``1 + n_corrector`` network evaluations. Corrector noise is Philox noise keyed by the
sample's seed at (stage k, stream 2 + j) for corrector iteration j, so it never collides with the
step noise (stream 0) or the initial noise (stream 1).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff.kernels.philox import philox_normal
from fastdiff.program import Program
from fastdiff.runtime.checks import NonFiniteError
from fastdiff.runtime.step import fused_step
from fastdiff.solvers.drift import x0_eps_coefficients

CORRECTOR_STREAM = 2


def score_from_output(prediction: str, m: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The score ``-eps_hat / sigma`` of a network output ``m`` of type ``prediction`` at state ``x``."""
    _, (eps_x, eps_m) = x0_eps_coefficients(prediction, alpha, sigma)
    return -(eps_x * x.float() + eps_m * m.float()) / sigma


STEP_RULES = ("expected", "norms")


def langevin_step(
    x: torch.Tensor,
    score: torch.Tensor,
    z: torch.Tensor,
    snr: float,
    alpha_i: float,
    sigma: float = 1.0,
    step_rule: str = "norms",
) -> torch.Tensor:
    """One Langevin corrector step with a signal-to-noise step size (``step_rule``: see the module docstring;
    ``sigma`` is the noise level of the state, used by ``"expected"``)."""
    if step_rule == "expected":
        step = torch.tensor(2.0 * alpha_i * (snr * sigma) ** 2, device=x.device, dtype=torch.float32)
    elif step_rule == "norms":
        grad_norm = score.flatten(1).norm(dim=1)
        noise_norm = z.flatten(1).norm(dim=1)
        step = 2.0 * alpha_i * (snr * noise_norm / grad_norm) ** 2
        step = step.reshape((-1,) + (1,) * (x.dim() - 1))
    else:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
    return x.float() + step * score + torch.sqrt(2.0 * step) * z


def run_pc(
    pipe: Any,
    prog: Program,
    x: torch.Tensor,
    seeds: torch.Tensor,
    kwargs: dict,
    noise: Any,
    return_x0: bool,
    progress: bool,
    snr: float = 0.16,
    n_corrector: int = 1,
    step_rule: str = "expected",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the pc sampler: at each stage ``n_corrector`` Langevin steps, then the predictor row.

    ``noise`` (explicit, indexed by stage) replaces only the predictor's noise.
    """
    if isinstance(n_corrector, float) and n_corrector.is_integer():
        n_corrector = int(n_corrector)
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be an int >= 0, got {n_corrector!r}")
    if not (isinstance(snr, (int, float)) and snr > 0):
        raise ValueError(f"snr must be a float > 0, got {snr!r}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
    sch = pipe.schedule
    batch = x.shape[0]
    numel = x[0].numel()
    x0_all = x.new_empty((prog.grid.steps, *x.shape)) if return_x0 else None
    nonfinite = torch.full((batch,), torch.iinfo(torch.int32).max, dtype=torch.int32, device=x.device)
    nxt = torch.empty_like(x)
    t_all = prog.grid.t
    for k in tqdm(range(prog.stages), disable=not progress, desc="fastdiff pc", leave=False):
        t = float(prog.t[k])
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        alpha_i = (a / float(sch.alpha(t_all[k + 1]))) ** 2
        mt = torch.full((batch,), float(prog.model_time[k]), dtype=torch.float32, device=x.device)
        for j in range(n_corrector):
            m = pipe.model(x, mt, **kwargs)
            score = score_from_output(pipe.prediction, m, x, a, s)
            z = philox_normal(seeds, numel, k, CORRECTOR_STREAM + j).reshape(x.shape)
            x = langevin_step(x, score, z, snr, alpha_i, s, step_rule).to(x.dtype).contiguous()
        m = pipe.model(x, mt, **kwargs).contiguous()
        fused_step(
            x=x,
            m=m,
            coeffs=prog.coef_device,
            stage=k,
            seeds=seeds,
            use_noise=prog.uses_noise(k),
            noise=None if noise is None else noise[k].to(x),
            x_out=nxt,
            x0_out=x0_all[prog.step_of(k)] if x0_all is not None else None,
            nonfinite=nonfinite,
        )
        x, nxt = nxt, x
    if int(nonfinite.min()) != torch.iinfo(torch.int32).max:
        samples = torch.nonzero(nonfinite != torch.iinfo(torch.int32).max).flatten().tolist()
        raise NonFiniteError(prog.step_of(int(nonfinite.min())), samples)
    return x, x0_all
