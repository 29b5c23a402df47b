"""The serving engine's tick as CUDA graphs, one per batch-size bucket (docs/architecture.md, "Serving").

A tick is a network call on every row (and one on the guided rows' unconditional inputs) and one per-row
``fastdiff::fused_step``. When every row calls the network at its stage and the rows share one conditioning layout
(:func:`~fastdiff.serving.engine.Engine` call keys), the tick's shape is fixed by the number of rows alone; rounded up
to a bucket (powers of two up to ``max_batch``), it is captured once as a CUDA graph (:class:`StaticTick`) and
replayed with the rows' data copied into static buffers: state, history pool, row descriptors, model times, seeds,
guidance weights and conditioning. Padding rows repeat the first row's inputs (so the network sees real inputs) and
apply the coefficient table's zero row with no history read or write, so they change nothing a real row reads;
their outputs are never read. Everything the graph reads outlives it; the graphs of one engine share one memory
pool (they never run at once, and their outputs are static buffers, not pool memory).

Everything here but the capture runs on the CPU: ``Engine(tick_graphs="static")`` runs the same static buffers and
the same tick function eagerly, which is how the tests check buckets, padding and buffers without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fastdiff.kernels.reference import BLEND_COLS, MAX_HISTORY, NUM_COEF, ROW_FIELDS
from fastdiff.runtime.checks import NO_NONFINITE
from fastdiff.runtime.graphs import StaticBuffers, capture, device_guard
from fastdiff.runtime.step import fused_step

TICK_GRAPH_MODES = ("auto", "off", "static")
NO_SLOT = -1


def buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a tick is padded to: powers of two below ``max_batch``, then ``max_batch``."""
    out, size = [], 1
    while size < max_batch:
        out.append(size)
        size *= 2
    return (*out, max_batch)


def bucket_for(rows: int, max_batch: int) -> int:
    """The smallest bucket that holds ``rows`` rows."""
    if not 1 <= rows <= max_batch:
        raise ValueError(f"rows must be in [1, {max_batch}], got {rows}")
    return next(b for b in buckets(max_batch) if b >= rows)


class CoefficientTable:
    """Every program's coefficient rows in one device buffer the fused step reads (row 0 is all zeros: the padding
    rows' row), and beside it inpainting's blend rows (:attr:`blend`, one per coefficient row: zeros, blending
    nothing, except where an inpainting row's program sits). A program that inpaints for some requests and not for
    others has two entries. Append-only, with room doubling, so its address changes (and :attr:`version` with it)
    only when it grows past its room: graphs captured on it stay valid until then."""

    def __init__(self, device: torch.device, capacity: int = 256):
        self.device = torch.device(device)
        self.buffer = torch.zeros((capacity, NUM_COEF), dtype=torch.float64, device=self.device)
        self.blend = torch.zeros((capacity, BLEND_COLS), dtype=torch.float64, device=self.device)
        self.used = 1  # the zero row
        self.version = 0
        self._offsets: dict[tuple[int, bool], int] = {}
        self._keep: list[Any] = []  # the programs, so their ids stay theirs

    def offset(self, program: Any, inpaint: bool = False) -> int:
        """The row where ``program``'s table starts (appended on first use); with ``inpaint``, the entry whose
        blend rows are the program's own (:meth:`fastdiff.program.Program.blend_device`)."""
        key = (id(program), bool(inpaint))
        if key not in self._offsets:
            coef = program.coef_device
            needed = self.used + coef.shape[0]
            if needed > self.buffer.shape[0]:
                size = max(needed, 2 * self.buffer.shape[0])
                self.buffer, self.blend = (_grown(t, size, self.used) for t in (self.buffer, self.blend))
                self.version += 1
            self.buffer[self.used : needed] = coef
            if inpaint:
                self.blend[self.used : needed] = program.blend_device()
            self._offsets[key] = self.used
            self._keep.append(program)
            self.used = needed
        return self._offsets[key]


def _grown(table: torch.Tensor, rows: int, used: int) -> torch.Tensor:
    """``table`` with room for ``rows`` rows, its first ``used`` rows copied (the rest zeros)."""
    grown = torch.zeros((rows, table.shape[1]), dtype=table.dtype, device=table.device)
    grown[:used] = table[:used]
    return grown


