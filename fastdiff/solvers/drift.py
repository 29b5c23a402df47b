"""The probability-flow ODE drift of a network, and the conversions of a network output into x0 and eps.

The bottom of the solvers: :mod:`fastdiff.solvers.likelihood` (likelihoods), :mod:`fastdiff.solvers.inversion`
(encoding), :mod:`fastdiff.solvers.eager` (rk45 sampling) and :mod:`fastdiff.solvers.corrector` (Langevin
correction) build on it; it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fastdiff.runtime.checks import as_kwargs
from fastdiff.schedule import Schedule

__all__ = ["SCORE_PREDICTIONS", "PFODEDrift", "pf_ode_drift", "x0_eps_coefficients", "check_pf_ode_schedule"]

#: Prediction types with a score (and so a PF-ODE drift) wherever sigma > 0.
SCORE_PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def x0_eps_coefficients(prediction: str, a: float, s: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """``x0_hat = c[0] x + c[1] m`` and ``eps_hat = e[0] x + e[1] m`` for a network output m (float64).

    The same conversions as the C++ coefficient programs (csrc/coefficients.cpp).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        a, s = np.float64(a), np.float64(s)
        if prediction == "eps":
            return (1.0 / a, -s / a), (0.0, 1.0)
        if prediction == "x0":
            return (0.0, 1.0), (1.0 / s, -a / s)
        if prediction == "v":  # v = a eps - s x0
            d = a * a + s * s
            return (a / d, -s / d), (s / d, a / d)
        if prediction == "score":  # score = -eps / s
            return (1.0 / a, s * s / a), (0.0, -s)
        if prediction == "flow":  # u = eps - x0
            d = a + s
            return (1.0 / d, -s / d), (1.0 / d, a / d)
    raise ValueError(f"prediction must be one of {SCORE_PREDICTIONS} (a prediction with a score), got {prediction!r}")


