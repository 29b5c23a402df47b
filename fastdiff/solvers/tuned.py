"""Time grids fitted to one network: :class:`TunedGrid` (what :func:`fastdiff.solvers.tune.tune` returns, what
``fastdiff.save`` stores in a checkpoint's metadata) and :class:`TunedGrids`, the set a pipeline samples
``spacing="tuned"`` from.

A tuned grid belongs to one (sampler, steps, guidance scale) and to the weights it was fitted to: it records a
fingerprint of them (:func:`weights_fingerprint`) and is refused by weights with another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from fastdiff.schedule import Grid, Schedule


@dataclasses.dataclass(frozen=True)
class TunedGrid:
    """A time grid fitted to one network for one (sampler, steps, guidance scale).

    Attributes:
        sampler: the sampler it was fitted for (a grid is specific to its solver).
        steps: sampler steps; ``times`` has this many points, the grid's clean end (or ``t_min``) follows.
        guidance_scale: the classifier-free guidance weight it was fitted at (1: none).
        times: the schedule times of the grid, noisiest first, float64 (``Schedule.grid_from_times``).
        shifts: per grid point, the shift in log-SNR of the time fed to the network there (0: the grid's own time);
            the sampler's coefficients use ``times`` either way.
        teacher: how the reference samples were drawn (sampler, steps, spacing) and how many seeds tuned and judged.
        loss: mean squared distance to the teacher on held-out seeds, tuned (``"tuned"``) and on the sampler's
            default grid (``"default"``).
        fingerprint: :func:`weights_fingerprint` of the weights it was fitted to.
    """

    sampler: str
    steps: int
    guidance_scale: float
    times: tuple[float, ...]
    shifts: tuple[float, ...]
    teacher: Mapping[str, Any]
    loss: Mapping[str, float]
    fingerprint: str

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        times = tuple(float(v) for v in self.times)
        shifts = tuple(float(v) for v in self.shifts)
        if len(times) != self.steps or len(shifts) != self.steps:
            raise ValueError(
                f"times and shifts must have steps = {self.steps} values, got {len(times)} and {len(shifts)}"
            )
        if not all(math.isfinite(v) for v in times + shifts) or any(a <= b for a, b in zip(times, times[1:])):
            raise ValueError(f"times must be finite and strictly decreasing, got {list(times)}")
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "shifts", shifts)
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))

    @property
    def key(self) -> tuple[str, int, float]:
        """(sampler, steps, guidance scale): what a request must ask for to sample on this grid."""
        return (self.sampler, self.steps, self.guidance_scale)

    def grid(self, schedule: Schedule) -> Grid:
        """The :class:`Grid` to sample on: ``times`` plus the schedule's end, the network fed the shifted times."""
        return shifted_grid(schedule, np.asarray(self.times), np.asarray(self.shifts))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (float64 values survive JSON exactly: Python writes the shortest round trip)."""
        out = dataclasses.asdict(self)
        out["times"], out["shifts"] = list(self.times), list(self.shifts)
        out["teacher"], out["loss"] = dict(self.teacher), dict(self.loss)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunedGrid:
        """The inverse of :meth:`to_dict` (ValueError naming what is missing)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"a tuned grid needs the fields {fields}; missing {missing}")
        return cls(**{name: data[name] for name in fields})


def shifted_grid(schedule: Schedule, times: np.ndarray, shifts: np.ndarray) -> Grid:
    """``Schedule.grid_from_times(times)`` with the network at point i fed the model time whose log-SNR is the grid's
    plus ``shifts[i]`` (kept inside the schedule's times); the end point is not fed to the network and keeps its own."""
    grid = schedule.grid_from_times(times)
    if not np.any(shifts):
        return grid
    log_snr = np.asarray(schedule.log_snr(times), dtype=np.float64) + shifts
    lo, hi = schedule.log_snr(schedule.t_max), schedule.log_snr(schedule.t_min)
    fed = schedule.t_from_log_snr(np.clip(log_snr, lo, hi))
    model_time = np.array(grid.model_time, dtype=np.float64, copy=True)
    model_time[: len(times)] = schedule.model_time(fed)
    return dataclasses.replace(grid, model_time=model_time)


