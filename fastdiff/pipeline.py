"""``fastdiff.Pipeline``: sample a user's network with any fixed-step sampler.

The loop calls the network once per stage and applies one fused step op
(``torch.ops.fastdiff.fused_step``) per stage. Everything the loop needs (coefficients, model times,
seeds) is placed on the device before it starts; NaN/Inf are recorded by the kernel and checked once
at the end, so the loop never waits on the host.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

import fastdiff.kernels.op  # noqa: F401  (registers torch.ops.fastdiff.fused_step)
from fastdiff.kernels.philox import derive_seeds, philox_normal
from fastdiff.program import Program, build_program
from fastdiff.samplers import ALL_PREDICTIONS, get_sampler
from fastdiff.schedule import Schedule

SeedLike = Union[int, Sequence[int], torch.Tensor]
INITIAL_NOISE_STREAM = 1
STEP_NOISE_STREAM = 0
_NO_NONFINITE = torch.iinfo(torch.int32).max
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(FloatingPointError):
    """The sampler state became NaN or Inf; ``step`` is the first bad step, ``samples`` the affected rows."""

    def __init__(self, step: int, samples: list[int]):
        self.step = step
        self.samples = samples
        super().__init__(f"the sampler state became NaN/Inf at step {step} in samples {samples} "
                         "(check the model's output there, the prediction type and the schedule's ends)")


class Pipeline:
    """Samples a diffusion network with fastdiff's fused samplers.

    Args:
        model: any callable ``model(x, t, **model_kwargs)`` returning a tensor shaped like ``x``; ``t`` is a
            float tensor [B] in the schedule's model-time convention (:meth:`Schedule.model_time`).
        schedule: the :class:`Schedule` the network was trained with.
        prediction: what the network predicts: ``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``.
        device: where sampling runs; default: the model's parameters' device, else CUDA when available.
        dtype: the state's dtype (float32, float16 or bfloat16); arithmetic is float32, coefficients float64.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: Schedule, prediction: str = "eps",
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None):
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

    # ------------------------------------------------------------------ public API
    def initial_noise(self, shape: Sequence[int], seed: SeedLike = 0) -> torch.Tensor:
        """The x_T :meth:`sample` starts from for these seeds: prior_std * Philox normals (stream 1)."""
        shape = _check_shape(shape)
        seeds = derive_seeds(seed, shape[0]).to(self.device)
        numel = 1
        for s in shape[1:]:
            numel *= s
        z = philox_normal(seeds, numel, 0, INITIAL_NOISE_STREAM).reshape(shape)
        return (z * self.schedule.prior_std).to(self.dtype)

    def sample(
        self,
        shape: Sequence[int],
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
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
        **sampler_options: Any,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Draws samples of shape ``shape`` = (batch, ...) with ``sampler`` over ``steps`` steps.

        Args:
            shape: (batch, *sample_shape).
            sampler: a name from :func:`fastdiff.samplers.list_samplers`.
            steps: number of sampler steps (>= 1; <= num_train_timesteps for discrete schedules).
            eta: DDIM's noise level in [0, 1] (ddim only).
            seed: an int (sample b gets a seed derived from it and b) or one int per sample; a sample's
                result depends on its own seed alone, not on the batch it is drawn in.
            spacing: the time grid's spacing (:meth:`Schedule.grid`); default per schedule.
            x_T: the initial state (default :meth:`initial_noise` for ``seed``).
            return_x0: also return the x0 estimate of every step, stacked as [steps, *shape].
            progress: show a progress bar.
            model_kwargs: extra keyword arguments for every model call (conditioning).
            noise: explicit noise instead of Philox noise, indexable by stage: ``noise[k]`` shaped like
                the state (for parity with other libraries' generators).
            variance_type: ddpm's ``"fixed_small"`` or ``"fixed_large"``.
            steps_offset, rho: passed to :meth:`Schedule.grid`.
            sampler_options: the sampler's own options (``SamplerInfo.options`` lists them).

        Returns:
            The samples (and the stacked x0 estimates when ``return_x0``).

        Raises:
            NonFiniteError: when the state became NaN/Inf (names the first step and the samples).
        """
        info = get_sampler(sampler)
        if self.prediction not in info.predictions:
            raise ValueError(f"sampler {sampler!r} cannot use prediction {self.prediction!r}; "
                             f"it accepts {info.predictions}")
        if eta != 0.0:
            sampler_options["eta"] = eta
        if variance_type != "fixed_small":
            sampler_options["variance_type"] = variance_type
        info.check_options(sampler_options)
        shape = _check_shape(shape)
        grid = self.schedule.grid(steps, spacing=spacing, steps_offset=steps_offset, rho=rho)
        prog = build_program(self.schedule, grid, sampler, self.prediction, self.device, **sampler_options)
        seeds = derive_seeds(seed, shape[0]).to(self.device)
        x = self._initial_state(shape, seed, x_T)
        _check_noise(noise, prog, shape)
        kwargs = dict(model_kwargs or {})
        _check_model_kwargs(kwargs, shape[0])
        out, x0 = self._run(prog, x, seeds, kwargs, noise, return_x0, progress)
        return (out, x0) if return_x0 else out

    __call__ = sample

    # ------------------------------------------------------------------ the loop
    def _run(self, prog: Program, x: torch.Tensor, seeds: torch.Tensor, kwargs: dict, noise: Any,
             return_x0: bool, progress: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch = x.shape[0]
        model_times = torch.as_tensor(prog.model_time, dtype=torch.float32).to(self.device)
        model_times = model_times[:, None].expand(-1, batch).contiguous()
        slots = [torch.empty_like(x) for _ in range(prog.slots)]
        buffers = [x, torch.empty_like(x)]
        x0_all = x.new_empty((prog.grid.steps, *x.shape)) if return_x0 else None
        nonfinite = torch.full((batch,), _NO_NONFINITE, dtype=torch.int32, device=self.device)
        for k in tqdm(range(prog.stages), disable=not progress, desc=f"fastdiff {prog.sampler}", leave=False):
            cur, nxt = buffers[k % 2], buffers[(k + 1) % 2]
            if prog.calls_model(k):
                m = self.model(cur, model_times[k], **kwargs)
                _check_model_output(m, cur, k)
                m = m.contiguous()
            else:
                m = cur  # read with c_m = 0 by stages that do not call the network
            write = prog.writes(k)
            torch.ops.fastdiff.fused_step(
                cur, m, None, 1.0, [slots[i] for i in prog.reads(k)], prog.coef_device, k, seeds,
                STEP_NOISE_STREAM, prog.uses_noise(k), None if noise is None else noise[k].to(cur),
                nxt, slots[write] if write >= 0 else None,
                x0_all[prog.step_of(k)] if x0_all is not None else None, nonfinite)
        result = buffers[prog.stages % 2]
        _raise_if_nonfinite(nonfinite, prog)
        return result, x0_all

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
        _check_shape(state.shape)
        seeds = derive_seeds(seed, state.shape[0]).to(self.device)
        kwargs = dict(model_kwargs or {})
        _check_model_kwargs(kwargs, state.shape[0])
        out, _ = self._run(program, state, seeds, kwargs, None, False, progress)
        return out

    def log_likelihood(self, x0: torch.Tensor, method: str = "exact", n_probes: int = 1, probe: str = "rademacher",
                       rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0, dtype: Optional[torch.dtype] = None,
                       bits_per_dim: bool = False, batch_size: Optional[int] = None,
                       **kwargs: Any) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """Per-sample log p(x0) through the probability-flow ODE: :func:`fastdiff.likelihood.log_likelihood`.

        Further keyword arguments (``autodiff``, ``model_kwargs``, ``max_steps``, ``return_info``) are passed on.
        """
        from fastdiff.likelihood import log_likelihood
        return log_likelihood(self, x0, method=method, n_probes=n_probes, probe=probe, rtol=rtol, atol=atol,
                              seed=seed, dtype=dtype, bits_per_dim=bits_per_dim, batch_size=batch_size, **kwargs)

    def encode(self, x0: torch.Tensor, steps: int = 50, sampler: str = "ddim", **kwargs: Any) -> torch.Tensor:
        """The PF-ODE's latent code x_T of ``x0`` (DDIM inversion or rk45): :func:`fastdiff.likelihood.encode`.

        ``self.sample(x0.shape, sampler=sampler, steps=steps, x_T=code)`` decodes it.
        """
        from fastdiff.likelihood import encode
        return encode(self, x0, steps=steps, sampler=sampler, **kwargs)


def _default_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (batch, ...), got {shape!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, *sample_shape) with every size >= 1, got {shape}")
    return shape


def _check_noise(noise: Any, prog: Program, shape: tuple[int, ...]) -> None:
    if noise is None:
        return
    if len(noise) < prog.stages:
        raise ValueError(f"noise must hold one tensor per stage ({prog.stages}), got {len(noise)}")
    for k in range(prog.stages):
        if prog.uses_noise(k) and tuple(noise[k].shape) != shape:
            raise ValueError(f"noise[{k}] must have shape {shape}, got {tuple(noise[k].shape)}")


def _check_model_kwargs(kwargs: dict, batch: int) -> None:
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != batch:
            raise ValueError(f"model_kwargs[{name!r}] has batch size {value.shape[0]}, expected {batch}")


def _check_model_output(m: Any, x: torch.Tensor, stage: int) -> None:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(m).__name__} at stage {stage}")
    if m.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(m.shape)} at stage {stage}; expected {tuple(x.shape)}")
    if not m.is_floating_point():
        raise TypeError(f"the model returned dtype {m.dtype} at stage {stage}; expected a floating dtype")
    if m.device != x.device:
        raise ValueError(f"the model returned a tensor on {m.device}; the state is on {x.device}")


def _raise_if_nonfinite(nonfinite: torch.Tensor, prog: Program) -> None:
    first = int(nonfinite.min())  # the loop's only host sync
    if first != _NO_NONFINITE:
        samples = torch.nonzero(nonfinite != _NO_NONFINITE).flatten().tolist()
        raise NonFiniteError(prog.step_of(first), samples)
