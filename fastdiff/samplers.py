"""The samplers fastdiff knows, with what each one is.

Every fixed-step sampler is a coefficient program built in C++ (csrc/coefficients.cpp) and run by the
one fused step kernel; this module holds what a user needs to choose one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALL_PREDICTIONS = ("eps", "x0", "v", "score", "flow")


@dataclass(frozen=True)
class SamplerInfo:
    """What a sampler is: its order, whether it injects noise, network evaluations per step, and the
    prediction types it accepts."""

    name: str
    order: int
    stochastic: bool
    nfe_per_step: int
    predictions: tuple[str, ...]
    options: tuple[str, ...]
    summary: str
    # The grid spacing on discrete (DDPM-trained) schedules when the caller names none; None: the
    # schedule's own default ("leading", diffusers' DDIM default). Multistep solvers start at the
    # prior's end ("trailing"): from "leading"'s first point, t = 1000 - 1000/steps, their high-order
    # steps amplify the mismatch of x_T with that noise level and get worse as steps grow (measured on
    # the 2-D mixture, dpmpp_3m_sde: sliced W2 0.93 / 1.87 / 0.59 at 10 / 25 / 50 steps "leading",
    # 0.12 / 0.12 / 0.16 "trailing").
    discrete_spacing: str | None = None

    def default_spacing(self, schedule: Any) -> str | None:
        """The spacing :meth:`fastdiff.Pipeline.sample` uses on ``schedule`` when none is given (None: the
        schedule's default)."""
        return self.discrete_spacing if getattr(schedule, "is_discrete", False) else None

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raises ValueError naming any option this sampler does not take, and TypeError/ValueError for an option
        value of the wrong kind (:func:`check_option_values`)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) if self.options else "no options"
            raise ValueError(f"sampler {self.name!r} does not take {', '.join(unknown)}; it takes {takes}")
        check_option_values(options)


