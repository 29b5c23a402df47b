"""Classifier-free guidance for :meth:`fastdiff.Pipeline.sample`.

The guided model output is ``m = m_u + w (m_c - m_u)`` (``w`` = ``guidance_scale``). That combination is
linear, so it is folded into the fused step (the op takes ``m_uncond`` and ``guidance_scale``): the
loop calls the network on the conditional and unconditional inputs and hands both outputs to one
``fastdiff.fused_step``. By default the two evaluations are one call on the doubled batch
(``guidance_batching="double"``: conditional rows first, as diffusers orders them); ``"separate"``
makes two calls (half the peak activation memory). ``guidance_rescale`` is diffusers'
``rescale_noise_cfg`` (Lin et al. 2023, section 3.4); it needs per-sample standard deviations, which
are not linear in m, so when it is non-zero the guided output is formed in torch before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

GUIDANCE_BATCHING = ("double", "separate")


@dataclass(frozen=True)
class Guidance:
    """Validated classifier-free guidance settings (see :func:`make_guidance`)."""

    scale: float
    rescale: float
    batching: str
    row_weights: torch.Tensor | None = field(default=None, compare=False)  # [B] float32: a graph's static buffer

    def key(self) -> tuple:
        """What a captured CUDA graph depends on: not the scale, which a graph reads from a static buffer of one
        weight per row (:meth:`weights`), so one graph serves every scale."""
        return (self.rescale, self.batching)

    def weights(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """The scale once per row, [batch] float32: what a replay copies into the graph's guidance buffer."""
        return torch.full((batch,), self.scale, dtype=torch.float32, device=device)

    def on_rows(self, row_weights: torch.Tensor) -> Guidance:
        """These settings with the scale read per row from ``row_weights`` (the fused step's ``row_guidance``)."""
        return replace(self, row_weights=row_weights)


def make_guidance(
    guidance_scale: float, guidance_rescale: float, guidance_batching: str, uncond_kwargs: Mapping[str, Any] | None
) -> Guidance | None:
    """Checks the guidance arguments; returns None when guidance is off.

    Guidance is off when ``guidance_scale == 1`` (``m = m_c`` exactly) and no ``uncond_kwargs`` are
    given; then the network is called once per stage on the conditional inputs only.
    """
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if guidance_batching not in GUIDANCE_BATCHING:
        raise ValueError(f"guidance_batching must be one of {GUIDANCE_BATCHING}, got {guidance_batching!r}")
    if uncond_kwargs is not None and not isinstance(uncond_kwargs, Mapping):
        raise TypeError(f"uncond_kwargs must be a mapping of keyword arguments, got {type(uncond_kwargs).__name__}")
    if float(guidance_scale) == 1.0 and uncond_kwargs is None:
        if guidance_rescale != 0.0:
            raise ValueError("guidance_rescale needs classifier-free guidance (guidance_scale != 1)")
        return None
    return Guidance(float(guidance_scale), float(guidance_rescale), guidance_batching)


def check_double_batch(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``cond`` and ``uncond`` can be stacked into one doubled-batch call.

    Both must name the same arguments; per-sample tensors must agree in trailing shape and dtype, and any
    other value (a scalar tensor, a number, a string) must be the same object or equal in both.
    """
    if set(cond) != set(uncond):
        raise ValueError(
            "guidance_batching='double' needs model_kwargs and uncond_kwargs with the same names "
            f"(got {sorted(cond)} and {sorted(uncond)}); pass guidance_batching='separate' to call "
            "the model twice"
        )
    for name, c in cond.items():
        u = uncond[name]
        if _is_batched(c) or _is_batched(u):
            if not (_is_batched(c) and _is_batched(u)) or c.shape[1:] != u.shape[1:] or c.dtype != u.dtype:
                raise ValueError(
                    f"model_kwargs[{name!r}] and uncond_kwargs[{name!r}] cannot be stacked into one "
                    f"batch ({_describe(c)} vs {_describe(u)}); use guidance_batching='separate'"
                )
        elif c is not u and not _equal(c, u):
            raise ValueError(
                f"model_kwargs[{name!r}] and uncond_kwargs[{name!r}] differ and are not per-sample "
                "tensors, so one doubled-batch call cannot hold both; use guidance_batching='separate'"
            )


def per_sample(weight: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    """A guidance weight that multiplies a batch of ``ndim`` dimensions: one number as it is, one per sample ([B]: a
    captured graph's buffer) as [B, 1, ..., 1]."""
    return weight if isinstance(weight, float) else weight.view(-1, *([1] * (ndim - 1)))


def guided_outputs(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    guidance: Guidance,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's conditional and unconditional outputs ``(m_c, m_u)`` at state ``x``, time ``t``."""
    if guidance.batching == "separate":
        return model(x, t, **cond), model(x, t, **uncond)
    both = {name: torch.cat([c, uncond[name]]) if _is_batched(c) else c for name, c in cond.items()}
    out = model(torch.cat([x, x]), torch.cat([t, t]), **both)
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 2 * x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model returned {shape} for a doubled batch of {2 * x.shape[0]}")
    m_c, m_u = out.chunk(2)
    return m_c, m_u


def rescale_noise_cfg(
    noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg``: blend the guided output with it rescaled to the conditional's std.

    ``std`` is per sample over all non-batch dimensions (unbiased, as torch.std). Computed in float32.
    """
    dims = list(range(1, noise_pred_text.ndim))
    text = noise_pred_text.float()
    cfg = noise_cfg.float()
    rescaled = cfg * (text.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * cfg


def _is_batched(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim > 0


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)} {v.dtype}"
    return type(v).__name__


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b.to(a.device)))
        )
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an object without a usable __eq__ counts as different)
        return False
