"""Whole-loop CUDA graphs for :meth:`fastdiff.Pipeline.sample`.

For a fixed-step sampler on CUDA the Pipeline captures its whole loop (every model call and every fused
step) into one ``torch.cuda.CUDAGraph`` per :func:`graph_key` and replays it. What changes between calls
with the same key (the seeds, the initial state x_T, tensor conditioning) lives in static device buffers
(:class:`StaticBuffers`) that each call copies into before the replay; the coefficient table and the
model times are device tensors kept alive with the graph, so nothing inside the loop touches the host.
Graphs live in a bounded LRU (:class:`GraphCache`); the graphs of one cache share one memory pool
(:attr:`GraphCache.pool`).

Everything here except :func:`capture` and :meth:`CapturedLoop.replay` runs (and is tested) on the CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.runtime.tree import describe

CudaGraphMode = str | bool
CUDA_GRAPH_MODES = ("auto", True, False)
DEFAULT_MAX_GRAPHS = 8


def resolve_cuda_graph(
    mode: CudaGraphMode,
    device: torch.device,
    *,
    adaptive: bool = False,
    explicit_noise: bool = False,
    callback: bool = False,
    unhashable_kwargs: Sequence[str] = (),
) -> bool:
    """Whether to run the loop as a CUDA graph.

    ``mode`` is ``"auto"`` (graph where it applies, eager otherwise, silently), ``True`` (graph, or a
    ValueError saying why it cannot apply) or ``False`` (eager). A graph cannot apply on a non-CUDA
    device, for an adaptive sampler, with an explicit per-stage noise list (its tensors are host-side
    Python objects read stage by stage), with a callback (it runs on the host between steps), or with
    non-tensor model kwargs that cannot be part of the cache key (they would be baked into the graph).
    """
    if not (mode is True or mode is False or mode == "auto"):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {mode!r}")
    if mode is False:
        return False
    reasons = []
    if torch.device(device).type != "cuda":
        reasons.append(f"the pipeline runs on {torch.device(device)}, not CUDA")
    if adaptive:
        reasons.append("the sampler is adaptive or not one fixed coefficient program (its loop runs eagerly)")
    if explicit_noise:
        reasons.append("an explicit noise list was given (pass seeds instead: the noise is then made in the graph)")
    if callback:
        reasons.append("a callback runs on the host between steps")
    if unhashable_kwargs:
        reasons.append(f"model kwargs {list(unhashable_kwargs)} are neither tensors nor hashable values")
    if reasons:
        if mode is True:
            raise ValueError(
                "cuda_graph=True cannot apply: " + "; ".join(reasons) + " (use cuda_graph='auto' "
                "to fall back to the eager loop)"
            )
        return False
    return True


def kwargs_spec(kwargs: Mapping[str, Any]) -> tuple[tuple[tuple[str, Hashable], ...], tuple[str, ...]]:
    """A hashable description of model kwargs for the cache key, and the names that cannot be described.

    Tensors, also inside lists, tuples and dicts, are described by (shape, dtype, device)
    (:func:`fastdiff.runtime.tree.describe`): their values are copied into static buffers on each replay. Other
    values are baked into the captured graph, so they enter the key by value and must be hashable.
    """
    spec, bad = [], []
    for name in sorted(kwargs):
        try:
            spec.append((name, describe(kwargs[name])))
        except TypeError:
            bad.append(name)
    return tuple(spec), tuple(bad)


class _Identity:
    """An object in a cache key by identity (equal only to itself, hashable whatever its own ``__eq__``), held
    strongly: a cached graph replays the model's weights by address, so the model must outlive the graph."""

    __slots__ = ("obj", "_id")

    def __init__(self, obj: Any):
        self.obj = obj
        # A bound method is a new object at every attribute access: the instance and function identify it.
        self._id = (id(obj.__self__), id(obj.__func__)) if hasattr(obj, "__func__") else (id(obj),)

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and self._id == other._id

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} at {self._id}>"


