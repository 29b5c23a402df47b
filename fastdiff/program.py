"""A sampler's coefficient program, built in C++ in float64 and placed on the device once."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fastdiff._ext import C
from fastdiff.kernels.reference import BLEND_A, BLEND_COLS, BLEND_S, BLEND_W, CM, CX, CX0, CZ, DM, DX, DX0, EM, EX
from fastdiff.schedule import Grid, Schedule


@dataclass
class Program:
    """Stage rows (``coef`` [stages, 12] float64, columns as fastdiff/kernels/reference.py), slot/step metadata and
    model times of one sampler run; ``blend``, where set, replaces :func:`blend_table`'s inpainting rows.

    ``coef_device`` is the same table on the device the kernel reads; ``model_time`` [stages] is what
    the network is fed at each stage; ``meta`` [stages, 6] holds the history slots each stage reads
    and writes, the sampler step it belongs to and whether it calls the network.
    """

    sampler: str
    grid: Grid
    coef: np.ndarray
    meta: np.ndarray
    t: np.ndarray
    model_time: np.ndarray
    slots: int
    coef_device: torch.Tensor
    blend: np.ndarray | None = None
    _times: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _blend: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    def model_times(self, batch: int) -> torch.Tensor:
        """``model_time`` as a [stages, batch] float32 tensor on the program's device (made once per batch size;
        read-only)."""
        times = self._times.get(batch)
        if times is None:
            per_stage = torch.as_tensor(self.model_time, dtype=torch.float32).to(self.coef_device.device)
            times = self._times[batch] = per_stage[:, None].expand(-1, batch).contiguous()
        return times

    def blend_device(self) -> torch.Tensor:
        """:func:`blend_table` on the program's device (made once; read-only): what inpainting's fused steps read."""
        if not self._blend:
            self._blend.append(torch.as_tensor(blend_table(self), dtype=torch.float64).to(self.coef_device.device))
        return self._blend[0]

    @property
    def stages(self) -> int:
        """Number of stages (network evaluations)."""
        return len(self.model_time)

    def reads(self, stage: int) -> list[int]:
        """History slots stage ``stage`` reads, in coefficient order."""
        return [int(s) for s in self.meta[stage, :3] if s >= 0]

    def writes(self, stage: int) -> int:
        """History slot stage ``stage`` writes, or -1."""
        return int(self.meta[stage, 3])

    def step_of(self, stage: int) -> int:
        """The sampler step stage ``stage`` belongs to."""
        return int(self.meta[stage, 4])

    def calls_model(self, stage: int) -> bool:
        """Whether the stage calls the network first (stages that do not read m as zero)."""
        return bool(self.meta[stage, 5])

    def uses_noise(self, stage: int) -> bool:
        """Whether the stage's row injects noise (c_z != 0)."""
        return bool(self.coef[stage, 5] != 0.0)


def build_program(
    schedule: Schedule, grid: Grid, sampler: str, prediction: str, device: torch.device, **options: Any
) -> Program:
    """Builds the coefficient program of ``sampler`` on ``grid`` for a network predicting ``prediction``.

    ``options`` are the sampler's named options (numbers or strings), e.g. ``eta`` or ``variance_type``.
    """
    raw = C.make_program(schedule._core, grid.t, sampler, prediction, dict(options))
    coef = raw["coef"]
    return Program(
        sampler=sampler,
        grid=grid,
        coef=coef,
        meta=raw["meta"],
        t=raw["t"],
        model_time=_grid_model_times(grid, raw["t"], raw["model_time"]),
        slots=int(raw["slots"]),
        coef_device=torch.as_tensor(coef, dtype=torch.float64).to(device),
    )


def _grid_model_times(grid: Grid, stage_t: np.ndarray, model_time: np.ndarray) -> np.ndarray:
    """Stages at a grid point are fed the grid's ``model_time`` there (a peer scheduler's own timesteps, e.g.
    diffusers' rounded timesteps on Karras sigmas); stages between grid points keep the schedule's."""
    at_point = {float(t): float(mt) for t, mt in zip(grid.t, grid.model_time)}
    return np.array([at_point.get(float(t), float(mt)) for t, mt in zip(stage_t, model_time)], dtype=np.float64)


def clip_form(coef: np.ndarray) -> np.ndarray:
    """Rewrites coefficient rows so the network output reaches x_next and h_new only through x0c.

    A row gives ``x0 = e_x x + e_m m``, so ``m = (x0 - e_x x) / e_m`` where ``e_m != 0``; substituting turns
    ``c_x x + c_m m`` into ``(c_x - c_m e_x / e_m) x + (c_m / e_m) x0`` (and likewise for ``h_new``). The
    rewritten row is the same step when x0 is left alone, and the step on the clipped x0 when the kernel
    clips it (its ``clip`` argument): what diffusers does for ``clip_sample`` and ``thresholding``, where it
    recomputes eps from the clipped x0. Rows with ``e_m == 0`` (stages that do not read the network) are
    returned unchanged. Returns a new [stages, 12] float64 array.
    """
    out = np.array(coef, dtype=np.float64, copy=True)
    rows = out[:, EM] != 0.0
    em, ex = out[rows, EM], out[rows, EX]
    for x_col, m_col, x0_col in ((CX, CM, CX0), (DX, DM, DX0)):
        per_x0 = out[rows, m_col] / em
        out[rows, x_col] -= per_x0 * ex
        out[rows, x0_col] += per_x0
        out[rows, m_col] = 0.0
    return out