OPTION_KINDS: dict[str, Any] = {
    **dict.fromkeys(("eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "snr", "rtol", "atol"), "real"),
    **dict.fromkeys(("order", "solver_order", "n_corrector"), "int"),
    **dict.fromkeys(("lower_order_final", "legacy_third_order", "euler_at_final"), "bool"),
    "variance_type": ("fixed_small", "fixed_large"),
    "solver_type": ("midpoint", "heun"),
    "variant": ("bh1", "bh2"),
    "step_rule": ("expected", "norms"),
    "times": "reals",
}
"""What each sampler option's value must be: a real number, an int, a bool, one of some strings, or a sequence of
real numbers. Ranges are the sampler's own (checked where the program is built, with ValueError)."""


def check_option_values(options: Mapping[str, Any]) -> None:
    """TypeError for a sampler option of the wrong type (a string where a number goes is never silently ignored),
    ValueError for a non-finite number or a string not among the accepted ones; each names the option."""
    for name, value in options.items():
        kind = OPTION_KINDS.get(name)
        if kind is None:
            continue
        if isinstance(kind, tuple):
            if not isinstance(value, str) or value not in kind:
                raise ValueError(f"{name} must be one of {kind}, got {value!r}")
        elif kind == "reals":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise TypeError(f"{name} must be a non-empty sequence of real numbers, got {_describe(value)}")
            for item in value:
                _check_number(name, item, "real")
        else:
            _check_number(name, value, kind)


def _check_number(name: str, value: Any, kind: str) -> None:
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {_describe(value)}")
        return
    wanted = numbers.Integral if kind == "int" else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, wanted):
        raise TypeError(f"{name} must be {'an int' if kind == 'int' else 'a real number'}, got {_describe(value)}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:40] + '...'}"


EAGER_SAMPLERS = ("rk45", "pc", "consistency")
"""Samplers that are not one fixed coefficient program: they run eagerly (:mod:`fastdiff.solvers.eager`), never as
a CUDA graph or in a step-level batch."""

SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo(
            "ddpm",
            1,
            True,
            1,
            ALL_PREDICTIONS,
            ("variance_type",),
            "DDPM ancestral step; variance_type 'fixed_small' or 'fixed_large' (diffusers' DDPMScheduler)",
        ),
        SamplerInfo(
            "ddim",
            1,
            False,
            1,
            ALL_PREDICTIONS,
            ("eta",),
            "DDIM with eta in [0, 1]: eta=0 is the PF-ODE's exponential-integrator step, eta=1 equals ddpm",
        ),
        SamplerInfo(
            "euler_maruyama",
            1,
            True,
            1,
            ALL_PREDICTIONS,
            (),
            "Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dW, in t",
        ),
        SamplerInfo(
            "pf_ode_euler",
            1,
            False,
            1,
            ALL_PREDICTIONS,
            (),
            "Euler on the probability-flow ODE dx = [f - g^2 score / 2] dt, in t",
        ),
        # k-diffusion / EDM family (csrc/samplers_karras.cpp): integrate x/alpha against sigma/alpha.
        SamplerInfo(
            "euler",
            1,
            False,
            1,
            ALL_PREDICTIONS,
            ("s_churn", "s_tmin", "s_tmax", "s_noise"),
            "Euler in the EDM variables (k-diffusion's sample_euler, diffusers' EulerDiscrete); "
            "s_churn > 0 adds EDM's churn noise (then stochastic)",
        ),
        SamplerInfo(
            "euler_ancestral",
            1,
            True,
            1,
            ALL_PREDICTIONS,
            ("eta", "s_noise"),
            "Euler step to sigma_down plus sigma_up noise (k-diffusion's sample_euler_ancestral, "
            "diffusers' EulerAncestralDiscrete); eta in [0, 1], default 1",
        ),
        SamplerInfo(
            "heun",
            2,
            False,
            2,
            ALL_PREDICTIONS,
            ("s_churn", "s_tmin", "s_tmax", "s_noise"),
            "Heun's method in the EDM variables (Karras et al. Alg. 2; k-diffusion's sample_heun, diffusers' "
            "HeunDiscrete); Euler into sigma = 0, so 2 steps - 1 NFE; s_churn > 0 adds EDM's churn noise",
        ),
        SamplerInfo(
            "flow_euler",
            1,
            False,
            1,
            ALL_PREDICTIONS,
            (),
            "Euler in t for rectified flow (Schedule.flow): x' = x + (t' - t)(eps - x0) "
            "(diffusers' FlowMatchEulerDiscrete)",
        ),
        SamplerInfo(
            "flow_heun",
            2,
            False,
            2,
            ALL_PREDICTIONS,
            (),
            "Heun in t for rectified flow (Schedule.flow), Euler into t = 0 (diffusers' FlowMatchHeunDiscrete)",
        ),
        # DPM-Solver++ multistep (csrc/samplers_dpmpp.cpp).
        SamplerInfo(
            "dpmpp_2m",
            2,
            False,
            1,
            ALL_PREDICTIONS,
            ("lower_order_final", "solver_type", "euler_at_final"),
            "DPM-Solver++(2M) (diffusers' DPMSolverMultistep dpmsolver++ order 2, k-diffusion's "
            "sample_dpmpp_2m); lower_order_final (default True) below 15 steps; solver_type "
            "'midpoint' or 'heun'; euler_at_final: a first-order last step",
            discrete_spacing="trailing",
        ),
        SamplerInfo(
            "dpmpp_3m",
            3,
            False,
            1,
            ALL_PREDICTIONS,
            ("lower_order_final", "solver_type", "legacy_third_order", "euler_at_final"),
            "DPM-Solver++(3M), third order; legacy_third_order=True gives diffusers' DPMSolverMultistep "
            "dpmsolver++ order 3 exactly (its D2 term is halved: second order); lower_order_final "
            "(default True) below 15 steps; solver_type of its second-order steps",
            discrete_spacing="trailing",
        ),
        SamplerInfo(
            "dpmpp_2m_sde",
            2,
            True,
            1,
            ALL_PREDICTIONS,
            ("eta", "s_noise", "lower_order_final", "solver_type", "euler_at_final"),
            "SDE-DPM-Solver++(2M) (diffusers' sde-dpmsolver++ order 2, k-diffusion's sample_dpmpp_2m_sde); "
            "eta in [0, 1], default 1 (0 is dpmpp_2m)",
            discrete_spacing="trailing",
        ),
        SamplerInfo(
            "dpmpp_3m_sde",
            3,
            True,
            1,
            ALL_PREDICTIONS,
            ("eta", "s_noise", "lower_order_final", "solver_type", "legacy_third_order", "euler_at_final"),
            "SDE-DPM-Solver++(3M); k-diffusion's sample_dpmpp_3m_sde with solver_type='heun', "
            "lower_order_final=False, legacy_third_order=True; eta in [0, 1], default 1",
            discrete_spacing="trailing",
        ),
        # Linear multistep (csrc/samplers_lms.cpp).
        SamplerInfo(
            "pndm",
            4,
            False,
            1,
            ALL_PREDICTIONS,
            (),
            "PLMS (pseudo linear multistep; diffusers' PNDMScheduler with skip_prk_steps): Adams-Bashforth "
            "weights on the network outputs, DDIM's transfer; the first step costs 2 evaluations",
        ),
        SamplerInfo(
            "pndm_prk",
            4,
            False,
            1,
            ALL_PREDICTIONS,
            (),
            "PNDM as diffusers' PNDMScheduler default (skip_prk_steps=False): 3 pseudo Runge-Kutta steps of 4 "
            "evaluations each, then PLMS; more than 3 steps; 4 history slots, so not served per row (the "
            "serving engine's pool holds 3)",
        ),
        SamplerInfo(
            "lms",
            4,
            False,
            1,
            ALL_PREDICTIONS,
            ("order",),
            "linear multistep in the EDM variables, order 1-4 (default 4; k-diffusion's sample_lms, "
            "diffusers' LMSDiscreteScheduler)",
        ),
        # issue 4, second half: unipc, deis, pc, rk45, consistency
        SamplerInfo(
            "unipc",
            3,
            False,
            1,
            ALL_PREDICTIONS,
            ("solver_order", "lower_order_final", "variant"),
            "UniPC predictor + corrector on x0 (diffusers' UniPCMultistepScheduler with predict_x0), solver_order "
            "1-3 (default 2; the corrector raises the order by one), variant 'bh2' (default) or 'bh1'",
            discrete_spacing="trailing",
        ),
        SamplerInfo(
            "deis",
            2,
            False,
            1,
            ALL_PREDICTIONS,
            ("solver_order", "lower_order_final"),
            "DEIS log-rho multistep, solver_order 1-3 (default 2; diffusers' DEISMultistepScheduler)",
            discrete_spacing="trailing",
        ),
        SamplerInfo(
            "pc",
            1,
            True,
            2,
            ALL_PREDICTIONS,
            ("snr", "n_corrector", "step_rule"),
            "score-SDE predictor-corrector: reverse-diffusion predictor + Langevin corrector "
            "(snr 0.16; step_rule 'expected' (default, batch-independent and stable in low "
            "dimension) or 'norms'); 1 + n_corrector evaluations per step",
        ),
        SamplerInfo(
            "rk45",
            5,
            False,
            0,
            ("eps", "x0", "v", "score", "flow"),
            ("rtol", "atol"),
            "adaptive Dormand-Prince on the PF-ODE (continuous schedules, eager); steps is ignored, "
            "NFE is adaptive (nfe_per_step 0); pipe.last_nfe holds the last run's",
        ),
        SamplerInfo(
            "consistency",
            1,
            True,
            1,
            ALL_PREDICTIONS,
            ("times",),
            "multistep consistency sampling x = alpha x0 + sigma z through `times`; returns the last x0",
        ),
    )
}


def get_sampler(name: str) -> SamplerInfo:
    """The :class:`SamplerInfo` for ``name``; an unknown name raises ValueError listing the known ones."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def list_samplers() -> tuple[SamplerInfo, ...]:
    """Every known sampler, sorted by name."""
    return tuple(SAMPLERS[n] for n in sorted(SAMPLERS))