class PFODEDrift:
    """The probability-flow ODE's drift ``F(x, t) = f(t) x - g(t)^2/2 * score(x, t)`` of a network.

    ``F`` is affine in the network output ``m = model(x, model_time(t))``: ``F = A(t) x + B(t) m``
    with float64 coefficients (:meth:`coefficients`) that fold in the prediction type, so
    ``div_x F = A(t) * D + B(t) * div_x m`` and only the network needs differentiating.

    For rectified-flow schedules it uses the equivalent ``F = alpha'(t) x0_hat + sigma'(t) eps_hat =
    eps_hat - x0_hat``, which stays finite at t = 1 (where ``f`` and ``g^2`` are infinite): with
    ``prediction="flow"`` it is the network's velocity itself.

    Args:
        model: ``model(x, t, **kwargs)`` in the schedule's model-time convention.
        schedule: a continuous-time :class:`fastdiff.Schedule` (not ``vp_discrete``).
        prediction: one of :data:`SCORE_PREDICTIONS`.
        model_kwargs: keyword arguments passed to every model call (conditioning).

    Call it as ``F(x, t)`` with ``x`` ``[B, ...]`` and ``t`` a float; it returns a tensor like ``x``.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        schedule: Schedule,
        prediction: str,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **kwargs), got {type(model).__name__}")
        check_pf_ode_schedule(schedule)
        if prediction not in SCORE_PREDICTIONS:
            raise ValueError(
                f"prediction must be one of {SCORE_PREDICTIONS} (a prediction with a score), got {prediction!r}"
            )
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.model_kwargs = as_kwargs(model_kwargs)
        for t in (schedule.t_min, schedule.t_max):
            a_coef, b_coef = self.coefficients(t)
            if not (math.isfinite(a_coef) and math.isfinite(b_coef)):
                raise ValueError(
                    f"the schedule {schedule!r} with prediction {prediction!r} has no finite PF-ODE drift at "
                    f"t = {t} (alpha = {float(schedule.alpha(t)):.4g}, sigma = {float(schedule.sigma(t)):.4g}); "
                    "use a schedule whose t range stays inside (alpha > 0, sigma > 0) or another prediction"
                )

    def coefficients(self, t: float) -> tuple[float, float]:
        """``(A, B)`` in float64 with ``F(x, t) = A x + B model(x, t)``."""
        sch = self.schedule
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        (x0_x, x0_m), (eps_x, eps_m) = x0_eps_coefficients(self.prediction, a, s)
        with np.errstate(divide="ignore", invalid="ignore"):
            if sch.kind == "flow":  # x_t = (1 - t) x0 + t eps: dx/dt = eps_hat - x0_hat
                return float(eps_x - x0_x), float(eps_m - x0_m)
            f, g2 = float(sch.drift_coef(t)), float(sch.g2(t))
            # score = -eps_hat / s, so -g2/2 * score = g2 / (2 s) * eps_hat
            c = np.float64(g2) / (2.0 * np.float64(s))
            return float(f + c * eps_x), float(c * eps_m)

    def model_output(self, x: torch.Tensor, t: float, **model_kwargs: Any) -> torch.Tensor:
        """The network's output at ``(x, t)``, checked and cast to x's dtype."""
        kwargs = {**self.model_kwargs, **model_kwargs}
        mt = torch.full((x.shape[0],), float(self.schedule.model_time(t)), dtype=x.dtype, device=x.device)
        m = self.model(x, mt, **kwargs)
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(m).__name__}")
        if m.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(m.shape)} for an input of shape {tuple(x.shape)}")
        return m.to(x.dtype)

    def __call__(self, x: torch.Tensor, t: float, **model_kwargs: Any) -> torch.Tensor:
        a_coef, b_coef = self.coefficients(float(t))
        return a_coef * x + b_coef * self.model_output(x, float(t), **model_kwargs)

    def __repr__(self) -> str:
        return f"PFODEDrift({self.schedule!r}, prediction={self.prediction!r})"


def pf_ode_drift(
    model: Callable[..., torch.Tensor],
    schedule: Schedule,
    prediction: str,
    model_kwargs: Mapping[str, Any] | None = None,
) -> PFODEDrift:
    """The PF-ODE drift ``F(x, t) = f(t) x - g(t)^2/2 * score(x, t)`` of ``model`` as a callable ``F(x, t)``.

    The score comes from the network output ``m`` as: eps: ``-m/sigma``; x0: ``-(x - alpha m)/sigma^2``;
    v: ``-eps/sigma`` with ``eps = (sigma x + alpha v)/(alpha^2 + sigma^2)``; score: ``m``; flow:
    ``-eps/sigma`` with ``eps = (x + alpha u)/(alpha + sigma)``. See :class:`PFODEDrift`.

    Raises:
        ValueError: a discrete-time schedule (it has no continuous PF-ODE), a prediction without a
            score, or a schedule/prediction pair whose drift is not finite on ``[t_min, t_max]``.
    """
    return PFODEDrift(model, schedule, prediction, model_kwargs)


def check_pf_ode_schedule(schedule: Any) -> None:
    """Raises unless ``schedule`` is a continuous-time schedule with sigma(t_min) > 0 (a PF-ODE to integrate)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
    if schedule.is_discrete:
        raise ValueError(
            f"schedule {schedule!r} is discrete-time and has no probability-flow ODE in continuous time "
            "(its network only knows integer timesteps); likelihoods and rk45 encoding need a continuous "
            "schedule (vp_linear, vp_cosine, sub_vp, from_beta_function, ve, edm, flow). DDIM inversion "
            "(encode(..., sampler='ddim')) works on discrete schedules."
        )
    if not float(schedule.sigma(schedule.t_min)) > 0:
        raise ValueError(
            f"schedule {schedule!r} has sigma(t_min) = 0: the score is undefined where the PF-ODE would start"
        )
