"""Exact models: a Gaussian mixture whose noised density, score and posterior mean are known in closed form.

Every sampler in fastdiff is tested against :class:`GaussianMixture`. Under the state convention
``x_t = alpha x0 + sigma eps`` with ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` and ``eps ~ N(0, I)``, the
noised density is again a mixture: component k becomes ``N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``
with the same weight. Everything below (density, score, E[x0 | x_t], and the eps / x0 / v / score /
flow predictions of an ideal network) follows exactly from that, computed in float64 with logsumexp.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["GaussianMixture", "GaussianMixtureModel", "PREDICTIONS"]

#: Prediction types :meth:`GaussianMixture.as_model` can produce.
PREDICTIONS = ("eps", "x0", "v", "score", "flow")

_LOG_2PI = math.log(2.0 * math.pi)
ArrayLike = Any  # torch.Tensor | np.ndarray | Sequence[float] | float


def _as_float64(name: str, value: ArrayLike) -> torch.Tensor:
    try:
        if isinstance(value, torch.Tensor):
            out = value.detach().to(device="cpu", dtype=torch.float64)
        else:
            out = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite (found NaN or Inf)")
    return out.clone()


class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances: ``p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2))``.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` (isotropic: one standard deviation per component) or ``[K, D]`` (diagonal)
            standard deviations, all > 0.
        weights: ``[K]`` positive mixture weights; normalised to sum to 1.

    Raises:
        ValueError: naming the argument, for wrong shapes, non-finite or non-positive values.

    The noised marginal at ``x_t = alpha x0 + sigma eps`` is the mixture with means ``alpha mu_k`` and
    variances ``alpha^2 s_k^2 + sigma^2`` (see :meth:`log_prob_noised`), so the ideal network for any
    schedule and parameterization is available in closed form through :meth:`as_model`.
    """

    def __init__(self, means: ArrayLike, stds: ArrayLike, weights: ArrayLike):
        mu = _as_float64("means", means)
        if mu.ndim != 2 or mu.shape[0] == 0 or mu.shape[1] == 0:
            raise ValueError(f"means must have shape [K, D] with K, D >= 1, got {tuple(mu.shape)}")
        k, d = mu.shape
        s = _as_float64("stds", stds)
        if s.ndim == 1 and s.shape[0] == k:
            s = s[:, None].expand(k, d).clone()
        elif not (s.ndim == 2 and tuple(s.shape) == (k, d)):
            raise ValueError(f"stds must have shape [K] = [{k}] or [K, D] = [{k}, {d}], got {tuple(s.shape)}")
        if not (s > 0).all():
            raise ValueError("stds must be > 0 (a zero standard deviation has no density)")
        w = _as_float64("weights", weights)
        if w.ndim != 1 or w.shape[0] != k:
            raise ValueError(f"weights must have shape [K] = [{k}], got {tuple(w.shape)}")
        if not (w > 0).all():
            raise ValueError("weights must be > 0")
        self._means = mu
        self._stds = s
        self._weights = w / w.sum()
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Dimension D of one sample."""
        return int(self._means.shape[1])

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return int(self._means.shape[0])

    @property
    def means(self) -> torch.Tensor:
        """``[K, D]`` component means (float64, a copy)."""
        return self._means.clone()

    @property
    def stds(self) -> torch.Tensor:
        """``[K, D]`` per-coordinate component standard deviations (float64, a copy)."""
        return self._stds.clone()

    @property
    def weights(self) -> torch.Tensor:
        """``[K]`` normalised mixture weights (float64, a copy)."""
        return self._weights.clone()

    def __repr__(self) -> str:
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim})"

    # ---------------------------------------------------------------- moments and samples
    def mean(self) -> torch.Tensor:
        """Exact mean ``sum_k w_k mu_k`` as a float64 ``[D]`` tensor."""
        return self._weights @ self._means

    def covariance(self) -> torch.Tensor:
        """Exact covariance ``sum_k w_k (diag(s_k^2) + mu_k mu_k^T) - m m^T`` as a float64 ``[D, D]`` tensor."""
        m = self.mean()
        second = torch.diag(self._weights @ self._stds.square())
        second = second + (self._means * self._weights[:, None]).T @ self._means
        cov = second - torch.outer(m, m)
        return 0.5 * (cov + cov.T)

    def sample(
        self,
        n: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        return_components: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` exact samples, ``[n, D]``, deterministically from ``seed``.

        Component labels and the Gaussian noise come from a CPU ``torch.Generator`` seeded with
        ``seed`` and are combined in float64, so the result does not depend on ``device``. With
        ``return_components=True`` also returns the ``[n]`` int64 component index of each sample.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        n = int(n)
        if n == 0:
            comp = torch.zeros(0, dtype=torch.long)
        else:
            comp = torch.multinomial(self._weights, n, replacement=True, generator=gen)
        z = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        x = self._means[comp] + self._stds[comp] * z
        x = x.to(dtype=dtype, device=device)
        return (x, comp.to(device=device)) if return_components else x

    def conditional(self, known: ArrayLike, values: ArrayLike) -> GaussianMixture:
        """The exact distribution of the unknown coordinates given ``x[known] = values``: what inpainting should
        sample.

        With diagonal components, component k's unknown coordinates are independent of its known ones, so the
        conditional is the mixture of the components' unknown parts, reweighted by how well each explains the known
        values: ``w_k' ~ w_k N(values; mu_k[known], diag(s_k[known]^2))``. ``known`` is a [D] bool mask (True =
        known, at least one and not all), ``values`` the [number known] known coordinates.
        """
        mask = torch.as_tensor(known, dtype=torch.bool)
        if mask.shape != (self.dim,) or not bool(mask.any()) or bool(mask.all()):
            raise ValueError(f"known must be a [{self.dim}] bool mask with some but not all True, got {known!r}")
        v = _as_float64("values", values).reshape(-1)
        if v.shape[0] != int(mask.sum()):
            raise ValueError(f"values must hold the {int(mask.sum())} known coordinates, got {v.shape[0]}")
        mu, s = self._means[:, mask], self._stds[:, mask]
        log_lik = (-0.5 * ((v - mu) / s).square() - torch.log(s) - 0.5 * _LOG_2PI).sum(dim=1)
        log_w = torch.log(self._weights) + log_lik
        weights = torch.exp(log_w - torch.logsumexp(log_w, dim=0))
        return GaussianMixture(self._means[:, ~mask], self._stds[:, ~mask], weights.clamp_min(1e-300))

    # ---------------------------------------------------------------- internals
    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (
                self._means.to(device),
                self._stds.square().to(device),
                self._weights.log().to(device),
            )
        return self._cache[device]

    def _flatten(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have shape [n, D] or [n, *shape] with prod(shape) = D = {self.dim}, got {tuple(x.shape)}"
            )
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [n, D] or [n, *shape] with prod(shape) = D = {self.dim}, got {tuple(x.shape)}"
            )
        return flat.to(torch.float64)

    @staticmethod
    def _coef(name: str, value: float | torch.Tensor | np.ndarray, n: int, device: torch.device) -> torch.Tensor:
        """alpha or sigma as float64 of shape [n, 1, 1] (per sample) or [1, 1, 1]."""
        if isinstance(value, torch.Tensor):
            c = value.detach().to(device=device, dtype=torch.float64)
        else:
            try:
                c = torch.as_tensor(np.asarray(value, dtype=np.float64), device=device)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"{name} must be a float or a tensor of shape [n], got {type(value).__name__}"
                ) from exc
        if not torch.isfinite(c).all():
            raise ValueError(f"{name} must be finite (found NaN or Inf)")
        if c.ndim == 0 or (c.ndim == 1 and c.shape[0] == 1):
            c = c.reshape(1)
        elif c.ndim != 1 or c.shape[0] != n:
            raise ValueError(f"{name} must be a float or a tensor of shape [n] = [{n}], got shape {tuple(c.shape)}")
        return c.reshape(-1, 1, 1)

    def _noised(
        self, x: torch.Tensor, alpha: Any, sigma: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component terms of the noised mixture at flat float64 x [n, D].

        Returns ``(log_joint [n, K], resid [n, K, D], alpha [., 1, 1], s2 [K, D])`` where
        ``log_joint = log w_k + log N(x; alpha mu_k, var_k)`` and ``resid = (x - alpha mu_k) / var_k``.
        """
        n = x.shape[0]
        a = self._coef("alpha", alpha, n, x.device)
        s = self._coef("sigma", sigma, n, x.device)
        if (s < 0).any():
            raise ValueError("sigma must be >= 0")
        mu, s2, logw = self._params(x.device)
        var = a.square() * s2[None] + s.square()  # [n or 1, K, D]
        if not (var > 0).all():
            raise ValueError("alpha and sigma must not both be 0 (the noised density would be degenerate)")
        diff = x[:, None, :] - a * mu[None]  # [n, K, D]
        resid = diff / var
        log_norm = -0.5 * ((diff * resid).sum(-1) + var.log().sum(-1) + self.dim * _LOG_2PI)
        return logw[None] + log_norm, resid, a, s2

    # ---------------------------------------------------------------- densities
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x0)`` for ``x`` of shape ``[n, D]`` (or ``[n, *shape]``); returns ``[n]`` in x's dtype."""
        return self.log_prob_noised(x, 1.0, 0.0)

    def log_prob_noised(
        self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor
    ) -> torch.Tensor:
        """Exact log-density of ``x_t = alpha x0 + sigma eps``, ``[n]`` in x's dtype.

        ``alpha`` and ``sigma`` are floats or ``[n]`` tensors (one value per sample).
        """
        flat = self._flatten(x)
        log_joint, _, _, _ = self._noised(flat, alpha, sigma)
        return torch.logsumexp(log_joint, dim=1).to(x.dtype)

    def responsibilities(
        self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0
    ) -> torch.Tensor:
        """Posterior component probabilities ``p(k | x_t)``, float64 ``[n, K]`` (default: of clean x0)."""
        flat = self._flatten(x)
        log_joint, _, _, _ = self._noised(flat, alpha, sigma)
        return torch.softmax(log_joint, dim=1)

    def _score_and_x0(self, flat: torch.Tensor, alpha: Any, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted residual ``R = sum_k r_k (x - alpha mu_k)/var_k`` (= -score) and E[x0 | x_t], float64."""
        log_joint, resid, a, s2 = self._noised(flat, alpha, sigma)
        r = torch.softmax(log_joint, dim=1)[..., None]  # [n, K, 1]
        mu = self._params(flat.device)[0]
        neg_score = (r * resid).sum(1)
        x0 = (r * (mu[None] + a * s2[None] * resid)).sum(1)
        return neg_score, x0

    def score_noised(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact score ``grad_x log p_t(x)`` of the noised density, x's shape and dtype."""
        neg_score, _ = self._score_and_x0(self._flatten(x), alpha, sigma)
        return (-neg_score).reshape(x.shape).to(x.dtype)

    def posterior_mean(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ``E[x0 | x_t = x]``, x's shape and dtype.

        Computed per component as ``mu_k + alpha s_k^2 (x - alpha mu_k) / var_k`` and weighted by the
        responsibilities, so it never divides by alpha and stays finite at alpha = 0 (where it equals
        the mixture mean). Where alpha > 0 it equals Tweedie's ``(x + sigma^2 score) / alpha``.
        """
        _, x0 = self._score_and_x0(self._flatten(x), alpha, sigma)
        return x0.reshape(x.shape).to(x.dtype)

    def predict(
        self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor, prediction: str = "eps"
    ) -> torch.Tensor:
        """The ideal network output for ``prediction`` in :data:`PREDICTIONS` at ``x_t = x``.

        With ``R = -score``: ``eps = sigma R`` (that is ``E[eps | x_t] = -sigma score``, which equals
        ``(x - alpha x0_hat) / sigma`` but needs no division by sigma, so sigma = 0 is fine too),
        ``x0 = E[x0 | x_t]`` in closed form (no division by alpha, so alpha = 0 is fine),
        ``v = alpha eps - sigma x0``, ``score = -R``, ``flow = eps - x0`` (dx_t/dt for rectified flow).
        ``alpha x0 + sigma eps = x`` holds exactly per component.
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        flat = self._flatten(x)
        neg_score, x0 = self._score_and_x0(flat, alpha, sigma)
        if prediction == "score":
            out = -neg_score
        elif prediction == "x0":
            out = x0
        else:
            n = flat.shape[0]
            a = self._coef("alpha", alpha, n, flat.device).reshape(-1, 1)
            s = self._coef("sigma", sigma, n, flat.device).reshape(-1, 1)
            eps = s * neg_score
            if prediction == "eps":
                out = eps
            elif prediction == "v":
                out = a * eps - s * x0
            else:  # flow
                out = eps - x0
        return out.reshape(x.shape).to(x.dtype)

    # ---------------------------------------------------------------- the ideal network
    def as_model(self, schedule: Any, prediction: str = "eps") -> GaussianMixtureModel:
        """A torch callable ``model(x, t, **kwargs)``: the exact network for ``schedule`` and ``prediction``.

        ``t`` is a float tensor ``[B]`` (or a scalar) in the schedule's model-time convention (the
        timestep index for discrete schedules, t for continuous ones, sigma for EDM, ``t * time_scale``
        for flow); it is mapped with ``schedule.t_from_model_time`` and ``schedule.alpha`` /
        ``schedule.sigma`` in float64. ``prediction`` is one of :data:`PREDICTIONS`. The output has x's
        shape and dtype; ``x`` may be ``[B, D]`` or ``[B, *shape]`` with ``prod(shape) == D``. Extra
        keyword arguments (conditioning) are accepted and ignored. The callable counts its calls in
        ``nfe`` (reset with ``reset_nfe()``).
        """
        return GaussianMixtureModel(self, schedule, prediction)


class GaussianMixtureModel:
    """The exact network of a :class:`GaussianMixture` under a schedule (see :meth:`GaussianMixture.as_model`).

    Attributes:
        gmm: the mixture.
        schedule: the :class:`fastdiff.Schedule`.
        prediction: one of :data:`PREDICTIONS`.
        nfe: number of calls so far (network function evaluations).

    It maps ``t`` to alpha and sigma on the host (through the float64 C++ schedule), so it syncs with
    the device on every call and cannot be captured in a CUDA graph.
    """

    def __init__(self, gmm: GaussianMixture, schedule: Any, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        for attr in ("alpha", "sigma", "t_from_model_time"):
            if not callable(getattr(schedule, attr, None)):
                raise TypeError(
                    f"schedule must be a fastdiff.Schedule (missing {attr}()), got {type(schedule).__name__}"
                )
        self.gmm = gmm
        self.schedule = schedule
        self.prediction = prediction
        self.nfe = 0

    def reset_nfe(self) -> None:
        """Set the call counter back to 0."""
        self.nfe = 0

    def alpha_sigma(self, t: torch.Tensor | float, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``(alpha, sigma)`` arrays of shape ``[batch]`` for model time ``t``."""
        if isinstance(t, torch.Tensor):
            mt = t.detach().to(device="cpu", dtype=torch.float64).numpy()
        else:
            mt = np.asarray(t, dtype=np.float64)
        if mt.ndim == 0 or mt.shape == (1,):
            mt = np.full(batch, float(mt.reshape(())), dtype=np.float64)
        elif mt.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [B] = [{batch}], got {tuple(mt.shape)}")
        if not np.all(np.isfinite(mt)):
            raise ValueError("t must be finite (found NaN or Inf)")
        tt = np.asarray(self.schedule.t_from_model_time(mt), dtype=np.float64)
        alpha = np.asarray(self.schedule.alpha(tt), dtype=np.float64).reshape(batch)
        sigma = np.asarray(self.schedule.sigma(tt), dtype=np.float64).reshape(batch)
        return alpha, sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **kwargs: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape [B, D] or [B, *shape], got {tuple(x.shape)}")
        self.nfe += 1
        alpha, sigma = self.alpha_sigma(t, x.shape[0])
        a = torch.as_tensor(alpha, device=x.device)
        s = torch.as_tensor(sigma, device=x.device)
        return self.gmm.predict(x, a, s, self.prediction)

    def __repr__(self) -> str:
        return f"GaussianMixtureModel({self.gmm!r}, {self.schedule!r}, prediction={self.prediction!r})"
