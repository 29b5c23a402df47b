"""Noise schedules and time grids, computed in C++ in float64 (``fastdiff._C``).

Every schedule follows one state convention, ``x_t = alpha(t) x0 + sigma(t) eps``, and knows what its
network is fed (:meth:`Schedule.model_time`): the training timestep index for discrete schedules, t for
continuous ones, sigma for EDM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastdiff._ext import C

SPACINGS = ("leading", "trailing", "linspace", "uniform", "logsnr", "karras", "quadratic")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Grid:
    """The ``steps + 1`` points a sampler visits, noisiest first, as float64 arrays."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    log_snr: np.ndarray
    model_time: np.ndarray

    @property
    def steps(self) -> int:
        """Number of steps (one less than the number of points)."""
        return len(self.t) - 1

    def __len__(self) -> int:
        return len(self.t)


class Schedule:
    """A noise schedule: ``alpha(t)``, ``sigma(t)``, its forward SDE and its time grids.

    Build one with a constructor (:meth:`vp_discrete`, :meth:`vp_linear`, :meth:`vp_cosine`,
    :meth:`sub_vp`, :meth:`ve`, :meth:`edm`, :meth:`flow`, :meth:`from_betas`,
    :meth:`from_beta_function`, :meth:`from_diffusers`). Every function of t takes a scalar or an
    array and returns float64.
    """

    def __init__(self, core: Any, config: Mapping[str, Any]):
        self._core = core
        self.config = dict(config)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def vp_discrete(
        cls,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rescale_zero_terminal_snr: bool = False,
    ) -> Schedule:
        """Discrete-time VP (DDPM) schedule with diffusers' beta schedules, computed in float64.

        ``beta_schedule`` is one of ``"linear"``, ``"scaled_linear"`` (linear in sqrt(beta)) or
        ``"squaredcos_cap_v2"`` (cosine, s = 0.008, beta capped at 0.999). The time axis is the
        timestep index ``0 .. num_train_timesteps - 1``; ``t = -1`` is the clean end.
        """
        if not isinstance(num_train_timesteps, (int, np.integer)) or isinstance(num_train_timesteps, bool):
            raise TypeError(f"num_train_timesteps must be an int, got {type(num_train_timesteps).__name__}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        _require_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
        betas = C.make_betas(
            int(num_train_timesteps),
            beta_schedule,
            _as_float("beta_start", beta_start),
            _as_float("beta_end", beta_end),
            bool(rescale_zero_terminal_snr),
        )
        return cls(
            C.Schedule.vp_discrete(betas),
            dict(
                kind="vp_discrete",
                num_train_timesteps=int(num_train_timesteps),
                beta_schedule=beta_schedule,
                beta_start=beta_start,
                beta_end=beta_end,
                rescale_zero_terminal_snr=rescale_zero_terminal_snr,
            ),
        )

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> Schedule:
        """Discrete-time VP schedule from any tabulated beta array (each beta in (0, 1])."""
        arr = _as_float64_vector("betas", betas)
        return cls(C.Schedule.vp_discrete(arr), dict(kind="vp_discrete", betas=arr.tolist()))

    @classmethod
    def from_beta_function(cls, t: Sequence[float] | np.ndarray, beta: Sequence[float] | np.ndarray) -> Schedule:
        """Continuous VP schedule from beta(t) given on an increasing grid ``t`` starting at t[0] = 0.

        ``int_0^t beta`` is tabulated by the composite trapezoid rule, whose error up to t is at most
        ``t * h_max**2 * max|beta''| / 12`` (:func:`trapezoid_error_bound`), and read between grid
        points by cubic Hermite interpolation. t runs over ``[t[1], t[-1]]`` (the log-SNR is infinite
        at t = 0). A grid starting later is rejected rather than extrapolated.
        """
        tt, bb = _as_float64_vector("t", t), _as_float64_vector("beta", beta)
        return cls(C.Schedule.vp_tabulated(tt, bb), dict(kind="vp_tabulated"))

    @classmethod
    def vp_linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_eps: float = 1e-3) -> Schedule:
        """Continuous VP SDE with linear beta(t) (score-SDE's VP), t in [t_eps, 1]."""
        return cls(
            C.Schedule.vp_linear(
                _as_float("beta_min", beta_min), _as_float("beta_max", beta_max), _as_float("t_eps", t_eps)
            ),
            dict(kind="vp_linear", beta_min=beta_min, beta_max=beta_max, t_eps=t_eps),
        )

    @classmethod
    def vp_cosine(cls, s: float = 0.008, t_eps: float = 1e-3, t_max: float = 1.0) -> Schedule:
        """Continuous VP with the cosine abar(t) = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2).

        abar reaches 0 at t = 1; pass ``t_max < 1`` (DPM-Solver uses 0.9946) to start where the
        log-SNR is finite, which noise-predicting samplers need.
        """
        return cls(
            C.Schedule.vp_cosine(_as_float("s", s), _as_float("t_eps", t_eps), _as_float("t_max", t_max)),
            dict(kind="vp_cosine", s=s, t_eps=t_eps, t_max=t_max),
        )

    @classmethod
    def sub_vp(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_eps: float = 1e-3) -> Schedule:
        """score-SDE's sub-VP SDE: alpha = exp(-B/2), sigma = 1 - exp(-B), t in [t_eps, 1]."""
        return cls(
            C.Schedule.sub_vp(
                _as_float("beta_min", beta_min), _as_float("beta_max", beta_max), _as_float("t_eps", t_eps)
            ),
            dict(kind="sub_vp", beta_min=beta_min, beta_max=beta_max, t_eps=t_eps),
        )

    @classmethod
    def ve(cls, sigma_min: float = 0.01, sigma_max: float = 50.0) -> Schedule:
        """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1]."""
        return cls(
            C.Schedule.ve(_as_float("sigma_min", sigma_min), _as_float("sigma_max", sigma_max)),
            dict(kind="ve", sigma_min=sigma_min, sigma_max=sigma_max),
        )

    @classmethod
    def edm(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> Schedule:
        """EDM (Karras et al.): alpha = 1 and t is sigma itself, in [sigma_min, sigma_max]; the model is
        fed sigma. ``sigma_data`` is kept for the network's preconditioning."""
        return cls(
            C.Schedule.edm(
                _as_float("sigma_min", sigma_min),
                _as_float("sigma_max", sigma_max),
                _as_float("sigma_data", sigma_data),
            ),
            dict(kind="edm", sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data),
        )

    @classmethod
    def flow(cls, t_min: float = 1e-3, t_max: float = 1.0, time_scale: float = 1000.0) -> Schedule:
        """Rectified flow: x_t = (1 - t) x0 + t eps, t in [t_min, t_max], clean end t = 0. The network is
        fed ``t * time_scale`` (diffusers' flow-matching transformers take sigma * 1000)."""
        return cls(
            C.Schedule.flow(_as_float("t_min", t_min), _as_float("t_max", t_max), _as_float("time_scale", time_scale)),
            dict(kind="flow", t_min=t_min, t_max=t_max, time_scale=time_scale),
        )

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> Schedule:
        """Discrete VP schedule from a diffusers scheduler or its config (dict or FrozenDict).

        Reads ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``,
        ``rescale_betas_zero_snr`` and ``trained_betas`` (which diffusers also rescales when asked).
        """
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise TypeError(
                "scheduler_or_config must be a diffusers scheduler or its config mapping, got "
                f"{type(scheduler_or_config).__name__}"
            )
        trained = config.get("trained_betas")
        if trained is not None:
            betas = _as_float64_vector("trained_betas", trained)
            # Fix: diffusers applies rescale_betas_zero_snr to trained_betas too; this used to be ignored.
            if config.get("rescale_betas_zero_snr", False):
                betas = _rescale_zero_terminal_snr(betas)
            return cls.from_betas(betas)
        return cls.vp_discrete(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule=config.get("beta_schedule", "linear"),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    # ---------------------------------------------------------------- properties
    @property
    def kind(self) -> str:
        """The family name: vp_discrete, vp_linear, vp_cosine, vp_tabulated, sub_vp, ve, edm or flow."""
        return self._core.name

    @property
    def is_discrete(self) -> bool:
        """True for discrete-time (timestep-indexed) schedules."""
        return self.kind == "vp_discrete"

    @property
    def t_min(self) -> float:
        """Smallest t a spaced grid visits (before any clean end)."""
        return self._core.t_min

    @property
    def t_max(self) -> float:
        """Largest t: where sampling starts."""
        return self._core.t_max

    @property
    def clean_end(self) -> float | None:
        """The t where grids finish (alpha = 1 or sigma = 0), or None when grids end at t_min."""
        return self._core.clean_end if self._core.has_clean_end else None

    @property
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior at t_max (1 for VP and flow, sigma_max for VE/EDM)."""
        return self._core.prior_std

    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps (discrete schedules; 0 otherwise)."""
        return self._core.num_train_timesteps

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """abar_i = prod_{j<=i} (1 - beta_j) in float64 (discrete schedules)."""
        return self._core.alphas_cumprod

    @property
    def betas(self) -> np.ndarray:
        """The discrete betas in float64 (discrete schedules)."""
        return self._core.betas

    @property
    def sigma_data(self) -> float:
        """EDM's sigma_data (0 for other families)."""
        return self._core.sigma_data

    # ---------------------------------------------------------------- functions of t
    def alpha(self, t: float | np.ndarray) -> np.ndarray:
        """Signal scale alpha(t)."""
        return self._core.alpha(t)

    def sigma(self, t: float | np.ndarray) -> np.ndarray:
        """Noise scale sigma(t)."""
        return self._core.sigma(t)

    def log_snr(self, t: float | np.ndarray) -> np.ndarray:
        """log(alpha^2 / sigma^2) (twice DPM-Solver's lambda)."""
        return self._core.log_snr(t)

    def edm_sigma(self, t: float | np.ndarray) -> np.ndarray:
        """sigma / alpha: the noise level of x / alpha (k-diffusion's sigma)."""
        return self._core.edm_sigma(t)

    def drift_coef(self, t: float | np.ndarray) -> np.ndarray:
        """The forward SDE's drift is ``f(x, t) = drift_coef(t) * x``."""
        return self._core.drift_coef(t)

    def g2(self, t: float | np.ndarray) -> np.ndarray:
        """The forward SDE's squared diffusion coefficient g(t)^2."""
        return self._core.g2(t)

    def model_time(self, t: float | np.ndarray) -> np.ndarray:
        """What the network is fed at t: the timestep index (discrete), t, or sigma (EDM)."""
        return self._core.model_time(t)

    def t_from_model_time(self, model_time: float | np.ndarray) -> np.ndarray:
        """Inverse of :meth:`model_time`: the schedule t a network input corresponds to."""
        mt = np.asarray(model_time, dtype=np.float64)
        return mt / self.config["time_scale"] if self.kind == "flow" else mt

    def t_from_log_snr(self, log_snr: float | np.ndarray) -> np.ndarray:
        """Inverse of :meth:`log_snr` on [t_min, t_max] (bisection in float64)."""
        return self._core.t_from_log_snr(log_snr)

    def t_from_edm_sigma(self, sigma: float | np.ndarray) -> np.ndarray:
        """Inverse of :meth:`edm_sigma` on [t_min, t_max] (bisection in float64)."""
        return self._core.t_from_edm_sigma(sigma)

    # ---------------------------------------------------------------- grids
    def default_spacing(self) -> str:
        """``"leading"`` for discrete schedules (diffusers' DDIM default), ``"karras"`` for EDM,
        ``"uniform"`` otherwise."""
        if self.is_discrete:
            return "leading"
        return "karras" if self.kind == "edm" else "uniform"

    def grid(self, steps: int, spacing: str | None = None, steps_offset: int = 0, rho: float = 7.0) -> Grid:
        """The ``steps + 1`` points a sampler visits, first to terminal.

        ``spacing``: ``"leading"``, ``"trailing"``, ``"linspace"`` (diffusers' DDIM timesteps; discrete
        schedules), ``"uniform"`` in t, ``"logsnr"`` (uniform in log-SNR, as DPM-Solver), ``"karras"``
        (EDM's sigma spacing with ``rho``; k-diffusion's ``get_sigmas_karras``) or ``"quadratic"``.
        Schedules with a clean end (discrete VP, EDM, flow) get ``steps`` spaced points and finish
        on the clean end; the others get ``steps + 1`` spaced points from t_max to t_min.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)):
            raise TypeError(f"steps_offset must be an int, got {type(steps_offset).__name__}")
        spacing = self.default_spacing() if spacing is None else spacing
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        t = self._core.grid(int(steps), spacing, int(steps_offset), _as_float("rho", rho))
        return Grid(
            t=t, alpha=self.alpha(t), sigma=self.sigma(t), log_snr=self.log_snr(t), model_time=self.model_time(t)
        )

    def grid_from_times(self, times: Sequence[float]) -> Grid:
        """A :class:`Grid` through ``times`` (schedule times, strictly decreasing, in [t_min, t_max]) plus the
        clean end (or ``t_min`` where the schedule has none)."""
        t = np.asarray([float(v) for v in times], dtype=np.float64)
        if t.ndim != 1 or len(t) < 1 or not np.all(np.isfinite(t)):
            raise ValueError(f"times must be a non-empty sequence of finite floats, got {times!r}")
        if np.any(np.diff(t) >= 0):
            raise ValueError(f"times must be strictly decreasing, got {list(t)}")
        if t.max() > self.t_max or t.min() < self.t_min:
            raise ValueError(f"times must lie in [t_min, t_max] = [{self.t_min}, {self.t_max}], got {list(t)}")
        end = self.clean_end if self.clean_end is not None else self.t_min
        t = np.concatenate([t, [end]])
        return Grid(
            t=t, alpha=self.alpha(t), sigma=self.sigma(t), log_snr=self.log_snr(t), model_time=self.model_time(t)
        )

    def grid_from_timesteps(self, timesteps: Sequence[float]) -> Grid:
        """The grid of diffusers' ``timesteps``: what the network is fed at each step, noisiest first (the
        timestep index for discrete schedules, ``t * time_scale`` for flow); the clean end is appended."""
        return self.grid_from_times(self.t_from_model_time(_as_float64_vector("timesteps", timesteps)))

    def grid_from_sigmas(self, sigmas: Sequence[float]) -> Grid:
        """The grid of k-diffusion / diffusers ``sigmas`` (``sigma / alpha``, noisiest first); a trailing 0 stands
        for the clean end, which is appended when it is missing, as diffusers does."""
        s = _as_float64_vector("sigmas", sigmas)
        if len(s) > 1 and s[-1] == 0.0:
            s = s[:-1]
        if np.any(s <= 0):
            raise ValueError(f"sigmas must be > 0 (but a final 0), got {list(s)}")
        return self.grid_from_times(self.t_from_edm_sigma(s))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k not in ("kind", "betas"))
        return f"Schedule.{self.config.get('kind', self.kind)}({args})"


def trapezoid_error_bound(t: Sequence[float] | np.ndarray, max_abs_beta2: float) -> float:
    """Error bound of :meth:`Schedule.from_beta_function`'s quadrature on grid ``t`` when
    ``|beta''| <= max_abs_beta2``."""
    return C.trapezoid_error_bound(_as_float64_vector("t", t), float(max_abs_beta2))


def _as_float(name: str, value: Any) -> float:
    """``float(value)`` for a real number; a TypeError naming the argument otherwise (a string or None
    used to fail inside float() with a message that did not say which argument was wrong)."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (diffusers' rescale_zero_terminal_snr), in float64."""
    q = np.sqrt(np.cumprod(1.0 - betas))
    q0, qT = q[0], q[-1]
    abar = ((q - qT) * (q0 / (q0 - qT))) ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def _as_float64_vector(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an array of real numbers ({exc})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or Inf)")
    return arr
