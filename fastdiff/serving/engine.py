"""The step-level continuous-batching engine (docs/architecture.md, "Serving: per-row programs").

A running batch holds rows from many requests; each row has its own coefficient program (sampler, steps,
options), its own position in it, seed, guidance weight and conditioning. One :meth:`Engine.tick`: one
network call on every row (a doubled call on the guided rows), then one ``fastdiff::fused_step`` in per-row
mode over all rows, which reads each row's coefficient row, noise stage, history slots and guidance weight
from per-row tensors. Queued requests join at the next tick; rows leave as soon as their program ends.

A failure fails only its request: rows whose conditioning cannot be concatenated (names, per-row shapes, dtypes)
get a network call each, and a call that raises is retried on its requests apart, halving the set each time,
until the requests whose own call raises are found; they fail with :class:`RequestFailed` (their rows still take
the tick's one fused step, then leave), and every other row gets its output as if nothing had failed.

The contract: a request's samples equal ``Pipeline.sample`` with the same settings and seeds, whatever else
shares the batch and whenever it joined: bitwise for a batch-invariant network (the noise is keyed by
(sample seed, stage, element), the coefficients by (program, stage), and an unguided row's guidance input
is its own output, so ``m_u + w (m - m_u) = m`` exactly); within the network's own batch variance otherwise.

The engine is single-threaded and knows nothing of time or HTTP: :mod:`fastdiff.serving.runner` drives it from
a thread (deadlines, cancellation, batching policies) and :mod:`fastdiff.serving.app` serves it over HTTP.

On CUDA a tick makes no blocking host-device transfer: the rows' per-tick data (coefficient row, stage, slots, model
time) goes over in one non-blocking copy from pinned memory, their seeds, guidance weights and non-finite records
stay on the device with the rows, and the host reads the device only for rows that finish (their non-finite
record; their samples are read then anyway). A row that became NaN/Inf runs to the end of its program and its
request fails then. Where a tick's shape allows, it runs as a CUDA graph per batch-size bucket
(:mod:`fastdiff.serving.tick_graphs`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.kernels.philox import derive_seeds
from fastdiff.kernels.reference import MAX_HISTORY, ROW_FIELDS
from fastdiff.pipeline import Pipeline
from fastdiff.program import Program
from fastdiff.request import SampleRequest
from fastdiff.runtime.checks import NO_NONFINITE, check_model_output
from fastdiff.runtime.step import fused_step
from fastdiff.serving.tick_graphs import TICK_GRAPH_MODES, CoefficientTable, StaticTick, bucket_for


class RequestFailed(RuntimeError):
    """A request's rows became NaN/Inf, or the network raised on them (only that request fails; the rest of the
    batch goes on). A network error is chained as ``__cause__`` and named in the message."""


class RequestCancelled(RuntimeError):
    """A request was cancelled (its client went away, or its deadline passed) before it finished."""


ADMISSION_POLICIES = ("continuous", "drain")

# The engine's tensors with one entry per running row, and the dimension that indexes the rows.
_ROW_TENSORS = {"_x": 0, "_pool": 1, "_seeds": 0, "_weights": 0, "_bad": 0, "_init": 0, "_mask": 0}


@dataclass
class TickReport:
    """What one :meth:`Engine.tick` did: the requests whose rows joined, the requests that finished (samples or
    error ready) and how many rows the network call ran."""

    admitted: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    rows: int = 0


@dataclass
class _Row:
    request: int
    index: int  # sample index within the request
    program: Program
    seed: int
    stage: int = 0
    guidance: float = 1.0
    cond: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None
    inpaint: bool = False  # the row's known region (mask 0) is blended in at every step
    # which rows can share a network call (:func:`_call_key`): fixed for the row's life, so worked out once
    cond_key: tuple = field(init=False)
    uncond_key: tuple | None = field(init=False)

    def __post_init__(self) -> None:
        self.cond_key = _call_key(self.cond)
        self.uncond_key = None if self.uncond is None else _call_key(self.uncond)


@dataclass
class _Pending:
    request: SampleRequest
    rows_left: int
    out: torch.Tensor
    error: BaseException | None = None


class Engine:
    """Runs many :class:`SampleRequest` s on one pipeline with step-level batching (see the module docstring).

    Args:
        pipe: the pipeline (network, schedule, prediction, device, dtype) every request samples.
        max_batch: the most rows one tick runs; further requests wait in the queue.
        admission: ``"continuous"`` (step-level batching: queued requests join at any tick with room) or
            ``"drain"`` (request-level batching: requests join only when the running batch is empty, then the
            batch runs to its end; with ``max_requests=1`` this is one request at a time).
        max_requests: the most requests one admission takes in (default: as many as fit ``max_batch``).
        tick_graphs: ``"auto"`` (on CUDA, a tick whose rows all call the network and share one conditioning layout
            runs as a CUDA graph per batch-size bucket; any other tick, and every tick off CUDA, runs eagerly),
            ``"off"`` (always eager) or ``"static"`` (the graph path's static buffers and padding, run eagerly:
            what the CPU tests check).
    """

    def __init__(
        self,
        pipe: Pipeline,
        max_batch: int = 64,
        admission: str = "continuous",
        max_requests: int | None = None,
        tick_graphs: str = "auto",
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {ADMISSION_POLICIES}, got {admission!r}")
        if max_requests is not None and (
            isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1
        ):
            raise ValueError(f"max_requests must be an int >= 1 or None, got {max_requests!r}")
        if tick_graphs not in TICK_GRAPH_MODES:
            raise ValueError(f"tick_graphs must be one of {TICK_GRAPH_MODES}, got {tick_graphs!r}")
        self.pipe = pipe
        self.tick_graphs = tick_graphs
        self.max_batch = max_batch
        self.admission = admission
        self.max_requests = max_requests
        self._queue: deque[int] = deque()
        self._requests: dict[int, _Pending] = {}
        self._rows: list[_Row] = []
        self._x: torch.Tensor | None = None  # [rows, *shape]
        self._pool: torch.Tensor | None = None  # [MAX_HISTORY, rows, *shape]
        # Per row, on the device with the rows: seed, guidance weight, first non-finite stage.
        self._seeds: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None
        # Inpainting, while a running row inpaints: per row the image and mask (zeros and ones for other rows, whose
        # blend rows in the table are zeros: they blend nothing).
        self._init: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._table = CoefficientTable(pipe.device)
        self._statics: dict[tuple, StaticTick | None] = {}  # tick shape -> its buffers (None: eager only)
        self._graph_pool: Any = None
        self._ids = itertools.count()
        self._programs: dict[tuple, Program] = {}
        self._stage_rows: dict[int, list[tuple]] = {}  # id(program) -> per stage: (fields, model time, calls model)
        self.ticks = 0
        self.static_ticks = 0  # ticks run on a bucket's static buffers (CUDA graphs on CUDA)

    # ------------------------------------------------------------------ requests
    def submit(self, request: SampleRequest) -> int:
        """Validates and queues a request; returns its id (its rows join at the next tick with room)."""
        request.validate(self.pipe, serving=True)
        self._program(request)  # builds (and caches) the program now, so a bad grid fails here, not in a tick
        rid = next(self._ids)
        shape = (request.n, *request.sample_shape)
        out = torch.empty(shape, dtype=self.pipe.dtype, device=self.pipe.device)
        self._requests[rid] = _Pending(request, request.n, out)
        self._queue.append(rid)
        return rid

    def cancel(self, rid: int) -> None:
        """Drops request ``rid``: queued, it never runs; running, its rows leave at the next tick. Its
        :meth:`result` raises :class:`RequestCancelled`. Unknown or finished requests are left as they are."""
        pending = self._requests.get(rid)
        if pending is None or self.done(rid):
            return
        pending.error = RequestCancelled(f"request {rid} was cancelled")
        if rid in self._queue:
            self._queue.remove(rid)

    def done(self, rid: int) -> bool:
        """Whether request ``rid`` has finished (its samples, or its error, are ready)."""
        return self._requests[rid].rows_left == 0 or self._requests[rid].error is not None

    def result(self, rid: int) -> torch.Tensor:
        """The samples of a finished request (raises its :class:`RequestFailed`); forgets the request."""
        pending = self._requests[rid]
        if not self.done(rid):
            raise ValueError(f"request {rid} has not finished")
        del self._requests[rid]
        if pending.error is not None:
            raise pending.error
        return pending.out

    @property
    def running_rows(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def queued_requests(self) -> int:
        """Requests waiting for room."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued or running."""
        return not self._rows and not self._queue

    def run(self, max_ticks: int = 100000) -> None:
        """Ticks until nothing is queued or running (bounded by ``max_ticks``)."""
        for _ in range(max_ticks):
            if not self._rows and not self._queue:
                return
            self.tick()
        raise RuntimeError(f"the engine did not drain in {max_ticks} ticks")

    # ------------------------------------------------------------------ the tick
    def tick(self) -> TickReport:
        """Admits queued requests that fit, runs one network call and one fused step on every row, and
        retires the rows whose program ended (rows of failed or cancelled requests leave too)."""
        report = TickReport()
        report.admitted = self.admit()
        report.finished = [rid for rid in report.admitted if self.done(rid)]  # refused at admission
        if not self._rows:
            return report
        rows = self._rows
        report.rows = len(rows)
        desc, times = self._row_data()
        failures: dict[int, Exception] = {}
        if self._init is not None or not self._run_static(desc, times):
            x_out = torch.empty_like(self._x)
            m, m_u = self._network(self._x, times, failures)
            inpainting = {} if self._init is None else dict(init=self._init, mask=self._mask, blend=self._table.blend)
            fused_step(
                x=self._x,
                m=m,
                m_uncond=m_u,
                coeffs=self._table.buffer,
                stage=0,
                seeds=self._seeds,
                x_out=x_out,
                nonfinite=self._bad,
                rows=desc,
                pool=self._pool,
                row_guidance=None if m_u is None else self._weights,
                **inpainting,
            )
            self._x = x_out
        for rid, exc in failures.items():  # their rows took this step (one fused op); they leave now
            error = RequestFailed(f"request {rid}: the network raised on its rows: {exc!r}")
            error.__cause__ = exc
            self._requests[rid].error = error
            report.finished.append(rid)
        self.ticks += 1
        self._retire(report)
        return report

    def _retire(self, report: TickReport) -> None:
        """Advances every row a stage; rows whose program ended hand their sample to their request (failing it if
        the row ever became NaN/Inf: the only host read of the tick, and only when rows end), others stay."""
        rows = self._rows
        ending = [b for b, r in enumerate(rows) if r.stage + 1 == r.program.stages]
        bad = dict(zip(ending, self._bad[ending].tolist() if ending else [], strict=True))
        keep = []
        for b, r in enumerate(rows):
            r.stage += 1
            pending = self._requests.get(r.request)
            if pending is None or pending.error is not None:
                continue  # the request failed (or was dropped): its rows leave now
            if b not in bad:
                keep.append(b)
                continue
            if bad[b] != NO_NONFINITE:
                pending.error = RequestFailed(f"request {r.request}: sample {r.index} became NaN/Inf at stage {bad[b]}")
                report.finished.append(r.request)
                continue
            pending.out[r.index] = self._x[b]
            pending.rows_left -= 1
            if pending.rows_left == 0:
                report.finished.append(r.request)
        self._select(keep)

    def _row_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' descriptors ([rows, ROW_FIELDS] int32) and model times ([rows] float32) for this tick, in one
        host-to-device copy (non-blocking, from pinned memory, on CUDA)."""
        packed = []
        for r in self._rows:
            fields, model_time, _ = self._stage_rows[id(r.program)][r.stage]
            packed.append([fields[0] + self._table.offset(r.program, r.inpaint), *fields[1:], model_time])
        host = torch.tensor(packed, dtype=torch.float64)  # int32 fields and float32 times are exact in float64
        out = host_to_device(torch.cat([host[:, :ROW_FIELDS].to(torch.int32),
                                        host[:, ROW_FIELDS:].to(torch.float32).view(torch.int32)], dim=1),
                             self.pipe.device)  # fmt: skip
        return out[:, :ROW_FIELDS].contiguous(), out[:, ROW_FIELDS].contiguous().view(torch.float32)

    def _run_static(self, desc: torch.Tensor, times: torch.Tensor) -> bool:
        """Runs the tick on a bucket's static buffers (a CUDA graph on CUDA) when it applies; False when not."""
        key = self._static_key()
        if key is None:
            return False
        static = self._statics.get(key, ...)
        if static is None:  # this tick shape failed to capture before: eager, without stacking its conditioning
            return False
        rows = self._rows
        cond = _stack_kwargs([r.cond for r in rows])
        uncond = _stack_kwargs([r.uncond for r in rows]) if rows[0].uncond is not None else None
        if static is ...:
            first_uncond = None if uncond is None else _first_row(uncond)
            x = self._x
            static = StaticTick(
                self.pipe.model, key[0], x.shape[1:], x.dtype, x.device, _first_row(cond), first_uncond, self._table
            )
            self._statics[key] = static

        def load() -> None:
            static.load(self._x, self._pool, desc, times, self._seeds, self._weights, self._bad, cond, uncond)

        load()
        on_cuda = self.tick_graphs == "auto"
        try:
            if on_cuda and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            static.run(on_cuda, load, self._graph_pool)
        except Exception:  # noqa: BLE001  (a capture that fails: this tick shape runs eagerly from now on)
            self._statics[key] = None
            return False
        self._x, self._pool, self._bad = static.unload(len(rows))
        self.static_ticks += 1
        return True

    def _static_key(self) -> tuple | None:
        """The static tick this tick fits (bucket, guided, conditioning layout, table version), or None: eager
        (graphs off or not on CUDA, a row without a network call at its stage, rows of different conditioning
        layouts, guided and unguided rows together, conditioning that is not all per-row tensors)."""
        if self.tick_graphs == "off" or (self.tick_graphs == "auto" and self.pipe.device.type != "cuda"):
            return None
        rows = self._rows
        first = rows[0]
        if any(not self._stage_rows[id(r.program)][r.stage][2] for r in rows):
            return None
        if any(r.cond_key != first.cond_key or r.uncond_key != first.uncond_key for r in rows):
            return None
        for kwargs in (first.cond, first.uncond or {}):
            if any(not isinstance(v, torch.Tensor) or v.ndim == 0 for v in kwargs.values()):
                return None
        bucket = bucket_for(len(rows), self.max_batch)
        return (bucket, first.uncond is not None, first.cond_key, first.uncond_key, self._table.version)

    # ------------------------------------------------------------------ helpers
    def _network(self, x: torch.Tensor, times: torch.Tensor, failures: dict[int, Exception]):
        """Every row's output, and (for guided rows) the unconditional output and the guidance weights. Rows whose
        stage makes no network call get ``m = x`` (their coefficient row reads m with ``c_m = 0``, as in
        ``Pipeline.sample``). Requests the network raised on are put in ``failures`` (request id: error); their
        rows get ``m = x`` too and must leave after the step. The guidance weights are the rows' own
        (``self._weights``)."""
        rows = self._rows
        calling = [b for b, r in enumerate(rows) if self._stage_rows[id(r.program)][r.stage][2]]
        if len(calling) == len(rows):
            m = self._call(x, times, calling, [(r.cond, r.cond_key) for r in rows], failures)
        else:
            m = x.clone()
            if calling:
                m[_index(calling, x.device)] = self._call(
                    x, times, calling, [(rows[b].cond, rows[b].cond_key) for b in calling], failures
                )
        guided = [b for b in calling if rows[b].uncond is not None and rows[b].request not in failures]
        if not guided:
            return m.contiguous(), None
        m_u = m.clone()  # unguided rows: m_u = m, so m_u + w (m - m_u) is m exactly
        m_u[_index(guided, x.device)] = self._call(
            x, times, guided, [(rows[b].uncond, rows[b].uncond_key) for b in guided], failures
        )
        return m.contiguous(), m_u.contiguous()

    def _call(
        self,
        x: torch.Tensor,
        times: torch.Tensor,
        rows: list[int],
        conditioning: list[tuple[dict[str, Any], tuple]],
        failures: dict[int, Exception],
    ) -> torch.Tensor:
        """The network on ``x[rows]`` with each row's (kwargs, :func:`_call_key`), outputs in ``rows`` order: one
        call per key (rows whose conditioning differs in names, per-row shapes, dtypes or shared values cannot share
        a call). A call that
        raises is retried on its requests apart (:meth:`_isolate`); requests whose own call raises go into
        ``failures`` and their rows get ``x`` (they leave after this tick)."""
        kwargs = [kw for kw, _ in conditioning]
        groups: dict[tuple, list[int]] = {}
        for k, (_, key) in enumerate(conditioning):
            groups.setdefault(key, []).append(k)
        if len(groups) == 1:
            parts = self._isolate(x, times, rows, kwargs, list(range(len(rows))), failures)
            if len(parts) == 1 and len(parts[0][0]) == len(rows):
                return parts[0][1]  # the common case: one call on every row, nothing failed
        else:
            parts = []
            for members in groups.values():
                parts += self._isolate(
                    x, times, [rows[k] for k in members], [kwargs[k] for k in members], members, failures
                )
        out = x[_index(rows, x.device)].clone()
        if parts:
            out = out.to(parts[0][1].dtype)
        for positions, part in parts:
            out[_index(positions, x.device)] = part
        return out

    def _isolate(
        self,
        x: torch.Tensor,
        times: torch.Tensor,
        rows: list[int],
        kwargs: list[dict[str, Any]],
        positions: list[int],
        failures: dict[int, Exception],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """One network call on ``x[rows]`` (rows of one :func:`_call_key`); ``[(positions, output)]``. When it
        raises (or returns something other than a floating tensor shaped like its input), the call's requests
        are split in two halves, each called again, recursively: a request whose own call still raises goes
        into ``failures`` and its rows into no output. The network is only called again, never the step, so no
        row advances twice; for a batch-invariant network the other rows' outputs are those of the first call."""
        try:
            sel = rows if len(rows) < x.shape[0] else slice(None)  # all rows: rows is 0 .. len - 1 in order
            inputs = x[sel]
            part = self.pipe.model(inputs, times[sel], **_stack_kwargs(kwargs))
            check_model_output(part, inputs, self._rows[rows[0]].stage)
            return [(positions, part)]
        except Exception as exc:  # noqa: BLE001  (isolate the request that made the network raise)
            requests = list(dict.fromkeys(self._rows[b].request for b in rows))
            if len(requests) == 1:
                failures.setdefault(requests[0], exc)
                return []
            first = set(requests[: len(requests) // 2])
            halves = [
                [k for k, b in enumerate(rows) if (self._rows[b].request in first) is side] for side in (True, False)
            ]
            parts = []
            for half in halves:
                parts += self._isolate(
                    x, times, [rows[k] for k in half], [kwargs[k] for k in half], [positions[k] for k in half], failures
                )
            return parts

    def admit(self) -> list[int]:
        """Drops the rows of failed or cancelled requests and moves queued requests into the running batch (per
        the admission policy); returns their ids, and the ids of requests refused for good (n > max_batch),
        which are finished with an error. :meth:`tick` does this first; call it alone to learn which requests
        the coming tick runs before it runs."""
        keep = [
            b
            for b, r in enumerate(self._rows)
            if r.request in self._requests and self._requests[r.request].error is None
        ]
        self._select(keep)
        admitted: list[int] = []
        if self.admission == "drain" and self._rows:
            return admitted
        new: list[_Row] = []
        states: list[torch.Tensor] = []
        edits: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # per request: its rows' (init, mask) to blend
        seeds_new: list[torch.Tensor] = []
        device = self.pipe.device
        while (
            self._queue
            and len(self._rows) + len(new) + self._requests[self._queue[0]].request.n <= self.max_batch
            and (self.max_requests is None or len(admitted) < self.max_requests)
        ):
            rid = self._queue.popleft()
            req = self._requests[rid].request
            shape = (req.n, *req.sample_shape)
            if self._x is not None and tuple(self._x.shape[1:]) != tuple(req.sample_shape):
                self._queue.appendleft(rid)  # one sample shape per running batch: wait for this one to drain
                break
            prog = self._program(req)
            seeds_t = derive_seeds(req.seed, req.n)
            seeds = seeds_t.tolist()  # host values (derived on the host), not a device read
            seeds_new.append(seeds_t)
            states.append(self.pipe.start_state(req, prog.grid, self.pipe.initial_noise(shape, req.seed)))
            edits.append(req.inpaint_tensors(self.pipe.device, self.pipe.dtype))
            guided = req.guided
            admitted.append(rid)
            for i in range(req.n):
                new.append(
                    _Row(
                        rid,
                        i,
                        prog,
                        int(seeds[i]),
                        guidance=float(req.guidance_scale),
                        cond=_row_kwargs(req.model_kwargs, i, device),
                        uncond=_row_kwargs(req.uncond_kwargs or {}, i, device) if guided else None,
                        inpaint=req.mask is not None,
                    )
                )
        if not new:
            if self._queue and not self._rows and self._requests[self._queue[0]].request.n > self.max_batch:
                rid = self._queue.popleft()
                self._requests[rid].error = ValueError(f"request {rid} has n > max_batch = {self.max_batch}")
                admitted.append(rid)
            return admitted
        x_new = torch.cat(states).to(self.pipe.dtype)
        pool_new = torch.zeros((MAX_HISTORY, *x_new.shape), dtype=x_new.dtype, device=x_new.device)
        per_row = {
            "_x": x_new,
            "_pool": pool_new,
            "_seeds": host_to_device(torch.cat(seeds_new).to(torch.int64), x_new.device),
            "_weights": host_to_device(torch.tensor([r.guidance for r in new], dtype=torch.float32), x_new.device),
            "_bad": torch.full((len(new),), NO_NONFINITE, dtype=torch.int32, device=x_new.device),
        }
        if self._init is not None or any(e is not None for e in edits):
            pairs = list(zip(edits, states, strict=True))
            per_row["_init"] = torch.cat([e[0] if e is not None else torch.zeros_like(s) for e, s in pairs])
            per_row["_mask"] = torch.cat([e[1] if e is not None else torch.ones_like(s) for e, s in pairs])
            if self._init is None and self._rows:  # the first inpainting rows: the running rows blend nothing
                self._init, self._mask = torch.zeros_like(self._x), torch.ones_like(self._x)
        self._rows.extend(new)
        for name, value in per_row.items():
            running = getattr(self, name)
            setattr(self, name, value if running is None else torch.cat([running, value], dim=_ROW_TENSORS[name]))
        return admitted

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[b] for b in keep]
        if not any(r.inpaint for r in self._rows):
            self._init = self._mask = None  # no row inpaints any more: the step blends nothing
        idx = _index(keep, self._x.device) if keep else None
        for name, dim in _ROW_TENSORS.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, None if idx is None else value.index_select(dim, idx))

    def _program(self, req: SampleRequest) -> Program:
        key = req.program_key()
        if key not in self._programs:
            prog = req.program(self.pipe)
            if prog.slots > MAX_HISTORY:
                raise ValueError(
                    f"sampler {req.sampler!r} keeps {prog.slots} history slots; a serving row holds {MAX_HISTORY}"
                )
            self._programs[key] = prog
            self._stage_rows[id(prog)] = [
                (_row_fields(prog, k), float(prog.model_time[k]), prog.calls_model(k)) for k in range(prog.stages)
            ]
        return self._programs[key]


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA copied from pinned memory without blocking the host (the caching host
    allocator keeps the pinned block until the copy is done); elsewhere the tensor itself."""
    if torch.device(device).type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return host_to_device(torch.tensor(positions, dtype=torch.int64), device)


def _first_row(kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in kwargs.items()}


def _row_fields(prog: Program, stage: int) -> list[int]:
    """A row's per-row-mode fields at ``stage`` (coefficient row before the table offset, noise stage, three read
    slots padded with -1, write slot); see ``fastdiff/kernels/reference.py``."""
    reads = prog.reads(stage)
    fields = [stage, stage, *reads, *([-1] * (3 - len(reads))), prog.writes(stage)]
    assert len(fields) == ROW_FIELDS
    return fields


def _row_kwargs(kwargs: Mapping[str, Any], i: int, device: torch.device) -> dict[str, Any]:
    """Sample i's slice of per-sample tensors (kept 1-row, on the pipeline's device: requests parsed from HTTP
    arrive on the CPU), shared values as they are."""
    return {
        k: (v[i : i + 1].to(device) if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in kwargs.items()
    }


def _call_key(kwargs: dict[str, Any]) -> tuple:
    """Rows with equal keys can share a network call: the same names, per-sample tensors of the same per-row
    shape, dtype and device (so they concatenate), and the same shared (non-per-sample) values."""

    def shared(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if v.ndim > 0:
                return ("per-sample", tuple(v.shape[1:]), v.dtype, v.device)
            return ("scalar", v.dtype, v.item())
        try:
            hash(v)
            return ("value", type(v), v)
        except TypeError:
            return ("object", id(v))

    return tuple((name, shared(kwargs[name])) for name in sorted(kwargs))


def _stack_kwargs(per_row: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rows' kwargs for one batched call (rows of one :func:`_call_key`): per-sample tensors concatenated,
    shared values taken once."""
    if not per_row or not per_row[0]:
        return {}
    names = per_row[0].keys()
    out = {}
    for name in names:
        first = per_row[0][name]
        out[name] = (
            torch.cat([r[name] for r in per_row]) if isinstance(first, torch.Tensor) and first.ndim > 0 else first
        )
    return out
