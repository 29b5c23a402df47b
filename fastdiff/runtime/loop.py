"""The sampling loop every fixed-step entry point shares: one coefficient program, run eagerly or as a CUDA graph.

A run calls the network once per stage that needs it (twice, or once on a doubled batch, with guidance) and
applies one fused step op per stage (:func:`fastdiff.runtime.step.fused_step`). Everything a stage reads is
placed before the loop (per-stage views, model times on the device), and NaN/Inf are recorded by the op and
checked once at the end, so the same code is what a CUDA graph captures (:func:`run_graph`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from fastdiff.program import Program
from fastdiff.runtime.checks import NO_NONFINITE, check_model_output, raise_if_nonfinite
from fastdiff.runtime.graphs import GraphCache, StaticBuffers, capture, device_guard
from fastdiff.runtime.guidance import Guidance, guided_outputs, per_sample, rescale_noise_cfg
from fastdiff.runtime.step import fused_step
from fastdiff.runtime.tree import map_tensors, tensor_leaves
from fastdiff.runtime.x0_clip import Bounds, X0Clip

EAGER_ONLY = object()
"""Graph-cache marker: capturing this key failed once under ``cuda_graph="auto"``, so it runs eagerly."""


@dataclass(frozen=True)
class Conditioning:
    """What every network call of a run receives: ``kwargs``, and with ``guidance`` the unconditional ``uncond``."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None
    guidance: Guidance | None = None


@dataclass(frozen=True)
class Inpaint:
    """What inpainting blends into every step: the known region (``mask`` 0; 1 = regenerate) of each step's result is
    ``init`` noised to the step's end (:func:`fastdiff.program.blend_table`). ``init`` and ``mask`` have the state's
    shape and dtype; ``noise`` (optional, the state's shape) is the known region's noise at every step instead of
    fresh Philox noise per step (diffusers adds one noise tensor at every step)."""

    init: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor | None = None


@dataclass(frozen=True)
class Recording:
    """What a run records beside the samples: every step's x0 estimate, the trajectory, a host callback
    ``callback(step, x, x0_hat)`` every ``callback_steps`` steps, a progress bar."""

    return_x0: bool = False
    return_trajectory: bool = False
    callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None
    callback_steps: int = 1
    progress: bool = False


class LoopResult(NamedTuple):
    """The samples, the x0 estimates [steps, ...] and trajectory [steps + 1, ...] when recorded, and per sample the
    first stage that went NaN/Inf (``NO_NONFINITE`` where none did)."""

    samples: torch.Tensor
    x0: torch.Tensor | None
    trajectory: torch.Tensor | None
    nonfinite: torch.Tensor


