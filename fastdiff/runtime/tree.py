"""Tensors inside model kwargs: plain values, or lists, tuples (named ones too) and dicts nesting tensors.

:func:`map_tensors` rebuilds such a value with every tensor replaced (moved to a device, or swapped for a
graph's static buffer), :func:`tensor_leaves` names every tensor by its path (``y``, ``ctx[0]``, ``ctx['a']``) and
:func:`describe` gives the hashable structure a CUDA graph's cache key holds: tensors by shape, dtype and device,
containers by their type and items, anything else by value (a TypeError where it is not hashable).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

TensorFn = Callable[[str, torch.Tensor], torch.Tensor]


def map_tensors(value: Any, fn: TensorFn, path: str = "") -> Any:
    """``value`` with each tensor ``t`` at ``path`` replaced by ``fn(path, t)``; containers are rebuilt (same type),
    other values returned as they are."""
    if isinstance(value, torch.Tensor):
        return fn(path, value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        items = [map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def tensor_leaves(value: Any, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in ``value`` by its path (the paths :func:`map_tensors` passes)."""
    leaves: dict[str, torch.Tensor] = {}

    def keep(p: str, t: torch.Tensor) -> torch.Tensor:
        leaves[p] = t
        return t

    map_tensors(value, keep, path)
    return leaves


def describe(value: Any) -> Hashable:
    """The hashable structure of ``value``: what a captured graph depends on (tensor values are not part of it).

    Raises TypeError for a value that is neither a tensor, a list/tuple/dict of describable values nor hashable.
    """
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, dict):
        return ("dict", tuple((k, describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(describe(v) for v in value))
    hash(value)  # a TypeError for an unhashable value
    return ("value", type(value), value)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor on ``device``; tensors already there are returned as they are.

    A copy from pageable host memory to CUDA is non-blocking (CUDA stages the source before the call returns, so
    the caller may reuse it at once); other copies (from pinned memory, which the caller could overwrite while an
    asynchronous copy still reads it, or to the host) block.
    """
    device = torch.device(device)

    def move(_: str, t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        pageable_upload = device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned()
        return t.to(device, non_blocking=pageable_upload)

    return map_tensors(value, move)
