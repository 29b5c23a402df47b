"""Exact likelihoods through the probability-flow ODE (latent codes: :mod:`fastdiff.solvers.inversion`, whose
``encode``/``decode`` are re-exported here).

The probability-flow (PF) ODE of the forward SDE ``dx = f(t) x dt + g(t) dW`` is

    dx/dt = F(x, t) = f(t) x - g(t)^2 / 2 * score(x, t),

and it carries the noised marginals ``p_t`` into each other exactly. Along one of its trajectories the
log-density obeys ``d log p_t(x_t)/dt = -div_x F(x_t, t)``, so for a point ``x`` at ``t_min``

    log p_{t_min}(x) = log p_{t_max}(x_{t_max}) + int_{t_min}^{t_max} div_x F(x_t, t) dt.

:func:`log_likelihood` integrates the pair ``(x_t, int div F)`` from ``t_min`` to ``t_max`` with the
adaptive Dormand–Prince solver of :mod:`fastdiff.solvers.ode`, the divergence exactly (one Jacobian–vector
product per dimension) or by Hutchinson's estimator (``E[z^T (dF/dx) z]``, with fixed seeded probes),
and adds the prior's log-density at ``t_max``.

**What is computed, exactly.** ``x0`` is taken as the state at ``t = schedule.t_min``, where sigma is
small but positive (the score is undefined at sigma = 0), so the result is ``log p_{t_min}(x0)``: the
log-density of ``alpha(t_min) X0 + sigma(t_min) eps``, a slightly noised (and, for VP, slightly
shrunk) version of the data, not of the data itself. With a perfect network this is what the ODE
returns up to solver error; ``GaussianMixture.log_prob_noised(x0, alpha(t_min), sigma(t_min))`` is the
analytic value.

**The prior approximation.** The exact marginal at ``t_max`` is ``p_data`` scaled by ``alpha(t_max)``
and convolved with ``N(0, sigma(t_max)^2 I)``; it is replaced by ``N(0, prior_std^2 I)``. This is exact
for rectified flow at t = 1 (alpha = 0, sigma = 1). For VP, ``alpha(t_max)`` is small but not 0
(score-SDE's linear VP: alpha(1) = 0.0066, sigma(1) = 0.99998): for data with mean ``m`` and
covariance ``C`` the error in ``log p`` is about ``alpha_T * <m, x_T> + alpha_T^2 (...)``, that is of
order ``alpha(t_max) * |x_T| * |m|`` per sample (for the 2-D test mixture ~1e-3 nats or less). For VE and
EDM the prior is ``N(0, sigma_max^2 I)`` while the marginal is ``p_data * N(0, sigma_max^2 I)``: the
error is of order ``|x_T| |x0| / sigma_max^2``.

Every function here takes a :class:`fastdiff.pipeline.Pipeline` (its ``model``, ``schedule``,
``prediction``, ``device`` and ``dtype``); ``Pipeline.log_likelihood`` and ``Pipeline.encode`` delegate
here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from fastdiff.runtime.checks import as_kwargs
from fastdiff.runtime.pipeline_like import PipelineLike
from fastdiff.schedule import Schedule
from fastdiff.solvers.arguments import (
    check_batch_kwargs,
    check_pipe,
    check_positive_int,
    check_state,
    check_tolerances,
    first_call_names_x0,
    integration_dtype,
)
from fastdiff.solvers.drift import SCORE_PREDICTIONS, PFODEDrift, pf_ode_drift
from fastdiff.solvers.inversion import decode, encode, encode_samplers
from fastdiff.solvers.ode import Tolerances, solve_ivp_rk45

__all__ = [
    "METHODS",
    "PROBES",
    "AUTODIFF",
    "SCORE_PREDICTIONS",
    "PFODEDrift",
    "LikelihoodInfo",
    "LikelihoodSolver",
    "pf_ode_drift",
    "log_likelihood",
    "encode",
    "decode",
    "encode_samplers",
    "prior_log_prob",
]

METHODS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
AUTODIFF = ("reverse", "forward")
_LOG_2PI = math.log(2.0 * math.pi)


# ============================================================================ the prior
def prior_log_prob(schedule: Schedule, x: torch.Tensor) -> torch.Tensor:
    """``log N(x; 0, prior_std^2 I)`` per sample (``[batch]``, x's dtype): the PF-ODE's prior at ``t_max``.

    See the module docstring for how far it is from the exact marginal at ``t_max``.
    """
    std = float(schedule.prior_std)
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    return -0.5 * flat.square().sum(1) / std**2 - 0.5 * d * (_LOG_2PI + 2.0 * math.log(std))


# ============================================================================ probes and divergence
def _sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index``'s probes, a function of (seed, index) only."""
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _hutchinson_probes(
    first_index: int,
    count: int,
    sample_shape: tuple[int, ...],
    n_probes: int,
    probe: str,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``[n_probes, count, *sample_shape]`` probes; sample i's depend on (seed, i) alone, not on the chunk."""
    numel = int(np.prod(sample_shape)) if sample_shape else 1
    out = torch.empty((count, n_probes, numel), dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for j in range(count):
        gen.manual_seed(_sample_seed(seed, first_index + j))
        if probe == "gaussian":
            out[j] = torch.randn((n_probes, numel), generator=gen, dtype=torch.float64)
        else:
            out[j] = torch.randint(0, 2, (n_probes, numel), generator=gen).to(torch.float64) * 2.0 - 1.0
    return out.transpose(0, 1).reshape(n_probes, count, *sample_shape).to(device=device, dtype=dtype).contiguous()


def _repeat_kwargs(kwargs: Mapping[str, Any], reps: int, batch: int) -> dict:
    """Tensors with a leading batch dimension are tiled ``reps`` times along it (probe copies)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch and reps > 1:
            out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))
        else:
            out[k] = v
    return out


class _DivergenceODE:
    """Right-hand side of the joint ODE ``(x, L)``: ``dx/dt = F``, ``dL/dt = div F`` (exact or Hutchinson)."""

    def __init__(
        self,
        drift: PFODEDrift,
        method: str,
        n_probes: int,
        probes: torch.Tensor | None,
        group: int,
        autodiff: str,
        model_kwargs: Mapping[str, Any],
    ):
        self.drift = drift
        self.method = method
        self.n_probes = n_probes
        self.probes = probes  # [P, B, ...] for Hutchinson, None for exact
        self.group = group  # probe copies per model call
        self.autodiff = autodiff
        self.model_kwargs = dict(model_kwargs)
        self.model_calls = 0

    def _probe_groups(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        batch, d = x.shape[0], x[0].numel()
        total = d if self.method == "exact" else self.n_probes
        for p0 in range(0, total, self.group):
            p1 = min(total, p0 + self.group)
            if self.method == "exact":
                v = torch.zeros((p1 - p0, batch, d), dtype=x.dtype, device=x.device)
                idx = torch.arange(p0, p1, device=x.device)
                v[torch.arange(p1 - p0, device=x.device), :, idx] = 1.0
                yield v.reshape(p1 - p0, *x.shape)
            else:
                yield self.probes[p0:p1]

    def __call__(self, t: float, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = state[0]
        batch, d = x.shape[0], x[0].numel()
        a_coef, b_coef = self.drift.coefficients(t)
        m0 = None
        quad = torch.zeros(batch, dtype=x.dtype, device=x.device)  # sum_p v_p^T (dm/dx) v_p
        for v in self._probe_groups(x):
            g = v.shape[0]
            xr = x.detach().unsqueeze(0).expand(g, *x.shape).reshape(g * batch, *x.shape[1:])
            vr = v.reshape(g * batch, *x.shape[1:])
            kwargs = _repeat_kwargs(self.model_kwargs, g, batch)
            if self.autodiff == "forward":
                with fwAD.dual_level():
                    out = self.drift.model_output(fwAD.make_dual(xr, vr), t, **kwargs)
                    m, jv = fwAD.unpack_dual(out)
                if jv is None:  # the output does not depend on x
                    jv = torch.zeros_like(m)
            else:
                with torch.enable_grad():
                    xr = xr.clone().requires_grad_(True)
                    m = self.drift.model_output(xr, t, **kwargs)
                    if m.requires_grad:  # v^T dm/dx: the same quadratic form as (dm/dx) v
                        (jv,) = torch.autograd.grad(m, xr, grad_outputs=vr, allow_unused=True)
                    else:
                        jv = None
                if jv is None:  # the output does not depend on x
                    jv = torch.zeros_like(m)
            self.model_calls += 1
            quad = quad + (jv.detach() * vr).reshape(g, batch, -1).sum(dim=(0, 2))
            if m0 is None:
                m0 = m.detach().reshape(g, *x.shape)[0]
        if self.method == "hutchinson":
            quad = quad / self.n_probes
        # div F = A * D + B * div m; the A-term is exact for both methods (it lowers the variance).
        return a_coef * x + b_coef * m0, a_coef * d + b_coef * quad


# ============================================================================ log-likelihood
@dataclass
class LikelihoodInfo:
    """Diagnostics of :func:`log_likelihood` (with ``return_info=True``).

    Attributes:
        x_T: the PF-ODE's end point at ``t_max`` for every sample (the latent code).
        prior_log_prob: ``log N(x_T; 0, prior_std^2 I)`` per sample (nats).
        delta_log_prob: ``int_{t_min}^{t_max} div F dt`` per sample (nats).
        nfe: right-hand-side evaluations of the ODE solver, summed over chunks.
        model_calls: network calls (each on up to ``batch_size`` rows), summed over chunks.
        steps, rejected: accepted and rejected solver steps, summed over chunks.
    """

    x_T: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: int
    model_calls: int
    steps: int
    rejected: int


@dataclass(frozen=True)
class LikelihoodSolver(Tolerances):
    """How :func:`log_likelihood` solves the joint ODE: settings that change its cost and its solver error, not what
    it computes.

    Attributes:
        rtol, atol: RK45's tolerances (finite, > 0), as :class:`~fastdiff.solvers.ode.Tolerances`.
        max_steps: RK45's step limit per chunk of samples.
        autodiff: how the Jacobian–vector products are taken: ``"reverse"`` (``torch.autograd.grad``: works for any
            differentiable model) or ``"forward"`` (``torch.autograd.forward_ad`` dual tensors: no stored graph;
            needs forward-mode AD support in every op of the model).
    """

    autodiff: str = "reverse"


def log_likelihood(
    pipe: PipelineLike,
    x0: torch.Tensor,
    method: str = "exact",
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    bits_per_dim: bool = False,
    batch_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    return_info: bool = False,
    solver: LikelihoodSolver = LikelihoodSolver(),
) -> torch.Tensor | tuple[torch.Tensor, LikelihoodInfo]:
    """Per-sample ``log p_{t_min}(x0)`` (nats, or bits/dim) through the probability-flow ODE.

    Integrates ``(x_t, int div F dt)`` from ``schedule.t_min`` to ``schedule.t_max`` with adaptive RK45
    (:func:`fastdiff.solvers.ode.solve_ivp_rk45`, per-sample error norm) and adds ``log N(x_T; 0, prior_std^2 I)``.
    See the module docstring for what exactly is computed and the prior approximation.

    Args:
        pipe: the :class:`~fastdiff.pipeline.Pipeline` (network, continuous schedule, prediction, device).
        x0: ``[batch, *sample_shape]`` points, taken as states at ``t_min``.
        method: ``"exact"`` (trace from ``D`` Jacobian–vector products per evaluation, ``D`` the sample's
            number of elements: for small D) or ``"hutchinson"`` (``n_probes`` fixed probes per sample,
            an unbiased estimate of the log-likelihood).
        n_probes: Hutchinson probes per sample (>= 1); the estimate averages them.
        probe: ``"rademacher"`` (+-1, lowest variance) or ``"gaussian"``. Sample i's probes depend only on
            ``(seed, i)``, not on the batch or ``batch_size``.
        seed: the probes' seed (Hutchinson).
        dtype: ``torch.float64`` integrates (and feeds the model) in float64; default float32.
        bits_per_dim: return ``-log p / (D ln 2)`` instead of nats: the continuous density's bits/dim in
            x0's own units. For 8-bit images uniformly dequantized and scaled to [-1, 1] the discrete figure
            adds 7 bits (log2 128: 256 levels of width 2/256), as score-SDE does; 8 for [0, 1] data.
        batch_size: the most rows one network call sees (samples times probe copies: ``D`` per sample
            for exact, ``n_probes`` for Hutchinson); bounds memory for large shapes. Samples are solved in
            chunks of ``max(1, batch_size // copies)``; when one sample's copies exceed it, its probes are
            evaluated in groups of ``batch_size``. Default: everything in one call.
        model_kwargs: keyword arguments for every model call; tensors with a leading batch dimension are
            chunked and tiled with the samples.
        return_info: also return a :class:`LikelihoodInfo`.
        solver: a :class:`LikelihoodSolver`: RK45's ``rtol``, ``atol`` (1e-5 each) and ``max_steps`` (10 000 per
            chunk), and ``autodiff`` (``"reverse"``).

    Returns:
        ``[batch]`` log-likelihoods (nats, or bits/dim) in the integration dtype on the pipeline's device
        (and a :class:`LikelihoodInfo` when ``return_info``).

    Raises:
        TypeError: ``x0`` not a tensor, ``solver`` not a :class:`LikelihoodSolver`.
        ValueError: naming the argument: bad ``x0`` (shape, dtype, non-finite, or a shape the model
            rejects), ``method``, ``probe``, ``n_probes < 1``, tolerances, ``dtype``, ``batch_size``,
            ``autodiff``; a discrete schedule (no PF-ODE); a prediction without a score.
    """
    check_pipe(pipe)
    check_state(x0)
    _check_likelihood_options(method, probe, n_probes, batch_size, seed, solver)
    dtype = integration_dtype(pipe, dtype)
    kwargs = as_kwargs(model_kwargs)
    check_batch_kwargs(kwargs, x0.shape[0])
    drift = first_call_names_x0(PFODEDrift(pipe.model, pipe.schedule, pipe.prediction), tuple(x0.shape))
    n, d = x0.shape[0], x0[0].numel()
    copies = d if method == "exact" else int(n_probes)
    chunk, group = _chunk_sizes(n, copies, batch_size)
    chunks = _ChunkSolver(drift, pipe.schedule, method, int(n_probes), probe, int(seed), group, solver)
    x_all = x0.detach().to(device=pipe.device, dtype=dtype)
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        parts.append(chunks.solve(x_all[start:stop].contiguous(), start, _batch_rows(kwargs, start, stop)))
    info = _concatenate(parts)
    logp = info.prior_log_prob + info.delta_log_prob
    if bits_per_dim:
        logp = -logp / (d * math.log(2.0))
    return (logp, info) if return_info else logp


def _check_likelihood_options(
    method: str, probe: str, n_probes: int, batch_size: int | None, seed: int, solver: LikelihoodSolver
) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if not isinstance(solver, LikelihoodSolver):
        raise TypeError(f"solver must be a fastdiff.solvers.likelihood.LikelihoodSolver, got {type(solver).__name__}")
    if solver.autodiff not in AUTODIFF:
        raise ValueError(f"autodiff must be one of {AUTODIFF}, got {solver.autodiff!r}")
    check_positive_int("n_probes", n_probes)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_tolerances(solver)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _chunk_sizes(n: int, copies: int, batch_size: int | None) -> tuple[int, int]:
    """(samples per solve, probe copies per model call) so that one model call sees at most ``batch_size`` rows."""
    rows = n * copies if batch_size is None else int(batch_size)
    return max(1, rows // copies), min(copies, rows)


def _batch_rows(kwargs: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """The model kwargs of samples ``start:stop``: tensors with a batch dimension sliced, the rest as they are."""
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in kwargs.items()}


@dataclass(frozen=True)
class _ChunkSolver:
    """Solves the joint ODE ``(x, int div F)`` for one chunk of samples at a time; holds what the chunks share."""

    drift: PFODEDrift
    schedule: Schedule
    method: str
    n_probes: int
    probe: str
    seed: int
    group: int  # probe copies per model call
    solver: LikelihoodSolver

    def solve(self, x: torch.Tensor, start: int, model_kwargs: Mapping[str, Any]) -> LikelihoodInfo:
        """The chunk ``x`` (samples ``start, start + 1, ...``) carried from ``t_min`` to ``t_max``."""
        count, sample_shape = x.shape[0], tuple(x.shape[1:])
        probes = None
        if self.method == "hutchinson":
            probes = _hutchinson_probes(
                start, count, sample_shape, self.n_probes, self.probe, self.seed, x.dtype, x.device
            )
        rhs = _DivergenceODE(
            self.drift, self.method, self.n_probes, probes, self.group, self.solver.autodiff, model_kwargs
        )
        acc0 = torch.zeros(count, dtype=x.dtype, device=x.device)
        sch = self.schedule
        sol = solve_ivp_rk45(rhs, sch.t_min, sch.t_max, (x, acc0), tolerances=self.solver, norm="sample")
        x_T, delta = sol.y
        return LikelihoodInfo(
            x_T=x_T,
            prior_log_prob=prior_log_prob(sch, x_T),
            delta_log_prob=delta,
            nfe=sol.nfe,
            model_calls=rhs.model_calls,
            steps=sol.steps,
            rejected=sol.rejected,
        )


def _concatenate(parts: list[LikelihoodInfo]) -> LikelihoodInfo:
    """The chunks' results as one: tensors concatenated along the batch, counts summed."""
    return LikelihoodInfo(
        x_T=torch.cat([p.x_T for p in parts]),
        prior_log_prob=torch.cat([p.prior_log_prob for p in parts]),
        delta_log_prob=torch.cat([p.delta_log_prob for p in parts]),
        nfe=sum(p.nfe for p in parts),
        model_calls=sum(p.model_calls for p in parts),
        steps=sum(p.steps for p in parts),
        rejected=sum(p.rejected for p in parts),
    )