def edit_start(steps: int, strength: float) -> int:
    """The step image-to-image starts at for ``strength`` on a ``steps``-step grid: where diffusers'
    ``get_timesteps`` cuts its timesteps (``init_timestep = min(int(steps * strength), steps)``, the start
    ``steps - init_timestep``). Raises ValueError when strength leaves no step to run."""
    init_timestep = min(int(steps * strength), steps)
    start = max(steps - init_timestep, 0)
    if start >= steps:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run: raise strength or steps")
    return start


def cut_grid(grid: Grid, start: int) -> Grid:
    """``grid`` from point ``start`` on (``grid.steps - start`` steps): the grid image-to-image runs."""
    if not 0 <= start < grid.steps:
        raise ValueError(f"start must be in [0, {grid.steps}), got {start}")
    return Grid(
        t=grid.t[start:],
        alpha=grid.alpha[start:],
        sigma=grid.sigma[start:],
        log_snr=grid.log_snr[start:],
        model_time=grid.model_time[start:],
    )


def blend_table(prog: Program) -> np.ndarray:
    """Inpainting's blend rows [stages, 3] (on, alpha, sigma): the last stage of each step replaces the known
    region by ``alpha init + sigma z`` at the step's end point (the program grid's next point), and the last step by
    ``init`` itself, as diffusers' inpainting loop does; the other stages (inside a multi-stage step) blend nothing."""
    if prog.blend is not None:
        return prog.blend
    out = np.zeros((prog.stages, BLEND_COLS), dtype=np.float64)
    steps = prog.grid.steps
    for k in range(prog.stages):
        step = prog.step_of(k)
        if k != prog.stages - 1 and prog.step_of(k + 1) == step:
            continue
        out[k, BLEND_W] = 1.0
        last = step == steps - 1
        out[k, BLEND_A] = 1.0 if last else float(prog.grid.alpha[step + 1])
        out[k, BLEND_S] = 0.0 if last else float(prog.grid.sigma[step + 1])
    return out


def resampled(prog: Program, jumps: int) -> Program:
    """RePaint's resampling (jump length 1) on a one-stage, history-free program: after each step the state is
    noised back to the step's start (``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2
    sigma_s^2) z``, the forward process from s to t) and the step is run again, ``jumps`` times; inpainting blends
    after every run of a step. Costs ``jumps + 1`` network evaluations per step. Raises ValueError for samplers with
    history or several stages per step."""
    if isinstance(jumps, bool) or not isinstance(jumps, (int, np.integer)) or jumps < 0:
        raise ValueError(f"jumps must be an int >= 0, got {jumps!r}")
    if jumps == 0:
        return prog
    steps = prog.grid.steps
    if prog.slots != 0 or prog.stages != steps:
        raise ValueError(
            f"jumps (RePaint resampling) needs a one-stage sampler without history (ddpm, ddim, euler_ancestral, ...);"
            f" {prog.sampler!r} has {prog.stages} stages for {steps} steps and {prog.slots} history slots"
        )
    base_blend = blend_table(prog)
    alpha, sigma = prog.grid.alpha, prog.grid.sigma
    rows = []  # (coefficient row, meta row, blend row, the step whose times the stage takes)
    for k in range(steps):
        ratio = float(alpha[k]) / float(alpha[k + 1])
        back = np.zeros(prog.coef.shape[1])
        back[CX] = ratio
        back[CZ] = float(np.sqrt(max(float(sigma[k]) ** 2 - ratio**2 * float(sigma[k + 1]) ** 2, 0.0)))
        back_meta = np.array([-1, -1, -1, -1, k, 0], dtype=prog.meta.dtype)  # no history, no network call
        for j in range(jumps + 1):
            if j:
                rows.append((back, back_meta, np.zeros(BLEND_COLS), k))
            rows.append((prog.coef[k], prog.meta[k], base_blend[k], k))
    table = np.stack([r[0] for r in rows])
    at = [r[3] for r in rows]
    return replace(
        prog,
        coef=table,
        meta=np.stack([r[1] for r in rows]),
        t=np.asarray(prog.t)[at],
        model_time=np.asarray(prog.model_time)[at],
        coef_device=torch.as_tensor(table, dtype=torch.float64).to(prog.coef_device.device),
        blend=np.stack([r[2] for r in rows]),
        _times={},
        _blend=[],
    )
