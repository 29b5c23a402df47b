"""``fastdiff.Pipeline``: sample a user's network with any sampler fastdiff knows.

:meth:`Pipeline.sample` builds a :class:`~fastdiff.request.SampleRequest`, plans it (the coefficient program, the
conditioning, what to record) and runs it: the shared loop (:mod:`fastdiff.runtime.loop`) eagerly or as one
replayed CUDA graph, or an eager solver (:mod:`fastdiff.solvers.eager`) for samplers that are not one program.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fastdiff.kernels.philox import derive_seeds, philox_normal
from fastdiff.program import Program, build_program
from fastdiff.request import TUNED_SPACING, SampleOptions, SampleRequest, SeedLike, check_switch
from fastdiff.runtime.checks import (
    NonFiniteError,  # noqa: F401  (re-exported: fastdiff.pipeline.NonFiniteError)
    as_kwargs,
    check_callback,
    check_model_kwargs,
    check_noise,
    check_shape,
)
from fastdiff.runtime.graphs import DEFAULT_MAX_GRAPHS, GraphCache, graph_key, kwargs_spec, resolve_cuda_graph
from fastdiff.runtime.guidance import check_double_batch, make_guidance
from fastdiff.runtime.loop import Conditioning, Inpaint, Loop, LoopResult, Recording
from fastdiff.runtime.step import INITIAL_NOISE_STREAM, STEP_NOISE_STREAM  # noqa: F401  (re-exported)
from fastdiff.runtime.tree import to_device
from fastdiff.runtime.x0_clip import X0Clip
from fastdiff.samplers import ALL_PREDICTIONS, EAGER_SAMPLERS, get_sampler
from fastdiff.schedule import Grid, Schedule
from fastdiff.solvers.eager import run_eager_sampler
from fastdiff.solvers.inversion import encode
from fastdiff.solvers.likelihood import log_likelihood
from fastdiff.solvers.tuned import TunedGrid, TunedGrids, as_tuned_list, weights_fingerprint

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PROGRAM_CACHE_SIZE = 64
"""How many coefficient programs a Pipeline keeps (least recently used first out)."""


def _program_key(
    pipe: Pipeline, sampler: str, steps: int, spacing: str, steps_offset: int, rho: float, options: Mapping[str, Any]
) -> tuple | None:
    """What a program built on a spaced grid depends on; None when an option is not hashable (then it is not
    cached). The schedule and x0 limit are held by identity and value, so replacing either misses the cache."""
    key = (
        pipe.schedule,
        pipe.prediction,
        pipe.device,
        pipe.x0_clip,
        sampler,
        steps,
        spacing,
        steps_offset,
        rho,
        tuple(sorted(options.items())),
    )
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
            :class:`fastdiff.runtime.x0_clip.X0Clip`), or None.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        sample_shape: Sequence[int] | None = None,
        num_classes: int = 0,
        x0_clip: X0Clip | None = None,
    ):
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
            raise TypeError(f"x0_clip must be a fastdiff.runtime.x0_clip.X0Clip or None, got {type(x0_clip).__name__}")
        self.x0_clip = x0_clip
        self.metadata: dict = {}
        self.tuned = TunedGrids()  # grids fitted to this network: sample(..., spacing="tuned")
        self._programs: OrderedDict = OrderedDict()  # program key -> Program (see program())
        self._programs_lock = threading.Lock()
        self._last_run = threading.local()  # per thread: a pipeline is shared between threads

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

    def initial_state(self, shape: Sequence[int], seed: SeedLike = 0, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The state a run starts from: a contiguous copy of ``x_T`` on the pipeline's device and dtype (checked
        against ``shape``), or :meth:`initial_noise` for ``seed``."""
        shape = check_shape(shape)
        if x_T is None:
            return self.initial_noise(shape, seed).contiguous()
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        # Sampling is not differentiated through: a state that requires grad would only break the in-place steps.
        return x_T.detach().to(device=self.device, dtype=self.dtype).contiguous().clone()

    def add_tuned(self, tuned: TunedGrid | Sequence[TunedGrid], fingerprint: str | None = None) -> None:
        """Adds grids fitted to this network (:func:`fastdiff.solvers.tune.tune`) for ``spacing="tuned"``; a
        ValueError for one fitted to weights other than ``fingerprint`` (default: :func:`weights_fingerprint` of
        ``self.model``)."""
        grids = as_tuned_list(tuned)
        fingerprint = weights_fingerprint(self.model) if fingerprint is None and grids else fingerprint
        for grid in grids:
            self.tuned.add(grid, fingerprint)

    def tuned_grid(self, sampler: str, steps: int, guidance_scale: float = 1.0) -> Grid:
        """The :class:`Grid` ``spacing="tuned"`` samples on: the tuned grid for these settings (a ValueError listing
        the tuned settings when there is none)."""
        return self.tuned.find(sampler, steps, guidance_scale).grid(self.schedule)

    def _tuned_grid(self, request: SampleRequest, run: SampleOptions) -> Grid:
        """The grid of ``spacing="tuned"`` in :meth:`sample` (explicit, so a CUDA graph's key holds its times)."""
        if run.timesteps is not None or run.sigmas is not None or run.grid is not None:
            raise ValueError('spacing="tuned" cannot be combined with timesteps, sigmas or grid')
        return self.tuned_grid(request.sampler, request.steps, request.guidance_scale)

    @property
    def last_nfe(self) -> int | None:
        """The network evaluations the calling thread's last :meth:`sample` with an eager sampler (rk45, pc,
        consistency) spent; None before the first."""
        return getattr(self._last_run, "nfe", None)

    def sample(
        self,
        shape: Sequence[int] | SampleRequest,
        sampler: str = "ddim",
        steps: int = 50,
        *,
        seed: SeedLike = 0,
        x_T: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
        jumps: int = 0,
        **options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Draws samples of shape ``shape`` = (batch, ...) with ``sampler`` over ``steps`` steps.

        Args:
            shape: (batch, *sample_shape); or a :class:`fastdiff.request.SampleRequest` (the type the serving
                engine and the HTTP API take), whose fields then replace ``sampler``, ``steps``, ``seed``,
                guidance, conditioning, the grid fields and the sampler options.
            sampler: a name from :func:`fastdiff.samplers.list_samplers`.
            steps: number of sampler steps (>= 1; <= num_train_timesteps for discrete schedules).
            seed: an int (sample b gets a seed derived from it and b) or one int per sample; a sample's
                result depends on its own seed alone, not on the batch it is drawn in.
            x_T: the initial state (default :meth:`initial_noise` for ``seed``).
            model_kwargs: extra keyword arguments for every model call (conditioning).
            guidance_scale: classifier-free guidance weight w: the step uses ``m_u + w (m_c - m_u)``;
                1 (with no ``uncond_kwargs``) turns guidance off.
            uncond_kwargs: the model kwargs of the unconditional evaluation (default: none at all).
            progress: show a progress bar.
            init: image-to-image (SDEdit, diffusers' img2img): the clean images to edit, shaped like the samples.
                The grid is cut where diffusers cuts it for ``strength`` and the run starts from
                ``alpha init + sigma z`` at the cut, z the initial noise of ``seed`` (``x_T / prior_std`` when x_T is
                given), so a sample depends on its seed alone; multistep samplers start their history afresh there.
            strength: how much of the grid image-to-image runs, in (0, 1]: 1 starts at the first point.
            mask: inpainting, with ``init``: 1 regenerates, 0 keeps (diffusers' convention), broadcast to the
                samples. After every step the kept region is ``init`` noised to the step's end (with its own Philox
                noise, or ``init_noise``), after the last step ``init`` itself: diffusers' 4-channel inpainting loop,
                inside the fused step. At strength 1 the run starts from pure noise x_T, as diffusers' does.
            jumps: RePaint's resampling for inpainting (jump length 1): each step is run ``jumps + 1`` times, the
                state noised back to the step's start in between (:func:`fastdiff.program.resampled`); one-stage
                samplers without history only (ddpm, ddim, euler_ancestral, ...).
            options: keyword arguments of three kinds.

                - The grid and guidance fields of :class:`SampleRequest`: ``spacing`` (the time grid's spacing,
                  :meth:`Schedule.grid`; default per schedule and sampler, :meth:`SamplerInfo.default_spacing`;
                  ``"tuned"``: the grid in :attr:`tuned` for the sampler, steps and guidance scale, see docs/tune.md),
                  ``steps_offset`` and ``rho`` (passed to :meth:`Schedule.grid`), ``guidance_rescale``
                  (diffusers' ``rescale_noise_cfg``, in [0, 1]).
                - How the run goes, :class:`~fastdiff.request.SampleOptions`: ``timesteps``, ``sigmas`` or ``grid``
                  (an explicit grid), ``noise``, ``init_noise``, ``return_x0``, ``return_trajectory``, ``callback``,
                  ``callback_steps``, ``cuda_graph`` (``"auto"``, True or False), ``guidance_batching``.
                - The sampler's own options (``SamplerInfo.options`` lists them): ``eta`` for ddim (default 0),
                  euler_ancestral and the dpmpp_*_sde samplers (default 1; None keeps the default),
                  ``variance_type`` for ddpm (``"fixed_small"`` or ``"fixed_large"``), ``s_churn``, ``order``, ...
                  An option the sampler does not take is a ValueError naming what it takes.

        Returns:
            The samples; with ``return_x0`` and/or ``return_trajectory`` a tuple
            ``(samples, x0_estimates?, trajectory?)`` in that order.

        Raises:
            NonFiniteError: when the state became NaN/Inf (names the first step and the samples).
        """
        check_switch("progress", progress)
        if init is not None or mask is not None or strength != 1.0 or jumps != 0:
            options = dict(options, init=init, mask=mask, strength=strength, jumps=jumps)
        run, request = self._request(shape, sampler, steps, seed, model_kwargs, guidance_scale, uncond_kwargs, options)
        x = self.initial_state(request.shape, request.seed, x_T)
        if request.sampler in EAGER_SAMPLERS:
            return self._sample_eager(request, run, x, x_T is not None, progress)
        if request.spacing == TUNED_SPACING:
            grid = self._tuned_grid(request, run)
        else:
            grid = _explicit_grid(self.schedule, run, request.spacing)
        prog = request.program(self, grid=grid)
        inpaint = self._inpaint(request, run)
        x = self.start_state(request, prog.grid, x)
        guidance = make_guidance(
            request.guidance_scale, request.guidance_rescale, run.guidance_batching, request.uncond_kwargs
        )
        check_callback(run.callback, run.callback_steps)
        check_noise(run.noise, prog, request.shape)
        cond = Conditioning(
            dict(request.model_kwargs), None if guidance is None else dict(request.uncond_kwargs or {}), guidance
        )
        if guidance is not None and guidance.batching == "double":
            check_double_batch(cond.kwargs, cond.uncond)
        loop = Loop(
            self.model,
            cond,
            Recording(run.return_x0, run.return_trajectory, run.callback, run.callback_steps, progress),
            self.x0_clip,
            inpaint,
        )
        seeds = derive_seeds(request.seed, request.n).to(self.device)
        result = self._run_graph(loop, request, run, prog, grid, x, seeds)
        if result is None:
            result = loop.run_eager(prog, x, seeds, run.noise)
        extra = ((result.x0,) if run.return_x0 else ()) + ((result.trajectory,) if run.return_trajectory else ())
        return (result.samples, *extra) if extra else result.samples

    __call__ = sample

    def _request(
        self,
        shape: Sequence[int] | SampleRequest,
        sampler: str,
        steps: int,
        seed: SeedLike,
        model_kwargs: Mapping[str, Any] | None,
        guidance_scale: float,
        uncond_kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> tuple[SampleOptions, SampleRequest]:
        """:meth:`sample`'s arguments as (how to run, what to sample), checked."""
        run, fields, sampler_options = SampleOptions.split(options)
        if isinstance(shape, SampleRequest):
            request = shape
        else:
            shape = check_shape(shape)
            request = SampleRequest(
                n=shape[0],
                sample_shape=shape[1:],
                sampler=sampler,
                steps=steps,
                seed=seed,
                guidance_scale=guidance_scale,
                model_kwargs={} if model_kwargs is None else model_kwargs,
                uncond_kwargs=uncond_kwargs,
                options=sampler_options,
                **fields,
            )
        request.validate(self)
        return run, self._on_device(request)

    def start_state(self, request: SampleRequest, grid: Grid, x_T: torch.Tensor) -> torch.Tensor:
        """The state ``request`` starts from on its (cut) ``grid``: ``x_T`` itself, or for image-to-image ``init``
        noised to the grid's first point (:meth:`_noised_init`); inpainting at strength 1 starts from ``x_T``, as
        diffusers' inpainting does."""
        if not request.edits or (request.mask is not None and float(request.strength) == 1.0):
            return x_T
        return self._noised_init(request.init.to(x_T.device), grid, x_T)

    def _noised_init(self, init: torch.Tensor, grid: Grid, x_T: torch.Tensor) -> torch.Tensor:
        """Image-to-image's start: ``init`` forward-noised to the cut grid's first point with the initial noise
        ``x_T / prior_std`` (so at zero terminal SNR and strength 1 it is plain sampling's x_T)."""
        alpha, sigma = float(grid.alpha[0]), float(grid.sigma[0])
        z = x_T.float() / self.schedule.prior_std
        return (alpha * init.float() + sigma * z).to(self.dtype).contiguous()

    def _inpaint(self, request: SampleRequest, run: SampleOptions) -> Inpaint | None:
        """What inpainting blends into the steps (None without a mask): init and mask as the state, the explicit
        known-region noise (``init_noise``) checked."""
        if request.mask is None:
            if run.init_noise is not None:
                raise ValueError("init_noise is the known region's noise: it needs init and mask")
            return None
        noise = run.init_noise
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"init_noise must be a tensor, got {type(noise).__name__}")
            if tuple(noise.shape) != request.shape:
                raise ValueError(f"init_noise must have shape {request.shape}, got {tuple(noise.shape)}")
            noise = noise.detach().to(device=self.device, dtype=self.dtype).contiguous()
        return Inpaint(*request.inpaint_tensors(self.device, self.dtype), noise)

    def _on_device(self, request: SampleRequest) -> SampleRequest:
        """``request`` (not modified) with its conditioning tensors on the pipeline's device: the network and a
        CUDA graph's static buffers read them there (labels made on the CPU, a pipeline on CUDA)."""
        uncond = request.uncond_kwargs
        return dataclasses.replace(
            request,
            model_kwargs=to_device(dict(request.model_kwargs), self.device),
            uncond_kwargs=None if uncond is None else to_device(dict(uncond), self.device),
            init=None if request.init is None else request.init.detach().to(self.device),
        )

    def _sample_eager(
        self, request: SampleRequest, run: SampleOptions, x: torch.Tensor, x_T_given: bool, progress: bool
    ) -> Any:
        """A sampler that is not one coefficient program: eager only, without the loop's extras."""
        sampler = request.sampler
        if run.timesteps is not None or run.sigmas is not None or run.grid is not None:
            raise ValueError(f"sampler {sampler!r} takes no timesteps or sigmas")
        if self.x0_clip is not None:
            raise ValueError(f"sampler {sampler!r} cannot limit x0 (x0_clip); use a coefficient-program sampler")
        resolve_cuda_graph(run.cuda_graph, self.device, adaptive=True)
        if request.guided or run.callback is not None or run.return_trajectory:
            raise ValueError(f"sampler {sampler!r} takes no guidance_scale, callback or return_trajectory")
        out, nfe = run_eager_sampler(self, request, x, x_T_given, run.return_x0, progress, run.noise)
        self._last_run.nfe = nfe
        return out

    def _run_graph(
        self,
        loop: Loop,
        request: SampleRequest,
        run: SampleOptions,
        prog: Program,
        grid: Grid | None,
        x: torch.Tensor,
        seeds: torch.Tensor,
    ) -> LoopResult | None:
        """The run as one replayed CUDA graph where that applies (None: run it eagerly)."""
        spec, bad = kwargs_spec(loop.cond.kwargs)
        uspec, ubad = kwargs_spec(loop.cond.uncond) if loop.cond.uncond is not None else (None, ())
        if not resolve_cuda_graph(
            run.cuda_graph,
            self.device,
            explicit_noise=run.noise is not None or run.init_noise is not None,
            callback=run.callback is not None,
            unhashable_kwargs=bad + ubad,
        ):
            return None
        spacing = (
            request.spacing
            if request.spacing is not None
            else get_sampler(request.sampler).default_spacing(self.schedule)
        )
        options = dict(
            request.options,
            spacing=spacing,
            steps_offset=request.steps_offset,
            rho=request.rho,
            x0_clip=self.x0_clip,
            grid=None if grid is None else tuple(float(v) for v in (*prog.grid.t, *prog.grid.model_time)),
            edit=None if not request.edits else (float(request.strength), request.mask is not None, int(request.jumps)),
        )
        guidance = loop.cond.guidance
        key = graph_key(
            model=self.model,
            schedule=self.schedule,
            prediction=self.prediction,
            shape=request.shape,
            dtype=self.dtype,
            device=self.device,
            sampler=request.sampler,
            steps=prog.grid.steps,
            options=options,
            guidance=None if guidance is None else guidance.key(),
            model_kwargs=spec,
            uncond_kwargs=uspec,
            return_x0=run.return_x0,
            return_trajectory=run.return_trajectory,
        )
        return loop.run_graph(self.graphs, key, prog, x, seeds, strict=run.cuda_graph is True)

    def default_grid(
        self, sampler: str, steps: int, spacing: str | None = None, steps_offset: int = 0, rho: float = 7.0
    ) -> Grid:
        """The grid :meth:`program` runs when it is given none: ``steps`` steps of the spaced grid (``spacing``
        default per sampler and schedule). Image editing cuts this grid for its strength."""
        if spacing is None:
            spacing = get_sampler(sampler).default_spacing(self.schedule)
        return self.schedule.grid(steps, spacing=spacing, steps_offset=steps_offset, rho=rho)

    def program(
        self,
        sampler: str,
        steps: int,
        spacing: str | None = None,
        steps_offset: int = 0,
        rho: float = 7.0,
        grid: Grid | None = None,
        **sampler_options: Any,
    ) -> Program:
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
            grid = self.default_grid(sampler, steps, spacing, steps_offset, rho)
        prog = build_program(self.schedule, grid, sampler, self.prediction, self.device, **sampler_options)
        prog = prog if self.x0_clip is None else self.x0_clip.program(prog)
        if key is not None:  # a program is read-only once built: calls with the same settings share it
            with self._programs_lock:
                self._programs[key] = prog
                while len(self._programs) > PROGRAM_CACHE_SIZE:
                    self._programs.popitem(last=False)
        return prog

    @property
    def graphs(self) -> GraphCache:
        """The LRU of captured CUDA graphs (bounded by ``max_graphs``)."""
        return self._graphs

    def clear_graphs(self) -> None:
        """Frees every captured CUDA graph (and its memory pool) this pipeline holds."""
        self.graphs.clear()

    # ------------------------------------------------------------------ programs, likelihood, inversion
    def run_program(
        self,
        program: Program,
        x: torch.Tensor,
        seed: SeedLike = 0,
        progress: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        noise: Any = None,
    ) -> torch.Tensor:
        """Runs a coefficient program (:func:`fastdiff.program.build_program`) from state ``x``.

        ``x`` ([batch, ...], not modified) is taken at the program grid's first point and the state at its
        last point is returned, in the pipeline's dtype. A DDIM program on a grid running from low to
        high t is DDIM inversion (see :func:`fastdiff.solvers.likelihood.encode`). ``seed`` keys the noise of
        stochastic programs as in :meth:`sample`; ``noise[k]`` replaces stage k's noise.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        state = x.detach().to(device=self.device, dtype=self.dtype).contiguous().clone()
        check_shape(state.shape)
        seeds = derive_seeds(seed, state.shape[0]).to(self.device)
        kwargs = as_kwargs(model_kwargs)
        check_model_kwargs(kwargs, state.shape[0])
        kwargs = to_device(kwargs, self.device)
        return (
            Loop(self.model, Conditioning(kwargs), Recording(progress=progress), self.x0_clip)
            .run_eager(program, state, seeds, noise)
            .samples
        )

    def log_likelihood(
        self, x0: torch.Tensor, method: str = "exact", **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Per-sample log p(x0) through the probability-flow ODE: :func:`fastdiff.solvers.likelihood.log_likelihood`.

        The keyword arguments (``n_probes``, ``probe``, ``seed``, ``dtype``, ``bits_per_dim``, ``batch_size``,
        ``model_kwargs``, ``return_info``, ``solver``) are passed on.
        """
        return log_likelihood(self, x0, method, **kwargs)

    def encode(self, x0: torch.Tensor, steps: int = 50, sampler: str = "ddim", **kwargs: Any) -> torch.Tensor:
        """The PF-ODE's latent code x_T of ``x0`` (DDIM inversion or rk45): :func:`fastdiff.solvers.likelihood.encode`.

        ``self.sample(x0.shape, sampler=sampler, steps=steps, x_T=code)`` decodes it.
        """
        return encode(self, x0, steps=steps, sampler=sampler, **kwargs)


def _default_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _explicit_grid(schedule: Schedule, run: SampleOptions, spacing: str | None) -> Grid | None:
    """The grid of ``timesteps``, ``sigmas`` or ``grid`` when one is given (ValueError for two, or with ``spacing``)."""
    timesteps, sigmas, grid = run.timesteps, run.sigmas, run.grid
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