def weights_fingerprint(model: Any) -> str:
    """A short hash of a network's weights: its ``state_dict`` (names, dtypes, shapes and bytes), or, for a network
    that is not a ``torch.nn.Module`` (an exact mixture's score), the tensors and arrays among its attributes; a
    mapping of names to tensors (a checkpoint's) is hashed as a state dict. Changing any weight changes it; moving
    the network to another device does not."""
    digest = hashlib.sha256()
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = dict(model)
    else:
        state = _attribute_tensors(model)
    if not state:
        raise ValueError(f"{type(model).__name__} holds no weights to fingerprint")
    for name in sorted(state):
        value = state[name]
        tensor = torch.as_tensor(value).detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(torch.as_tensor(value).shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _attribute_tensors(obj: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    """Tensors and arrays in ``vars(obj)``, and in the attributes of its attributes down to ``depth`` levels (objects,
    not classes, modules or functions)."""
    found: dict[str, Any] = {}
    for name, value in sorted(getattr(obj, "__dict__", {}).items()):
        if isinstance(value, (torch.Tensor, np.ndarray)):
            found[prefix + name] = value
        elif depth > 1 and hasattr(value, "__dict__") and not isinstance(value, _NOT_HOLDERS):
            found.update(_attribute_tensors(value, f"{prefix}{name}.", depth - 1))
    return found


_NOT_HOLDERS = (type, types.ModuleType, types.FunctionType, types.MethodType)


class TunedGrids:
    """The tuned grids a pipeline holds, one per (sampler, steps, guidance scale), each checked against the
    fingerprint of the pipeline's weights when it is added."""

    def __init__(self) -> None:
        self._grids: dict[tuple[str, int, float], TunedGrid] = {}

    def add(self, tuned: TunedGrid, fingerprint: str) -> None:
        """Adds ``tuned`` (replacing one for the same settings); ValueError if it was fitted to weights other than
        those whose fingerprint is ``fingerprint``."""
        if not isinstance(tuned, TunedGrid):
            raise TypeError(f"expected a TunedGrid, got {type(tuned).__name__}")
        if tuned.fingerprint != fingerprint:
            raise ValueError(
                f"the tuned grid for {_describe(tuned.key)} was fitted to other weights (fingerprint "
                f"{tuned.fingerprint}, these weights {fingerprint}); tune it again for these weights"
            )
        self._grids[tuned.key] = tuned

    def settings(self) -> list[tuple[str, int, float]]:
        """The (sampler, steps, guidance scale) with a tuned grid, sorted."""
        return sorted(self._grids)

    def __iter__(self):
        return iter(self._grids[key] for key in self.settings())

    def __len__(self) -> int:
        return len(self._grids)

    def find(self, sampler: str, steps: int, guidance_scale: float) -> TunedGrid:
        """The tuned grid for these settings; ValueError listing the tuned settings when there is none."""
        key = (sampler, int(steps), float(guidance_scale))
        tuned = self._grids.get(key)
        if tuned is None:
            have = ", ".join(_describe(k) for k in self.settings()) or "none"
            raise ValueError(f'spacing="tuned": no tuned grid for {_describe(key)}; tuned settings: {have}')
        return tuned

    def to_json(self) -> str:
        """The grids as a JSON list (what a checkpoint's ``tuned`` metadata holds)."""
        return json.dumps([g.to_dict() for g in self])


def tuned_grids_from_json(text: str) -> list[TunedGrid]:
    """The grids of :meth:`TunedGrids.to_json` (ValueError if ``text`` is not such a list)."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"tuned grids must be a JSON list, got {type(data).__name__}")
    return [TunedGrid.from_dict(item) for item in data]


def as_tuned_list(tuned: TunedGrid | Iterable[TunedGrid] | None) -> list[TunedGrid]:
    """``tuned`` (one grid, several, or None) as a list, each checked to be a :class:`TunedGrid`."""
    if tuned is None:
        return []
    items = [tuned] if isinstance(tuned, TunedGrid) else list(tuned)
    for item in items:
        if not isinstance(item, TunedGrid):
            raise TypeError(f"tuned must hold TunedGrid objects, got {type(item).__name__}")
    return items


def _describe(key: tuple[str, int, float]) -> str:
    sampler, steps, guidance = key
    return f"({sampler}, steps={steps}, guidance_scale={guidance:g})"
