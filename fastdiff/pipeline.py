"""``fastdiff.Pipeline``: sample a user's network with any fixed-step sampler.

The loop calls the network once per stage and applies one fused step op
(``torch.ops.fastdiff.fused_step``) per stage. Everything the loop needs (coefficients, model times,
seeds) is placed on the device before it starts; NaN/Inf are recorded by the kernel and checked once
at the end, so the loop never waits on the host.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

import fastdiff.kernels.op  # noqa: F401  (registers torch.ops.fastdiff.fused_step)
from fastdiff.graphs import (DEFAULT_MAX_GRAPHS, GraphCache, StaticBuffers, capture, graph_key, kwargs_spec,
                             resolve_cuda_graph)
from fastdiff.guidance import Guidance, check_double_batch, guided_outputs, make_guidance, rescale_noise_cfg
from fastdiff.kernels.philox import derive_seeds, philox_normal
from fastdiff.likelihood import encode, log_likelihood
from fastdiff.adaptive import SPECIAL_SAMPLERS, run_special
from fastdiff.diffusers_call import DiffusersModel, scheduler_call, scheduler_grid
from fastdiff.diffusers_setup import SchedulerSetup, scheduler_setup
from fastdiff.checks import NonFiniteError  # noqa: F401  (re-exported: fastdiff.pipeline.NonFiniteError)
from fastdiff.checks import (NO_NONFINITE, check_callback, check_model_kwargs, check_model_output, check_noise,
                             check_shape, raise_if_nonfinite)
from fastdiff.program import Program, build_program
from fastdiff.request import SampleRequest, SeedLike, fold_sampler_options
from fastdiff.samplers import ALL_PREDICTIONS, get_sampler
from fastdiff.schedule import Grid, Schedule
from fastdiff.x0_clip import X0Clip

INITIAL_NOISE_STREAM = 1
STEP_NOISE_STREAM = 0
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_EAGER_ONLY = object()  # graph-cache marker: capture failed for this key under cuda_graph="auto"



PROGRAM_CACHE_SIZE = 64
"""How many coefficient programs a Pipeline keeps (least recently used first out)."""


def _program_key(pipe: "Pipeline", sampler: str, steps: int, spacing: str, steps_offset: int, rho: float,
                 options: Mapping[str, Any]) -> Optional[tuple]:
    """What a program built on a spaced grid depends on; None when an option is not hashable (then it is not
    cached). The schedule and x0 limit are held by identity and value, so replacing either misses the cache."""
    key = (pipe.schedule, pipe.prediction, pipe.device, pipe.x0_clip, sampler, steps, spacing, steps_offset, rho,
           tuple(sorted(options.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class Pipeline:
    """Samples a diffusion network with fastdiff's fused samplers.

    Args:
        model: any callable ``model(x, t, **model_kwargs)`` returning a tensor shaped like ``x``; ``t`` is a
            float tensor [B] in the schedule's model-time convention (:meth:`Schedule.model_time`).
        schedule: the :class:`Schedule` the network was trained with.
        prediction: what the network predicts: ``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``.
        device: where sampling runs; default: the model's parameters' device, else CUDA when available.
        dtype: the state's dtype (float32, float16 or bfloat16); arithmetic is float32, coefficients float64.
        max_graphs: how many captured CUDA graphs :meth:`sample` keeps (LRU; :meth:`clear_graphs` frees them).
        sample_shape: the shape of one sample, when the network has a fixed one (``pipe.sample((n,
            *pipe.sample_shape))``); None if any shape goes.
        num_classes: class labels the network takes as ``y`` (0: none); label ``num_classes`` is the null
            class classifier-free guidance evaluates (fastdiff's own networks).
        x0_clip: limit the x0 estimate every step uses (diffusers' ``clip_sample`` / ``thresholding``;
            :class:`fastdiff.x0_clip.X0Clip`), or None.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: Schedule, prediction: str = "eps",
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, sample_shape: Optional[Sequence[int]] = None,
                 num_classes: int = 0, x0_clip: Optional[X0Clip] = None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **kwargs), got {type(model).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
        if prediction not in ALL_PREDICTIONS:
            raise ValueError(f"prediction must be one of {ALL_PREDICTIONS}, got {prediction!r}")
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.device = torch.device(device) if device is not None else _default_device(model)
        self.dtype = dtype
        self.max_graphs = max_graphs
        self._graphs = GraphCache(max_graphs)
        self.sample_shape = None if sample_shape is None else check_shape((1, *sample_shape))[1:]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        if x0_clip is not None and not isinstance(x0_clip, X0Clip):
            raise TypeError(f"x0_clip must be a fastdiff.x0_clip.X0Clip or None, got {type(x0_clip).__name__}")
        self.x0_clip = x0_clip
        self.metadata: dict = {}
        self._programs: OrderedDict = OrderedDict()  # program key -> Program (see program())
        self._programs_lock = threading.Lock()

    @staticmethod
    def from_diffusers(model: Any, scheduler: Any, **pipeline_kwargs: Any) -> "DiffusersPipeline":
        """A pipeline for a diffusers model (or any callable) and its scheduler (a diffusers scheduler, its
        config, or a ``FastdiffScheduler``): the schedule, prediction type, timestep convention, default sampler
        and grid of that scheduler class (:class:`DiffusersPipeline`); ``pipeline_kwargs`` go to
        :class:`Pipeline` (device, dtype, max_graphs, sample_shape, ...)."""
        return DiffusersPipeline(model, scheduler_setup(scheduler), **pipeline_kwargs)

    # ------------------------------------------------------------------ public API
    def initial_noise(self, shape: Sequence[int], seed: SeedLike = 0) -> torch.Tensor:
        """The x_T :meth:`sample` starts from for these seeds: prior_std * Philox normals (stream 1)."""
        shape = check_shape(shape)
        seeds = derive_seeds(seed, shape[0]).to(self.device)
        numel = 1
        for s in shape[1:]:
            numel *= s
        z = philox_normal(seeds, numel, 0, INITIAL_NOISE_STREAM).reshape(shape)
        return (z * self.schedule.prior_std).to(self.dtype)

    def sample(
        self,
        shape: Union[Sequence[int], SampleRequest],
        sampler: str = "ddim",
        steps: int = 50,
        eta: Optional[float] = None,
        seed: SeedLike = 0,
        spacing: Optional[str] = None,
        x_T: Optional[torch.Tensor] = None,
        return_x0: bool = False,
        progress: bool = True,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        noise: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
        variance_type: str = "fixed_small",
        steps_offset: int = 0,
        rho: float = 7.0,
        cuda_graph: Union[str, bool] = "auto",
        guidance_scale: float = 1.0,
        uncond_kwargs: Optional[Mapping[str, Any]] = None,
        guidance_rescale: float = 0.0,
        guidance_batching: str = "double",
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Any]] = None,
        callback_steps: int = 1,
        return_trajectory: bool = False,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
        grid: Optional[Grid] = None,
        **sampler_options: Any,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Draws samples of shape ``shape`` = (batch, ...) with ``sampler`` over ``steps`` steps.

        Args:
            shape: (batch, *sample_shape); or a :class:`fastdiff.request.SampleRequest` (the type the serving
                engine and the HTTP API take), whose fields then replace ``sampler``, ``steps``, ``seed``,
                ``spacing``, ``steps_offset``, ``rho``, guidance, conditioning and sampler options.
            sampler: a name from :func:`fastdiff.samplers.list_samplers`.
            steps: number of sampler steps (>= 1; <= num_train_timesteps for discrete schedules).
            eta: the noise level of the samplers that take one (``SamplerInfo.options``): ddim (default 0),
                euler_ancestral and the dpmpp_*_sde samplers (default 1). ``None`` keeps the sampler's default.
            seed: an int (sample b gets a seed derived from it and b) or one int per sample; a sample's
                result depends on its own seed alone, not on the batch it is drawn in.
            spacing: the time grid's spacing (:meth:`Schedule.grid`); default per schedule and sampler
                (:meth:`SamplerInfo.default_spacing`: "trailing" for multistep solvers on discrete schedules).
            x_T: the initial state (default :meth:`initial_noise` for ``seed``).
            return_x0: also return the x0 estimate of every step, stacked as [steps, *shape].
            progress: show a progress bar.
            model_kwargs: extra keyword arguments for every model call (conditioning).
            noise: explicit noise instead of Philox noise, indexable by stage: ``noise[k]`` shaped like
                the state (for parity with other libraries' generators).
            variance_type: ddpm's ``"fixed_small"`` or ``"fixed_large"``.
            steps_offset, rho: passed to :meth:`Schedule.grid`.
            cuda_graph: ``"auto"`` runs the whole loop as one replayed CUDA graph where that applies (CUDA,
                fixed-step sampler, no explicit noise list, no callback) and eagerly otherwise; ``True``
                insists (ValueError where it cannot apply); ``False`` is always eager. Graph and eager
                give the same samples for the same seeds (see :mod:`fastdiff.graphs`).
            guidance_scale: classifier-free guidance weight w: the step uses ``m_u + w (m_c - m_u)``;
                1 (with no ``uncond_kwargs``) turns guidance off.
            uncond_kwargs: the model kwargs of the unconditional evaluation (default: none at all).
            guidance_rescale: diffusers' ``guidance_rescale`` (``rescale_noise_cfg``), in [0, 1].
            guidance_batching: ``"double"`` (one model call on the doubled batch, conditional rows
                first) or ``"separate"`` (two calls). See :mod:`fastdiff.guidance`.
            callback: ``callback(step, x, x0_hat)`` after every sampler step with
                ``step % callback_steps == 0`` (as diffusers); ``x`` is the state after the step and
                ``x0_hat`` that step's x0 estimate, both buffers the loop reuses (clone to keep).
            callback_steps: see ``callback`` (an int >= 1).
            return_trajectory: also return the state at every step boundary, stacked as
                [steps + 1, *shape] (x_T first, the samples last).
            timesteps: run on these network times instead of a spaced grid (diffusers' meaning: what the
                network is fed at each step, noisiest first; :meth:`Schedule.grid_from_timesteps`); ``steps``
                and ``spacing`` are then unused (``spacing`` must be None).
            sigmas: run on these k-diffusion/diffusers sigmas (``sigma / alpha``, noisiest first, an optional
                final 0; :meth:`Schedule.grid_from_sigmas`). At most one of ``timesteps``, ``sigmas`` and ``grid``.
            grid: run on this :class:`Grid` (e.g. a diffusers scheduler's own, :mod:`fastdiff.diffusers`).
            sampler_options: the sampler's own options (``SamplerInfo.options`` lists them).

        Returns:
            The samples; with ``return_x0`` and/or ``return_trajectory`` a tuple
            ``(samples, x0_estimates?, trajectory?)`` in that order.

        Raises:
            NonFiniteError: when the state became NaN/Inf (names the first step and the samples).
        """
        if isinstance(shape, SampleRequest):
            request = shape
            sampler, steps, seed, spacing = request.sampler, request.steps, request.seed, request.spacing
            steps_offset, rho = request.steps_offset, request.rho
            guidance_scale, guidance_rescale = request.guidance_scale, request.guidance_rescale
            model_kwargs, uncond_kwargs = request.model_kwargs, request.uncond_kwargs
            sampler_options = dict(request.options)
            shape = request.shape
        shape = check_shape(shape)
        sampler_options = fold_sampler_options(eta, variance_type, sampler_options)
        SampleRequest(n=shape[0], sample_shape=shape[1:], sampler=sampler, steps=steps, seed=seed, spacing=spacing,
                      steps_offset=steps_offset, rho=rho, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, model_kwargs=model_kwargs or {},
                      uncond_kwargs=uncond_kwargs, options=sampler_options).validate(self)
        info = get_sampler(sampler)
        explicit_grid = _explicit_grid(self.schedule, timesteps, sigmas, spacing, grid)
        spacing = spacing if spacing is not None else info.default_spacing(self.schedule)
        if sampler in SPECIAL_SAMPLERS:  # eager loops: cuda_graph=True is an error for them, "auto" falls back
            if explicit_grid is not None:
                raise ValueError(f"sampler {sampler!r} takes no timesteps or sigmas")
            if self.x0_clip is not None:
                raise ValueError(f"sampler {sampler!r} cannot limit x0 (x0_clip); use a coefficient-program sampler")
            resolve_cuda_graph(cuda_graph, self.device, adaptive=True)
        # -- issue 4: samplers that are not one fixed coefficient program (fastdiff/adaptive.py) --
        if sampler in SPECIAL_SAMPLERS:
            if guidance_scale != 1.0 or callback is not None or return_trajectory:
                raise ValueError(f"sampler {sampler!r} takes no guidance_scale, callback or return_trajectory")
            return run_special(self, sampler, shape, steps, seed, spacing, x_T, return_x0, progress,
                               dict(model_kwargs or {}), noise, steps_offset, rho, sampler_options)
        prog = self.program(sampler, steps, spacing, steps_offset, rho, grid=explicit_grid, **sampler_options)
        grid, steps = prog.grid, prog.grid.steps
        guidance = make_guidance(guidance_scale, guidance_rescale, guidance_batching, uncond_kwargs)
        check_callback(callback, callback_steps)
        seeds = derive_seeds(seed, shape[0]).to(self.device)
        x = self._initial_state(shape, seed, x_T)
        check_noise(noise, prog, shape)
        kwargs = dict(model_kwargs or {})
        uncond = None
        if guidance is not None:
            uncond = dict(uncond_kwargs or {})
            if guidance.batching == "double":
                check_double_batch(kwargs, uncond)
        spec, bad = kwargs_spec(kwargs)
        uspec, ubad = kwargs_spec(uncond) if uncond is not None else (None, ())
        use_graph = resolve_cuda_graph(cuda_graph, self.device, explicit_noise=noise is not None,
                                       callback=callback is not None, unhashable_kwargs=bad + ubad)
        if use_graph:
            options = dict(sampler_options, spacing=spacing, steps_offset=steps_offset, rho=rho, x0_clip=self.x0_clip,
                           grid=None if explicit_grid is None else tuple(float(v) for v in grid.t))
            key = graph_key(shape=shape, dtype=self.dtype, device=self.device, sampler=sampler, steps=steps,
                            options=options, guidance=None if guidance is None else guidance.key(),
                            model_kwargs=spec, uncond_kwargs=uspec, return_x0=return_x0,
                            return_trajectory=return_trajectory)
            graphed = self._run_graph(key, prog, x, seeds, kwargs, uncond, guidance, return_x0, return_trajectory,
                                      strict=cuda_graph is True)
            use_graph = graphed is not None
            if use_graph:
                out, x0, traj = graphed
        if not use_graph:
            out, x0, traj = self._run_eager(prog, x, seeds, kwargs, noise, return_x0, progress, uncond=uncond,
                                            guidance=guidance, callback=callback, callback_steps=callback_steps,
                                            return_trajectory=return_trajectory)
        extra = ((x0,) if return_x0 else ()) + ((traj,) if return_trajectory else ())
        return (out, *extra) if extra else out

    __call__ = sample

    def program(self, sampler: str, steps: int, spacing: Optional[str] = None, steps_offset: int = 0,
                rho: float = 7.0, grid: Optional[Grid] = None, **sampler_options: Any) -> Program:
        """The coefficient program :meth:`sample` runs for these settings: ``sampler`` on ``grid``, or else on
        ``steps`` steps of the spaced grid (``spacing`` default per sampler and schedule), with the pipeline's
        x0 limit applied. The serving engine builds its rows' programs here too, so both run the same one."""
        key = None
        if grid is None:
            if spacing is None:
                spacing = get_sampler(sampler).default_spacing(self.schedule)
            key = _program_key(self, sampler, steps, spacing, steps_offset, rho, sampler_options)
            if key is not None:
                with self._programs_lock:  # pipelines are shared between threads (a server's, a user's)
                    cached = self._programs.get(key)
                    if cached is not None:
                        self._programs.move_to_end(key)
                        return cached
            grid = self.schedule.grid(steps, spacing=spacing, steps_offset=steps_offset, rho=rho)
        prog = build_program(self.schedule, grid, sampler, self.prediction, self.device, **sampler_options)
        prog = prog if self.x0_clip is None else self.x0_clip.program(prog)
        if key is not None:  # a program is read-only once built: calls with the same settings share it
            with self._programs_lock:
                self._programs[key] = prog
                while len(self._programs) > PROGRAM_CACHE_SIZE:
                    self._programs.popitem(last=False)
        return prog

    # ------------------------------------------------------------------ the loop
    def _run(self, prog: Program, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict, noise: Any,
             return_x0: bool, progress: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The eager loop without guidance, callback or trajectory: (samples, x0 estimates or None)."""
        out, x0_all, _ = self._run_eager(prog, x, seeds, kwargs, noise, return_x0, progress)
        return out, x0_all

    def _run_eager(self, prog: Program, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict, noise: Any,
                   return_x0: bool, progress: bool, *, uncond: Optional[dict] = None,
                   guidance: Optional[Guidance] = None, callback: Optional[Callable[..., Any]] = None,
                   callback_steps: int = 1, return_trajectory: bool = False
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The eager loop: (samples, x0 estimates or None, trajectory or None); checks NaN/Inf once at the end."""
        times = prog.model_times(x.shape[0])  # made before the loop (and any graph capture)
        out, x0_all, traj, nonfinite = self._loop(prog, x, seeds, times, kwargs, uncond, guidance, noise, return_x0,
                                                  return_trajectory, callback, callback_steps, progress)
        raise_if_nonfinite(nonfinite, prog)
        return out, x0_all, traj

    def _loop(self, prog: Program, x: torch.Tensor, seeds: torch.Tensor, model_times: torch.Tensor, kwargs: dict,
              uncond: Optional[dict], guidance: Optional[Guidance], noise: Any, return_x0: bool,
              return_trajectory: bool, callback: Optional[Callable[..., Any]], callback_steps: int,
              progress: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """Every stage: the model call(s), then one ``fastdiff.fused_step``. ``x`` is read, never written.

        Per-stage views (times, x0 rows, trajectory rows) are taken before the loop, so the only framework
        ops between model calls are the fused steps (and, with guidance_rescale, its torch ops). Nothing
        here reads device values on the host, so the same code is what a CUDA graph captures.
        """
        batch, steps = x.shape[0], prog.grid.steps
        times = model_times.unbind(0)
        slots = [torch.empty_like(x) for _ in range(prog.slots)]
        scratch = [torch.empty_like(x), torch.empty_like(x)]
        x0_all = x.new_empty((steps, *x.shape)) if return_x0 else None
        x0_rows = x0_all.unbind(0) if x0_all is not None else None
        x0_scratch = torch.empty_like(x) if (callback is not None and x0_all is None) else None
        traj = x.new_empty((steps + 1, *x.shape)) if return_trajectory else None
        traj_rows = traj.unbind(0) if traj is not None else None
        if traj is not None:
            traj_rows[0].copy_(x)
        nonfinite = torch.full((batch,), NO_NONFINITE, dtype=torch.int32, device=x.device)
        bounds = None if self.x0_clip is None else self.x0_clip.bounds(batch, x.device)
        # What each stage reads and writes, looked up once rather than per step.
        step_of = [prog.step_of(k) for k in range(prog.stages)]
        plan = [(step_of[k], k == prog.stages - 1 or step_of[k + 1] != step_of[k], prog.calls_model(k),
                 [slots[i] for i in prog.reads(k)], slots[prog.writes(k)] if prog.writes(k) >= 0 else None,
                 prog.uses_noise(k)) for k in range(prog.stages)]
        cur = x
        # A disabled tqdm still costs ~50 us to set up: plain range without a progress bar.
        stages = range(prog.stages)
        if progress:
            stages = tqdm(stages, desc=f"fastdiff {prog.sampler}", leave=False)
        for k in stages:
            step, last_of_step, calls_model, reads, h_out, uses_noise = plan[k]
            nxt = traj_rows[step + 1] if (traj_rows is not None and last_of_step) else \
                (scratch[0] if cur is not scratch[0] else scratch[1])
            m, m_u, w = cur, None, 1.0  # stages without a network call read m with c_m = 0
            if calls_model:
                if guidance is None:
                    m = self.model(cur, times[k], **kwargs)
                    check_model_output(m, cur, k)
                else:
                    m, m_u = guided_outputs(self.model, cur, times[k], kwargs, uncond, guidance)
                    check_model_output(m, cur, k)
                    check_model_output(m_u, cur, k)
                    w = guidance.scale
                    if guidance.rescale != 0.0:
                        # Not linear in m (per-sample std), so formed here rather than in the kernel.
                        m = rescale_noise_cfg(m_u + w * (m - m_u), m, guidance.rescale)
                        m_u, w = None, 1.0
                m = m.contiguous()
                m_u = m_u.contiguous() if m_u is not None else None
            x0_out = x0_rows[step] if x0_rows is not None else x0_scratch
            torch.ops.fastdiff.fused_step(
                cur, m, m_u, w, reads, prog.coef_device, k, seeds, STEP_NOISE_STREAM, uses_noise,
                None if noise is None else noise[k].to(cur), nxt, h_out, x0_out, nonfinite,
                clip=None if bounds is None else bounds(cur, m, m_u, w, prog.coef[k]))
            cur = nxt
            if callback is not None and last_of_step and step % callback_steps == 0:
                callback(step, cur, x0_out)
        return cur, x0_all, traj, nonfinite

    def _run_graph(self, key: tuple, prog: Program, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict,
                   uncond: Optional[dict], guidance: Optional[Guidance], return_x0: bool,
                   return_trajectory: bool, strict: bool = True
                   ) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """Replays (capturing on a cache miss) the whole loop as one CUDA graph; returns fresh tensors.

        When the capture fails (a model that syncs with the host or allocates pinned memory cannot be
        captured) it raises if ``strict`` (``cuda_graph=True``), else remembers the key as eager-only and
        returns None so the caller runs the eager loop (``cuda_graph="auto"``).
        """
        def values() -> dict:
            vals = {"x": x, "seeds": seeds}
            vals.update({f"c:{n}": v for n, v in kwargs.items() if isinstance(v, torch.Tensor)})
            vals.update({f"u:{n}": v for n, v in (uncond or {}).items() if isinstance(v, torch.Tensor)})
            return vals

        def create():
            inputs = StaticBuffers(values())
            times = prog.model_times(x.shape[0])  # made before the loop (and any graph capture)

            def loop(buf: StaticBuffers):
                ckw = {n: buf[f"c:{n}"] if f"c:{n}" in buf else v for n, v in kwargs.items()}
                ukw = None if uncond is None else \
                    {n: buf[f"u:{n}"] if f"u:{n}" in buf else v for n, v in uncond.items()}
                out, x0_all, traj, nonfinite = self._loop(prog, buf["x"], buf["seeds"], times, ckw, ukw, guidance,
                                                          None, return_x0, return_trajectory, None, 1, False)
                return out, x0_all, traj, nonfinite

            return capture(loop, inputs, keep_alive=(prog, times))

        entry = self.graphs.get(key)
        if entry is _EAGER_ONLY:
            if strict:
                raise ValueError("cuda_graph=True: this model could not be captured in a CUDA graph earlier "
                                 "(see the first error); use cuda_graph='auto' or False")
            return None
        # Static buffers and graph memory are ordinary (non-inference) tensors without autograd history, so
        # one cached graph serves calls made inside and outside torch.inference_mode().
        with torch.inference_mode(False), torch.no_grad():
            if entry is None:
                try:
                    entry = create()
                except Exception:
                    if strict:
                        raise
                    self.graphs.put(key, _EAGER_ONLY)
                    return None
                self.graphs.put(key, entry)
            out, x0_all, traj, nonfinite = entry.replay(values())
        raise_if_nonfinite(nonfinite, entry.keep_alive[0])
        return out.clone(), None if x0_all is None else x0_all.clone(), None if traj is None else traj.clone()

    @property
    def graphs(self) -> GraphCache:
        """The LRU of captured CUDA graphs (bounded by ``max_graphs``)."""
        return self._graphs

    def clear_graphs(self) -> None:
        """Frees every captured CUDA graph (and its memory pool) this pipeline holds."""
        self.graphs.clear()

    def _initial_state(self, shape: tuple[int, ...], seed: SeedLike, x_T: Optional[torch.Tensor]) -> torch.Tensor:
        if x_T is None:
            return self.initial_noise(shape, seed).contiguous()
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        return x_T.to(device=self.device, dtype=self.dtype).contiguous().clone()

    # ------------------------------------------------------------------ programs, likelihood, inversion
    def run_program(self, program: Program, x: torch.Tensor, seed: SeedLike = 0, progress: bool = False,
                    model_kwargs: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
        """Runs a coefficient program (:func:`fastdiff.program.build_program`) from state ``x``.

        ``x`` ([batch, ...], not modified) is taken at the program grid's first point and the state at its
        last point is returned, in the pipeline's dtype. A DDIM program on a grid running from low to
        high t is DDIM inversion (see :func:`fastdiff.likelihood.encode`). ``seed`` keys the noise of
        stochastic programs as in :meth:`sample`.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        state = x.detach().to(device=self.device, dtype=self.dtype).contiguous().clone()
        check_shape(state.shape)
        seeds = derive_seeds(seed, state.shape[0]).to(self.device)
        kwargs = dict(model_kwargs or {})
        check_model_kwargs(kwargs, state.shape[0])
        out, _ = self._run(program, state, seeds, kwargs, None, False, progress)
        return out

    def log_likelihood(self, x0: torch.Tensor, method: str = "exact", n_probes: int = 1, probe: str = "rademacher",
                       rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0, dtype: Optional[torch.dtype] = None,
                       bits_per_dim: bool = False, batch_size: Optional[int] = None,
                       **kwargs: Any) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """Per-sample log p(x0) through the probability-flow ODE: :func:`fastdiff.likelihood.log_likelihood`.

        Further keyword arguments (``autodiff``, ``model_kwargs``, ``max_steps``, ``return_info``) are passed on.
        """
        return log_likelihood(self, x0, method=method, n_probes=n_probes, probe=probe, rtol=rtol, atol=atol,
                              seed=seed, dtype=dtype, bits_per_dim=bits_per_dim, batch_size=batch_size, **kwargs)

    def encode(self, x0: torch.Tensor, steps: int = 50, sampler: str = "ddim", **kwargs: Any) -> torch.Tensor:
        """The PF-ODE's latent code x_T of ``x0`` (DDIM inversion or rk45): :func:`fastdiff.likelihood.encode`.

        ``self.sample(x0.shape, sampler=sampler, steps=steps, x_T=code)`` decodes it.
        """
        return encode(self, x0, steps=steps, sampler=sampler, **kwargs)


def _default_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _explicit_grid(schedule: Schedule, timesteps: Any, sigmas: Any, spacing: Optional[str],
                   grid: Optional[Grid] = None) -> Optional[Grid]:
    """The grid of ``timesteps``, ``sigmas`` or ``grid`` when one is given (ValueError for two, or with ``spacing``)."""
    if timesteps is None and sigmas is None and grid is None:
        return None
    if (timesteps is not None) + (sigmas is not None) + (grid is not None) > 1:
        raise ValueError("pass at most one of timesteps, sigmas and grid")
    if grid is not None and not isinstance(grid, Grid):
        raise TypeError(f"grid must be a fastdiff.Grid, got {type(grid).__name__}")
    if spacing is not None:
        raise ValueError("spacing applies to spaced grids; it cannot be combined with timesteps or sigmas")
    if grid is not None:
        return grid
    return schedule.grid_from_timesteps(timesteps) if timesteps is not None else schedule.grid_from_sigmas(sigmas)


class DiffusersPipeline(Pipeline):
    """A :class:`Pipeline` with a diffusers scheduler's defaults (``Pipeline.from_diffusers``): the sampler that is
    that scheduler class's algorithm, its options, its x0 limit, and its own grid for any step count
    (:mod:`fastdiff.diffusers_call`). ``setup`` is the :class:`~fastdiff.diffusers_setup.SchedulerSetup` of the
    scheduler config."""

    def __init__(self, model: Callable[..., Any], setup: SchedulerSetup, **pipeline_kwargs: Any):
        pipeline_kwargs.setdefault("x0_clip", setup.x0_clip)
        super().__init__(DiffusersModel(model), setup.schedule, prediction=setup.prediction, **pipeline_kwargs)
        self.setup = setup

    def diffusers_grid(self, steps: Optional[int] = None, timesteps: Optional[Sequence[float]] = None,
                       sigmas: Optional[Sequence[float]] = None, **set_timesteps_kwargs: Any) -> tuple[Grid, float]:
        """The scheduler's own grid for ``steps`` (or explicit ``timesteps`` / ``sigmas``) and the factor that
        turns diffusers' ``latents`` into fastdiff's native x_T on it."""
        return scheduler_grid(self.setup, steps, timesteps, sigmas, **set_timesteps_kwargs)

    def sample(self, shape: Sequence[int], sampler: Optional[str] = None, steps: int = 50,
               x_T: Optional[torch.Tensor] = None, timesteps: Optional[Sequence[float]] = None,
               sigmas: Optional[Sequence[float]] = None, spacing: Optional[str] = None,
               generator: Optional[torch.Generator] = None, mu: Optional[float] = None,
               **kwargs: Any) -> Any:
        """:meth:`Pipeline.sample` on the scheduler's own grid, sampler and options by default.

        Args:
            shape, steps, timesteps, sigmas: as diffusers' ``set_timesteps`` takes them (steps when neither
                timesteps nor sigmas is given).
            sampler: default the scheduler class's algorithm (with its config's options; options passed
                here override them).
            x_T: diffusers' ``latents`` (the initial noise before ``init_noise_sigma`` scaling); default the
                seeded Philox noise of :meth:`initial_noise`.
            spacing: instead of the scheduler's grid, fastdiff's own spaced grid (``x_T`` then is the native
                initial state).
            generator: draw the step noise from this generator exactly as the scheduler's ``step`` does
                (same order, same shapes), instead of the seeded Philox noise.
            mu: diffusers' ``mu`` for flow schedulers with ``use_dynamic_shifting``.
            kwargs: the rest of :meth:`Pipeline.sample` (guidance_scale, model_kwargs, uncond_kwargs, eta, seed,
                noise, return_x0, ...).
        """
        call = scheduler_call(self.setup, shape, sampler, steps, x_T, timesteps, sigmas, spacing, generator, mu,
                              kwargs, self.device, self.dtype)
        return call.finish(super().sample(shape, **call.kwargs))

    __call__ = sample
