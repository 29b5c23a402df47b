"""Checks of sampling inputs and outputs shared by the pipeline, the special samplers and the serving engine,
and the error the loop raises when a state went NaN/Inf."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastdiff.program import Program

#: What the kernel's non-finite recorder holds for a sample that stayed finite.
NO_NONFINITE = torch.iinfo(torch.int32).max


class NonFiniteError(FloatingPointError):
    """The sampler state became NaN or Inf; ``step`` is the first bad step, ``samples`` the affected rows."""

    def __init__(self, step: int, samples: list[int]):
        self.step = step
        self.samples = samples
        super().__init__(
            f"the sampler state became NaN/Inf at step {step} in samples {samples} "
            "(check the model's output there, the prediction type and the schedule's ends)"
        )


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints (batch, *sample_shape), every size >= 1."""
    try:
        # operator.index, not int(): a float size (2.5) or a string ("ab") is refused, never truncated.
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (batch, ...), got {shape!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, *sample_shape) with every size >= 1, got {shape}")
    return shape


def check_noise(noise: Any, prog: Program, shape: tuple[int, ...]) -> None:
    """An explicit noise list holds a tensor shaped like the state for every stage that draws noise."""
    if noise is None:
        return
    if isinstance(noise, (str, bytes)) or not hasattr(noise, "__len__") or not hasattr(noise, "__getitem__"):
        raise TypeError(f"noise must be a sequence of tensors (one per stage) or a tensor, got {type(noise).__name__}")
    if len(noise) < prog.stages:
        raise ValueError(f"noise must hold one tensor per stage ({prog.stages}), got {len(noise)}")
    for k in range(prog.stages):
        if not isinstance(noise[k], torch.Tensor):  # every stage reads its entry (zeros where it draws none)
            raise TypeError(f"noise[{k}] must be a tensor shaped like the state, got {type(noise[k]).__name__}")
        if prog.uses_noise(k) and tuple(noise[k].shape) != shape:
            raise ValueError(f"noise[{k}] must have shape {shape}, got {tuple(noise[k].shape)}")


def as_kwargs(value: Any, what: str = "model_kwargs") -> dict:
    """Keyword arguments for the network as a new dict: None is none; anything but a mapping is a TypeError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of argument names to values, got {type(value).__name__}")
    return dict(value)


def check_class_labels(y: Any, num_classes: int, what: str = "y") -> None:
    """Class labels for a network with ``num_classes`` classes: integers in [0, num_classes] (``num_classes`` is the
    null class classifier-free guidance evaluates)."""
    labels = y if isinstance(y, torch.Tensor) else None
    if labels is None:
        try:
            labels = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be integer class labels, got {type(y).__name__}") from None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be integer class labels, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(
            f"{what} must hold labels in [0, {num_classes}] ({num_classes} is the null class), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def check_model_kwargs(kwargs: dict, batch: int, what: str = "model_kwargs") -> None:
    """Keyword names are strings and per-sample tensors have one row per sample."""
    # Tensors with a leading dimension are per-sample conditioning; 0-d tensors and other values are shared.
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be argument names (str), got {name!r}")
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != batch:
            raise ValueError(
                f"{what}[{name!r}] has batch size {value.shape[0]}, expected {batch} "
                "(per-sample tensors need one row per sample)"
            )


def check_model_accepts(model: Any, kwargs: dict, what: str = "model_kwargs") -> None:
    """Every name in ``kwargs`` is a keyword argument ``model(x, t, **kwargs)`` can take, as far as its signature
    tells (a network taking ``**kwargs``, or whose signature cannot be read, takes any name). A ValueError names
    the first name it cannot take, so a request fails at submission rather than in a batch."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    for name in kwargs:
        try:
            signature.bind_partial(None, None, **{name: None})
        except TypeError:
            takes = list(signature.parameters)[2:]
            raise ValueError(
                f"{what}[{name!r}]: the network takes no argument {name!r} (it takes {takes or 'none'})"
            ) from None


def check_callback(callback: Any, callback_steps: Any) -> None:
    """A callable (or None) callback and an int >= 1 ``callback_steps``."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, x, x0_hat), got {type(callback).__name__}")
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps < 1:
        raise ValueError(f"callback_steps must be an int >= 1, got {callback_steps!r}")


def check_model_output(m: Any, x: torch.Tensor, stage: int) -> None:
    """The network returned a floating tensor shaped like the state, on its device."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(m).__name__} at stage {stage}")
    if m.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(m.shape)} at stage {stage}; expected {tuple(x.shape)}")
    if not m.is_floating_point():
        raise TypeError(f"the model returned dtype {m.dtype} at stage {stage}; expected a floating dtype")
    if m.device != x.device:
        raise ValueError(f"the model returned a tensor on {m.device}; the state is on {x.device}")


def raise_if_nonfinite(nonfinite: torch.Tensor, prog: Program) -> None:
    """Raises :class:`NonFiniteError` when the kernel recorded a NaN/Inf state (one host sync)."""
    first = int(nonfinite.min())  # the loop's only host sync
    if first != NO_NONFINITE:
        samples = torch.nonzero(nonfinite != NO_NONFINITE).flatten().tolist()
        raise NonFiniteError(prog.step_of(first), samples)