def graph_key(
    *,
    model: Any,
    schedule: Any,
    prediction: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    sampler: str,
    steps: int,
    options: Mapping[str, Any],
    guidance: Hashable | None,
    model_kwargs: tuple,
    uncond_kwargs: tuple | None,
    return_x0: bool,
    return_trajectory: bool,
) -> tuple:
    """The cache key of a captured loop: everything the captured kernels and buffers depend on.

    ``model`` and ``schedule`` enter by identity (a new network or schedule is a new graph: a replay would run the
    old weights and coefficients), ``prediction`` by value.
    ``options`` holds every other argument that changes the coefficient program (eta, variance_type,
    spacing, steps_offset, rho, sampler options); ``model_kwargs``/``uncond_kwargs`` come from
    :func:`kwargs_spec`. Seeds, x_T and the values of tensor kwargs are not part of it.
    """
    return (
        _Identity(model),
        _Identity(schedule),
        prediction,
        tuple(int(s) for s in shape),
        dtype,
        str(torch.device(device)),
        sampler,
        int(steps),
        tuple(sorted((k, _freeze(v)) for k, v in options.items())),
        guidance,
        model_kwargs,
        uncond_kwargs,
        bool(return_x0),
        bool(return_trajectory),
    )


def _freeze(v: Any) -> Hashable:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(u) for u in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(u)) for k, u in v.items()))
    return v


class StaticBuffers:
    """Named device tensors a captured graph reads; :meth:`copy_in` refreshes them before a replay.

    Created from example tensors (cloned, so the caller's tensors are never aliased). ``copy_in`` checks
    each new tensor's name, shape and dtype against the buffer (a mismatch is a ValueError: the graph
    would otherwise read garbage) and copies it in, moving it to the buffer's device.
    """

    def __init__(self, examples: Mapping[str, torch.Tensor]):
        self.tensors: dict[str, torch.Tensor] = {}
        for name, t in examples.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"static buffer {name!r} must be a tensor, got {type(t).__name__}")
            self.tensors[name] = t.detach().clone(memory_format=torch.contiguous_format)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> tuple[str, ...]:
        """The buffers' names."""
        return tuple(self.tensors)

    def nbytes(self) -> int:
        """Total bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def copy_in(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copies ``values`` into the buffers of the same names (every buffer must be given)."""
        missing = set(self.tensors) - set(values)
        extra = set(values) - set(self.tensors)
        if missing or extra:
            raise ValueError(f"static inputs mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, v in values.items():
            buf = self.tensors[name]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"static input {name!r} must be a tensor, got {type(v).__name__}")
            if v.shape != buf.shape or v.dtype != buf.dtype:
                raise ValueError(
                    f"static input {name!r} is {tuple(v.shape)} {v.dtype}; the captured graph was "
                    f"built for {tuple(buf.shape)} {buf.dtype}"
                )
        for name, v in values.items():
            # non_blocking: a host tensor is staged by the caching allocator; stream order keeps it correct.
            self.tensors[name].copy_(v, non_blocking=True)


