"""Whole-loop CUDA graphs for :meth:`fastdiff.Pipeline.sample`.

For a fixed-step sampler on CUDA the Pipeline captures its whole loop (every model call and every fused
step) into one ``torch.cuda.CUDAGraph`` per :func:`graph_key` and replays it. What changes between calls
with the same key (the seeds, the initial state x_T, tensor conditioning) lives in static device buffers
(:class:`StaticBuffers`) that each call copies into before the replay; the coefficient table and the
model times are device tensors kept alive with the graph, so nothing inside the loop touches the host.
Graphs live in a bounded LRU (:class:`GraphCache`); each holds its own memory pool until evicted.

Everything here except :func:`capture` and :meth:`CapturedLoop.replay` runs (and is tested) on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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


def kwargs_spec(kwargs: Mapping[str, Any]) -> tuple[tuple[tuple[str, tuple], ...], tuple[str, ...]]:
    """A hashable description of model kwargs for the cache key, and the names that cannot be described.

    Tensors are described by (shape, dtype, device): their values are copied into static buffers on each
    replay. Other values are baked into the captured graph, so they enter the key by value and must be
    hashable.
    """
    spec, bad = [], []
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, torch.Tensor):
            spec.append((name, ("tensor", tuple(v.shape), v.dtype, str(v.device))))
            continue
        try:
            hash(v)
        except TypeError:
            bad.append(name)
            continue
        spec.append((name, ("value", type(v).__name__, v)))
    return tuple(spec), tuple(bad)


def graph_key(
    *,
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

    ``options`` holds every other argument that changes the coefficient program (eta, variance_type,
    spacing, steps_offset, rho, sampler options); ``model_kwargs``/``uncond_kwargs`` come from
    :func:`kwargs_spec`. Seeds, x_T and the values of tensor kwargs are not part of it.
    """
    return (
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


@dataclass
class GraphCache:
    """A bounded LRU of captured loops keyed by :func:`graph_key`; counts hits, misses and evictions."""

    maxsize: int = DEFAULT_MAX_GRAPHS
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    _entries: OrderedDict[tuple, Any] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if isinstance(self.maxsize, bool) or not isinstance(self.maxsize, int) or self.maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {self.maxsize!r}")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def keys(self) -> tuple[tuple, ...]:
        """Keys from least to most recently used."""
        return tuple(self._entries)

    def get(self, key: tuple) -> Any | None:
        """The entry for ``key`` (marked most recently used), or None; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: Any) -> None:
        """Stores ``entry``, evicting least recently used entries beyond ``maxsize``."""
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
            self.evictions += 1

    def get_or_create(self, key: tuple, create: Callable[[], Any]) -> Any:
        """The entry for ``key``, built with ``create()`` and stored on a miss."""
        entry = self.get(key)
        if entry is None:
            entry = create()
            self.put(key, entry)
        return entry

    def clear(self) -> None:
        """Drops every entry (their graphs and memory pools are freed when no longer referenced)."""
        self._entries.clear()


def capture(
    loop: Callable[[StaticBuffers], tuple[torch.Tensor | None, ...]],
    inputs: StaticBuffers,
    warmup: int = 1,
    keep_alive: tuple[Any, ...] = (),
) -> CapturedLoop:
    """Captures ``loop(inputs)`` into a CUDA graph after ``warmup`` eager runs on a side stream.

    The warm-up compiles the Triton kernels and lets cuDNN/cuBLAS pick their algorithms outside the
    capture (side stream: as torch.cuda.graphs recommends, so the capture stream sees no pending work).
    ``loop`` must only read ``inputs`` and device tensors that outlive the graph (pass them in
    ``keep_alive``), and must not synchronise with the host.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graph capture needs CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(int(warmup), 1)):
            loop(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = loop(inputs)
    return CapturedLoop(graph=graph, inputs=inputs, outputs=tuple(outputs), keep_alive=keep_alive)
