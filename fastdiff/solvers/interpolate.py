"""Spherical interpolation of latent codes, and the recipe for interpolating between two data points.

Codes ``x_T`` of a diffusion model live near the sphere of radius ``prior_std * sqrt(D)`` (a
high-dimensional Gaussian's mass sits in a thin shell), so straight-line mixing ``(1-a) x_a + a x_b``
drags the midpoint inside the shell (for independent codes its norm shrinks by about ``1/sqrt(2)``)
to where the decoder has never seen a code, and the decoded midpoint comes out blurred or washed out.
Spherical interpolation (slerp) walks along the great circle instead and keeps the norm of equal-norm
endpoints.

Recipe: interpolating between two data points through their codes::

    import torch, fastdiff
    from fastdiff.solvers.interpolate import interpolate

    pipe = fastdiff.Pipeline(model, schedule, prediction="eps")
    x_a, x_b = data[0:1], data[1:2]                       # two points, [1, *shape] each
    codes = pipe.encode(torch.cat([x_a, x_b]), steps=100) # PF-ODE forward: x0 -> x_T (DDIM inversion)
    alphas = torch.linspace(0, 1, 9)
    path = interpolate(codes[0:1], codes[1:2], alphas)    # [9, 1, *shape]
    frames = pipe.sample((9, *x_a.shape[1:]), sampler="ddim", steps=100,
                         x_T=path[:, 0])                  # decode every code

The end frames reproduce ``x_a`` and ``x_b`` up to the round-trip error of ``encode`` (about
O(1/steps) for plain DDIM inversion; use ``encode(..., fixed_point_iters=1)`` or ``sampler="rk45"``
for tighter ones), and decode with the *same* deterministic sampler, steps and spacing as the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["interpolate", "slerp"]


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, alpha: float | torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation per sample between ``x_a`` and ``x_b`` (both ``[batch, ...]``) at ``alpha``.

    For each sample, with ``theta`` the angle between the flattened vectors,
    ``slerp = sin((1-alpha) theta)/sin(theta) * x_a + sin(alpha theta)/sin(theta) * x_b``. Between
    endpoints of equal norm the norm stays exactly that; between unequal norms it is not monotone (at
    wide angles it can dip below the smaller one). Where the vectors are
    (nearly) parallel (``sin(theta) < eps``, including a zero vector) it falls back to linear
    interpolation, which is the limit of slerp there. ``alpha`` is a float or a ``[batch]`` tensor;
    computed in float64 and returned in ``x_a``'s dtype.
    """
    a = x_a.reshape(x_a.shape[0], -1).to(torch.float64)
    b = x_b.reshape(x_b.shape[0], -1).to(torch.float64)
    t = torch.as_tensor(alpha, dtype=torch.float64, device=a.device).reshape(-1, 1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    cos = ((a * b).sum(dim=1, keepdim=True) / (na * nb).clamp_min(1e-300)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    parallel = (sin < eps) | (na == 0) | (nb == 0)
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w_a = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * theta) / safe_sin)
    w_b = torch.where(parallel, t, torch.sin(t * theta) / safe_sin)
    return (w_a * a + w_b * b).reshape(x_a.shape).to(x_a.dtype)


def interpolate(xT_a: torch.Tensor, xT_b: torch.Tensor, alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two batches of codes at every ``alpha``: ``[len(alphas), *shape]``.

    Args:
        xT_a, xT_b: codes of the same shape ``[batch, ...]`` (for example from ``pipe.encode``).
        alphas: interpolation weights (a sequence or 1-D tensor); 0 gives ``xT_a``, 1 gives ``xT_b``
            exactly. Values outside [0, 1] extrapolate along the great circle.

    Returns:
        ``out[k] = slerp(xT_a, xT_b, alphas[k])`` per sample, shaped ``[len(alphas), batch, ...]``, in
        ``xT_a``'s dtype. Vectors that are (anti)parallel or zero fall back to linear interpolation
        (slerp between exactly opposite vectors has no unique great circle). See the module docstring
        for the recipe between two data points.

    Raises:
        TypeError: non-tensor codes.
        ValueError: codes of different shapes, without a batch dimension, or non-floating; ``alphas``
            not 1-D, empty or non-finite.
    """
    for name, x in (("xT_a", xT_a), ("xT_b", xT_b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of shape [batch, ...], got {tuple(x.shape)} {x.dtype}")
    if xT_a.shape != xT_b.shape:
        raise ValueError(f"xT_a and xT_b must have the same shape, got {tuple(xT_a.shape)} and {tuple(xT_b.shape)}")
    al = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu()
    if al.ndim != 1 or al.numel() == 0 or not bool(torch.isfinite(al).all()):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of finite floats, got {alphas!r}")
    xb = xT_b.to(xT_a.device)
    out = [slerp(xT_a, xb, float(a)) for a in al]
    out = torch.stack(out)
    # exact endpoints, free of the float64 round trip
    for k, a in enumerate(al.tolist()):
        if a == 0.0:
            out[k] = xT_a
        elif a == 1.0:
            out[k] = xb.to(xT_a.dtype)
    return out