@dataclass
class CapturedLoop:
    """One captured loop: its graph, static inputs, static outputs and whatever must outlive capture."""

    graph: Any
    inputs: StaticBuffers
    outputs: tuple[torch.Tensor | None, ...]
    keep_alive: tuple[Any, ...] = ()
    replays: int = 0

    def replay(self, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """Copies ``values`` into the static inputs, replays, and returns the static outputs.

        The returned tensors are the graph's own buffers: the next replay overwrites them, so callers
        clone what they hand out.
        """
        self.inputs.copy_in(values)
        self.graph.replay()
        self.replays += 1
        return self.outputs


def new_graph_pool() -> Any:
    """A new CUDA graph memory pool's handle (None without CUDA, where nothing is captured)."""
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None


@dataclass
class GraphCache:
    """A bounded LRU of captured loops keyed by :func:`graph_key`; counts hits, misses and evictions.

    ``lock`` (reentrant) serialises what uses an entry: a pipeline is shared between threads, and one graph's
    static buffers must not be refilled while another thread's replay of it still reads or returns them. The
    methods here take it themselves; a caller holds it across get, capture, replay and copying the outputs out.
    """

    maxsize: int = DEFAULT_MAX_GRAPHS
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    _entries: OrderedDict[tuple, Any] = field(default_factory=OrderedDict)
    lock: Any = field(  # a threading.RLock
        default_factory=threading.RLock, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.maxsize, bool) or not isinstance(self.maxsize, int) or self.maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {self.maxsize!r}")
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        """The memory pool every graph of this cache is captured into (made on first use, on the current CUDA
        device). Sharing is safe: the caller holds :attr:`lock` across a replay and copies the outputs out before
        the next, so two graphs never run at once, and what a graph's replay overwrites of another graph's memory
        (its outputs) is rewritten by that graph's own next replay. One pool holds about one graph's peak
        activations rather than one per cached graph (the serving engine's tick graphs share one the same way)."""
        if self._pool is None:
            self._pool = new_graph_pool()
        return self._pool

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def keys(self) -> tuple[tuple, ...]:
        """Keys from least to most recently used."""
        return tuple(self._entries)

    def get(self, key: tuple) -> Any | None:
        """The entry for ``key`` (marked most recently used), or None; counts a hit or a miss."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: Any) -> None:
        """Stores ``entry``, evicting least recently used entries beyond ``maxsize``."""
        with self.lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
                self.evictions += 1

    def get_or_create(self, key: tuple, create: Callable[[], Any]) -> Any:
        """The entry for ``key``, built with ``create()`` and stored on a miss."""
        with self.lock:
            entry = self.get(key)
            if entry is None:
                entry = create()
                self.put(key, entry)
            return entry

    def clear(self) -> None:
        """Drops every entry (their graphs and memory pools are freed when no longer referenced)."""
        with self.lock:
            self._entries.clear()


def device_guard(device: torch.device | str) -> AbstractContextManager[Any]:
    """Makes ``device`` the current CUDA device for the block (streams, graphs and pools are per device: capture
    and replay must run on the pipeline's device, not on whichever is current); a no-op off CUDA."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def capture(
    loop: Callable[[StaticBuffers], tuple[torch.Tensor | None, ...]],
    inputs: StaticBuffers,
    warmup: int = 1,
    keep_alive: tuple[Any, ...] = (),
    pool: Any = None,
) -> CapturedLoop:
    """Captures ``loop(inputs)`` into a CUDA graph after ``warmup`` eager runs on a side stream.

    The warm-up compiles the Triton kernels and lets cuDNN/cuBLAS pick their algorithms outside the
    capture (side stream: as torch.cuda.graphs recommends, so the capture stream sees no pending work).
    ``loop`` must only read ``inputs`` and device tensors that outlive the graph (pass them in
    ``keep_alive``), and must not synchronise with the host. Runs on the current CUDA device
    (:func:`device_guard`). A failed capture raises with the calling thread back on its own stream. ``pool`` (a
    ``torch.cuda.graph_pool_handle()``) shares one memory pool between graphs that never run at once and whose
    outputs are copied out (or rewritten) before another of them replays (default: the graph's own pool)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graph capture needs CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(int(warmup), 1)):
            loop(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    outputs = _capture_on(side, graph, lambda: loop(inputs), pool)
    return CapturedLoop(graph=graph, inputs=inputs, outputs=tuple(outputs), keep_alive=keep_alive)


def _capture_on(stream: Any, graph: Any, body: Callable[[], Any], pool: Any = None) -> Any:
    """``body()`` captured into ``graph`` on ``stream``: torch.cuda.graph's steps, but the stream is restored
    however the capture ends (torch.cuda.graph's ``__exit__`` calls ``capture_end()`` before it leaves the stream
    context, so a failing capture left the thread on the capture stream).

    ``capture_error_mode="thread_local"``: other threads may allocate and launch work meanwhile (a pipeline is
    shared between threads); only this thread's unsafe calls invalidate the capture.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch.cuda.stream(stream):  # its __exit__ restores the caller's stream, on success or failure
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = body()
        except BaseException:
            _end_failed_capture(graph)
            raise
        graph.capture_end()
    return out


def _end_failed_capture(graph: Any) -> None:
    """Ends a capture the body raised in (the stream leaves capture mode); its own error, an invalidated capture,
    says less than the body's, which the caller re-raises."""
    try:
        graph.capture_end()
    except Exception:  # noqa: BLE001 - the body's exception is the one that matters
        pass