@dataclass(frozen=True)
class Loop:
    """A network, its x0 limit and what the run records: with a program, everything a run needs."""

    model: Callable[..., torch.Tensor]
    cond: Conditioning = Conditioning()
    record: Recording = Recording()
    x0_clip: X0Clip | None = None
    inpaint: Inpaint | None = None

    def network(
        self, x: torch.Tensor, t: torch.Tensor, stage: int, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
        """The network's output(s) at one stage: (m, m_uncond or None, the guidance weight the op applies: a number,
        or one per row [B] float32 in a captured graph)."""
        if cond.guidance is None:
            m = self.model(x, t, **cond.kwargs)
            check_model_output(m, x, stage)
            return m.contiguous(), None, 1.0
        guidance = cond.guidance
        m, m_u = guided_outputs(self.model, x, t, cond.kwargs, cond.uncond, guidance)
        check_model_output(m, x, stage)
        check_model_output(m_u, x, stage)
        w = guidance.scale if guidance.row_weights is None else guidance.row_weights
        if guidance.rescale != 0.0:  # not linear in m (per-sample std), so formed here rather than in the op
            guided = m_u + per_sample(w, m.ndim) * (m - m_u)
            return rescale_noise_cfg(guided, m, guidance.rescale).contiguous(), None, 1.0
        return m.contiguous(), m_u.contiguous(), w

    def stages(
        self,
        prog: Program,
        x: torch.Tensor,
        seeds: torch.Tensor,
        model_times: torch.Tensor,
        bounds: Bounds | None,
        cond: Conditioning | None = None,
        noise: Any = None,
        inpaint: Inpaint | None = None,
    ) -> LoopResult:
        """Every stage of ``prog`` from state ``x`` (read, never written); nothing here reads device values on
        the host or makes tensors from host data (a CUDA graph captures it). ``bounds`` is :meth:`clip_bounds`,
        made before the loop; ``cond`` and ``inpaint`` replace the runner's own (a graph's static buffers);
        ``noise[k]`` replaces stage k's Philox noise."""
        cond = self.cond if cond is None else cond
        inpaint = self.inpaint if inpaint is None else inpaint
        blend = None if inpaint is None else prog.blend_device()
        record = self.record
        buf = _Buffers.allocate(prog, x, record)
        times = model_times.unbind(0)
        cur = x
        for k in _stages(prog, record.progress):
            stage = buf.plan[k]
            nxt = buf.next_state(cur, stage)
            m, m_u, w = (cur, None, 1.0) if not stage.calls_model else self.network(cur, times[k], k, cond)
            x0_out = buf.x0_rows[stage.step] if buf.x0_rows is not None else buf.x0_scratch
            fused_step(
                x=cur,
                m=m,
                m_uncond=m_u,
                guidance_scale=w if isinstance(w, float) else 1.0,
                row_guidance=None if isinstance(w, float) else w,
                history=stage.reads,
                coeffs=prog.coef_device,
                stage=k,
                seeds=seeds,
                use_noise=stage.uses_noise,
                noise=None if noise is None else noise[k].to(cur),
                x_out=nxt,
                h_out=stage.writes,
                x0_out=x0_out,
                nonfinite=buf.nonfinite,
                clip=None if bounds is None else bounds(cur, m, m_u, w, prog.coef[k]),
                init=None if inpaint is None else inpaint.init,
                mask=None if inpaint is None else inpaint.mask,
                blend=blend,
                init_noise=None if inpaint is None else inpaint.noise,
            )
            cur = nxt
            if record.callback is not None and stage.last_of_step and stage.step % record.callback_steps == 0:
                record.callback(stage.step, cur, x0_out)
        return LoopResult(cur, buf.x0_all, buf.trajectory, buf.nonfinite)

    def clip_bounds(self, x: torch.Tensor) -> Bounds | None:
        """The x0 limit's per-stage bounds for state ``x`` (None without a limit); made once before the loop, as its
        constants are device tensors that must not be created inside a captured loop."""
        return None if self.x0_clip is None else self.x0_clip.bounds(x.shape[0], x.device)

    def run_eager(self, prog: Program, x: torch.Tensor, seeds: torch.Tensor, noise: Any = None) -> LoopResult:
        """The eager loop; raises :class:`~fastdiff.runtime.checks.NonFiniteError` if a sample went NaN/Inf."""
        times = prog.model_times(x.shape[0])
        result = self.stages(prog, x, seeds, times, self.clip_bounds(x), noise=noise)
        raise_if_nonfinite(result.nonfinite, prog)
        return result

    def run_graph(
        self, graphs: GraphCache, key: tuple, prog: Program, x: torch.Tensor, seeds: torch.Tensor, strict: bool
    ) -> LoopResult | None:
        """Replays (capturing on a cache miss) the whole loop as one CUDA graph; returns fresh tensors.

        When the capture fails (a model that syncs with the host or allocates pinned memory cannot be captured)
        it raises if ``strict`` (``cuda_graph=True``), else remembers the key as eager-only and returns None so
        the caller runs the eager loop (``cuda_graph="auto"``).
        """
        # One pipeline lock around get, capture, replay and copying out: a graph's static buffers are shared, so
        # its replays must not overlap. The device guard: capture and replay on the pipeline's device.
        with graphs.lock, device_guard(x.device):
            entry = graphs.get(key)
            if entry is EAGER_ONLY:
                if strict:
                    raise ValueError(
                        "cuda_graph=True: this model could not be captured in a CUDA graph earlier "
                        "(see the first error); use cuda_graph='auto' or False"
                    )
                return None
            result = self._replay(graphs, key, entry, prog, x, seeds, strict)
        if result is not None:
            raise_if_nonfinite(result.nonfinite, prog)
        return result

    def _replay(
        self,
        graphs: GraphCache,
        key: tuple,
        entry: Any,
        prog: Program,
        x: torch.Tensor,
        seeds: torch.Tensor,
        strict: bool,
    ) -> LoopResult | None:
        """Captures ``key`` if ``entry`` is None (None: the capture failed and ``strict`` is off), replays it and
        returns copies of its outputs (the caller holds ``graphs.lock``)."""
        values = self._graph_inputs(x, seeds)
        # Static buffers and graph memory are ordinary (non-inference) tensors without autograd history, so one
        # cached graph serves calls made inside and outside torch.inference_mode().
        with torch.inference_mode(False), torch.no_grad():
            if entry is None:
                try:
                    entry = self._capture(prog, x, values, graphs.pool)
                except Exception:
                    if strict:
                        raise
                    graphs.put(key, EAGER_ONLY)
                    return None
                graphs.put(key, entry)
            out = entry.replay(values)
        return LoopResult(*(None if t is None else t.clone() for t in out))

    def _graph_inputs(self, x: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a replay copies into the static buffers: the state, the seeds, the guidance weights (one per row: a
        graph serves every guidance scale) and every conditioning tensor (also inside lists, tuples and dicts),
        named by its path (``c:y``, ``u:ctx[0]``)."""
        values = {"x": x, "seeds": seeds}
        if self.cond.guidance is not None:
            values["guidance"] = self.cond.guidance.weights(x.shape[0], x.device)
        if self.inpaint is not None:  # an explicit known-region noise runs eagerly (as explicit step noise)
            values.update(init=self.inpaint.init, mask=self.inpaint.mask)
        for prefix, kwargs in (("c", self.cond.kwargs), ("u", self.cond.uncond or {})):
            for n, v in kwargs.items():
                values.update(tensor_leaves(v, f"{prefix}:{n}"))
        return values

    def _capture(self, prog: Program, x: torch.Tensor, values: dict[str, torch.Tensor], pool: Any) -> Any:
        inputs = StaticBuffers(values)
        times = prog.model_times(x.shape[0])  # made before the loop (and the capture)
        bounds = self.clip_bounds(x)  # likewise: its constants are device tensors made from host values
        blend = None if self.inpaint is None else prog.blend_device()  # likewise
        cond = self.cond

        def from_buffers(kwargs: dict[str, Any], prefix: str, buf: StaticBuffers) -> dict[str, Any]:
            return {n: map_tensors(v, lambda path, _: buf[path], f"{prefix}:{n}") for n, v in kwargs.items()}

        def loop(buf: StaticBuffers) -> tuple[torch.Tensor | None, ...]:
            static = Conditioning(
                from_buffers(cond.kwargs, "c", buf),
                None if cond.uncond is None else from_buffers(cond.uncond, "u", buf),
                None if cond.guidance is None else cond.guidance.on_rows(buf["guidance"]),
            )
            inpaint = None if self.inpaint is None else Inpaint(buf["init"], buf["mask"])
            return tuple(self.stages(prog, buf["x"], buf["seeds"], times, bounds, static, inpaint=inpaint))

        return capture(loop, inputs, keep_alive=(prog, times, bounds, blend), pool=pool)


class _Stage(NamedTuple):
    """What one stage reads and writes, looked up once before the loop rather than per step."""

    step: int
    last_of_step: bool
    calls_model: bool
    reads: list[torch.Tensor]
    writes: torch.Tensor | None
    uses_noise: bool


@dataclass
class _Buffers:
    """The loop's buffers: history slots, two scratch states, the recorded x0 and trajectory, the NaN/Inf flags."""

    plan: list[_Stage]
    scratch: list[torch.Tensor]
    x0_all: torch.Tensor | None
    x0_rows: tuple[torch.Tensor, ...] | None
    x0_scratch: torch.Tensor | None
    trajectory: torch.Tensor | None
    trajectory_rows: tuple[torch.Tensor, ...] | None
    nonfinite: torch.Tensor

    @classmethod
    def allocate(cls, prog: Program, x: torch.Tensor, record: Recording) -> _Buffers:
        steps = prog.grid.steps
        slots = [torch.empty_like(x) for _ in range(prog.slots)]
        step_of = [prog.step_of(k) for k in range(prog.stages)]
        plan = [
            _Stage(
                step_of[k],
                k == prog.stages - 1 or step_of[k + 1] != step_of[k],
                prog.calls_model(k),
                [slots[i] for i in prog.reads(k)],
                slots[prog.writes(k)] if prog.writes(k) >= 0 else None,
                prog.uses_noise(k),
            )
            for k in range(prog.stages)
        ]
        x0_all = x.new_empty((steps, *x.shape)) if record.return_x0 else None
        trajectory = x.new_empty((steps + 1, *x.shape)) if record.return_trajectory else None
        if trajectory is not None:
            trajectory[0].copy_(x)
        return cls(
            plan,
            [torch.empty_like(x), torch.empty_like(x)],
            x0_all,
            None if x0_all is None else x0_all.unbind(0),
            torch.empty_like(x) if (record.callback is not None and x0_all is None) else None,
            trajectory,
            None if trajectory is None else trajectory.unbind(0),
            torch.full((x.shape[0],), NO_NONFINITE, dtype=torch.int32, device=x.device),
        )

    def next_state(self, cur: torch.Tensor, stage: _Stage) -> torch.Tensor:
        """Where a stage writes: the trajectory's row at the end of a step, else the scratch state not read."""
        if self.trajectory_rows is not None and stage.last_of_step:
            return self.trajectory_rows[stage.step + 1]
        return self.scratch[0] if cur is not self.scratch[0] else self.scratch[1]


def _stages(prog: Program, progress: bool) -> Any:
    # A disabled tqdm still costs ~50 us to set up: a plain range without a progress bar.
    stages = range(prog.stages)
    return tqdm(stages, desc=f"fastdiff {prog.sampler}", leave=False) if progress else stages


__all__ = ["Conditioning", "EAGER_ONLY", "Inpaint", "LoopResult", "Loop", "Recording"]