class StaticTick:
    """The static buffers of one bucket's tick and the tick function, which reads and writes only them.

    Args:
        model: the network (called as ``model(x, t, **kwargs)``).
        bucket: the rows of every buffer.
        sample_shape, dtype, device: one row's state.
        cond, uncond: one row's conditioning (per-row tensors [1, ...]) and, for guided ticks, its unconditional's.
        table: the engine's :class:`CoefficientTable` (read where it is; the key holds its version).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        bucket: int,
        sample_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor] | None,
        table: CoefficientTable,
    ):
        self.model = model
        self.bucket = bucket
        self.table = table
        self.guided = uncond is not None
        shape = (bucket, *sample_shape)
        examples = {
            "x": torch.zeros(shape, dtype=dtype, device=device),
            "pool": torch.zeros((MAX_HISTORY, *shape), dtype=dtype, device=device),
            "rows": torch.zeros((bucket, ROW_FIELDS), dtype=torch.int32, device=device),
            "times": torch.zeros((bucket,), dtype=torch.float32, device=device),
            "seeds": torch.zeros((bucket,), dtype=torch.int64, device=device),
            "weights": torch.ones((bucket,), dtype=torch.float32, device=device),
            "bad": torch.full((bucket,), NO_NONFINITE, dtype=torch.int32, device=device),
        }
        for prefix, kwargs in (("cond.", cond), ("uncond.", uncond or {})):
            for name, value in kwargs.items():
                examples[prefix + name] = value.expand(bucket, *value.shape[1:]).to(device)
        self.inputs = StaticBuffers(examples)
        # A padding row: the table's zero row, no history read or write (made once: no host copy per tick).
        self.pad_row = torch.tensor([[0, 0, NO_SLOT, NO_SLOT, NO_SLOT, NO_SLOT]], dtype=torch.int32, device=device)
        self.x_out = torch.zeros(shape, dtype=dtype, device=device)
        self.graph: Any = None  # a CapturedLoop once captured

    def _kwargs(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {name[n:]: self.inputs[name] for name in self.inputs.names() if name.startswith(prefix)}

    def step(self, _: Any = None) -> tuple[torch.Tensor, ...]:
        """The tick on the static buffers: the network call(s) and one per-row fused step (what is captured)."""
        buf = self.inputs
        m = self.model(buf["x"], buf["times"], **self._kwargs("cond."))
        m_u = self.model(buf["x"], buf["times"], **self._kwargs("uncond.")) if self.guided else None
        fused_step(
            x=buf["x"],
            m=m.contiguous(),
            m_uncond=None if m_u is None else m_u.contiguous(),
            coeffs=self.table.buffer,
            stage=0,
            seeds=buf["seeds"],
            x_out=self.x_out,
            nonfinite=buf["bad"],
            rows=buf["rows"],
            pool=buf["pool"],
            row_guidance=buf["weights"] if self.guided else None,
        )
        return (self.x_out,)

    def load(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        rows: torch.Tensor,
        times: torch.Tensor,
        seeds: torch.Tensor,
        weights: torch.Tensor,
        bad: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        uncond: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """Copies the running rows' data into the first rows of the buffers and pads the rest (see the module
        docstring). Device-to-device copies only: no host sync."""
        n = x.shape[0]
        buf = self.inputs
        pad = self.bucket - n
        _fill(buf["x"], x, pad)
        _fill(buf["times"], times, pad)
        _fill(buf["seeds"], seeds, pad)
        _fill(buf["weights"], weights, pad)
        buf["pool"][:, :n].copy_(pool)
        buf["bad"][:n].copy_(bad)
        buf["rows"][:n].copy_(rows)
        if pad:
            buf["rows"][n:].copy_(self.pad_row.expand(pad, ROW_FIELDS))
        for prefix, kwargs in (("cond.", cond), ("uncond.", uncond or {})):
            for name, value in kwargs.items():
                _fill(buf[prefix + name], value, pad)

    def run(self, capture_graph: bool, reload: Callable[[], None], pool: Any = None) -> None:
        """One tick on the loaded buffers: replayed as a CUDA graph or run eagerly. The first replay captures the
        graph (in the memory ``pool``), whose warm-up runs the tick once: the pool's history is updated in place,
        so ``reload()`` (:meth:`load` with the same data) restores the buffers before the replay."""
        if not capture_graph:
            self.step()
            return
        with device_guard(self.x_out.device):
            if self.graph is None:
                self.graph = capture(self.step, self.inputs, keep_alive=(self.table.buffer,), pool=pool)
                reload()
            self.graph.graph.replay()
            self.graph.replays += 1

    def unload(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``n`` rows' next state, history pool and non-finite record (copies: the buffers are reused)."""
        buf = self.inputs
        return self.x_out[:n].clone(), buf["pool"][:, :n].clone(), buf["bad"][:n].clone()


def _fill(buffer: torch.Tensor, rows: torch.Tensor, pad: int) -> None:
    """``buffer`` = ``rows`` followed by ``pad`` copies of its first row."""
    n = rows.shape[0]
    buffer[:n].copy_(rows)
    if pad:
        buffer[n:].copy_(rows[:1].expand(pad, *rows.shape[1:]))


__all__ = ["TICK_GRAPH_MODES", "CoefficientTable", "StaticTick", "bucket_for", "buckets"]
