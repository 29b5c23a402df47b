"""``FastdiffScheduler``: a drop-in diffusers scheduler whose every step is one fused fastdiff op.

``pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config)`` keeps the diffusers pipeline and
its loop and replaces the scheduler: the algorithm is picked from the config's ``_class_name`` (the same
algorithm, :mod:`fastdiff.diffusers.config`; ``sampler=`` overrides it), ``set_timesteps`` builds that
scheduler's own grid and the float64 coefficient program once, and ``step`` applies one row of it with
``torch.ops.fastdiff.fused_step`` (x0 estimate, clipping, history and noise in one pass). Noise comes from
the ``generator`` the pipeline passes, drawn exactly when and as the original scheduler draws it, so a
pipeline run gives the original scheduler's latents.

Schedulers whose sample is ``x / alpha`` (Euler, Heun, LMS: they scale the model input by
``1 / sqrt(sigma^2 + 1)``) get rows rescaled to read and write that space, so the op still does the whole step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fastdiff.extras import missing_extra

try:
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ModuleNotFoundError as exc:
    raise missing_extra("diffusers", exc) from exc

from fastdiff.diffusers.config import CLASSES, SchedulerSetup, grid_of, scheduler_setup, set_timesteps
from fastdiff.kernels.reference import CH0, CH1, CH2, CM, CX, CX0, CZ, DX, EX
from fastdiff.program import Program, build_program
from fastdiff.runtime.step import fused_step
from fastdiff.samplers import get_sampler
from fastdiff.schedule import Grid

_NO_NONFINITE = torch.iinfo(torch.int32).max
_BOUND: dict[str, type] = {}


@dataclass
class FastdiffSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample after the step; ``pred_original_sample``: that step's x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FastdiffScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running fastdiff's coefficient programs (see the module docstring).

    Args:
        sampler: the fastdiff sampler (default: the algorithm of ``source_class``).
        source_class: the diffusers scheduler class whose config this is and whose algorithm and grid it
            reproduces (``from_config`` takes it from the config's ``_class_name``).
        config: that class's config fields (every math-changing one honoured or refused with a ValueError).
    """

    config_name = "scheduler_config.json"
    _compatibles = sorted(CLASSES)

    def __init__(self, sampler: str | None = None, source_class: str = "DDIMScheduler", **config: Any):
        self.setup: SchedulerSetup = scheduler_setup({**config, "_class_name": source_class})
        if sampler is not None:
            info = get_sampler(sampler)
            if self.setup.prediction not in info.predictions:
                raise ValueError(f"sampler {sampler!r} cannot use prediction {self.setup.prediction!r}")
        self.sampler = sampler or self.setup.sampler
        self.options: dict[str, Any] = dict(self.setup.options) if self.sampler == self.setup.sampler else {}
        self.register_to_config(sampler=sampler, source_class=source_class, **self.setup.config)
        self._peer = self.setup.peer()
        self._grid: Grid | None = None
        self._programs: dict[tuple, tuple[Program, np.ndarray]] = {}
        self._stage: int | None = None
        self._begin_index: int | None = None
        self._slots: list[torch.Tensor] = []
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None

    _bound_source: str | None = None  # set on the classes for_class makes

    @classmethod
    def for_class(cls, source_class: str) -> type[FastdiffScheduler]:
        """A FastdiffScheduler class standing in for the diffusers class ``source_class``: constructed with that
        class's config arguments (``FastdiffScheduler.for_class("DDIMScheduler")(beta_schedule="linear")``), its
        ``from_config`` and ``from_pretrained`` keep that class whatever config they read, as diffusers' own
        classes do. One class per name (made once)."""
        if source_class not in CLASSES:
            raise ValueError(f"source_class must be one of {', '.join(sorted(CLASSES))}, got {source_class!r}")
        bound = _BOUND.get(source_class)
        if bound is None:

            def __init__(self: FastdiffScheduler, sampler: str | None = None, **config: Any) -> None:
                given = config.pop("source_class", source_class)
                if given != source_class:
                    raise ValueError(f"this class runs {source_class}, got source_class={given!r}")
                FastdiffScheduler.__init__(self, sampler=sampler, source_class=source_class, **config)

            bound = _BOUND[source_class] = type(
                f"Fastdiff{source_class}",
                (FastdiffScheduler,),
                {
                    "__init__": __init__,
                    "__module__": __name__,
                    "__doc__": f"FastdiffScheduler running {source_class} (see FastdiffScheduler.for_class).",
                    "_bound_source": source_class,
                },
            )
        return bound

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """From any supported diffusers scheduler's config (its ``_class_name`` becomes ``source_class``)
        or a saved FastdiffScheduler config; ``kwargs`` override fields (``sampler=`` among them)."""
        cfg = dict(getattr(config, "config", config) or {})
        cfg.update(kwargs)
        name = cfg.pop("_class_name", None)
        if name is None and isinstance(config, SchedulerMixin) and not isinstance(config, cls):
            name = type(config).__name__
        source = cfg.pop("source_class", None) or (name if name != cls.__name__ else None)
        if cls._bound_source is not None:
            source = cls._bound_source
        if source is None:
            raise ValueError(
                "the config names no scheduler class (no _class_name or source_class); pass the scheduler "
                "itself, a config with _class_name (as scheduler_config.json has), or source_class="
            )
        scheduler = cls(source_class=source, **{k: v for k, v in cfg.items() if not k.startswith("_")})
        return (scheduler, {}) if return_unused_kwargs else scheduler

    # ------------------------------------------------------------------ diffusers' scheduler interface
    @property
    def order(self) -> int:
        """Network evaluations per listed step as diffusers counts them (2 for Heun)."""
        return int(getattr(self._peer, "order", 1))

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """What the pipeline multiplies its initial latents by (the original scheduler's value)."""
        return getattr(self._peer, "init_noise_sigma", 1.0)

    @property
    def sigmas(self) -> torch.Tensor | None:
        """The original scheduler's sigmas after ``set_timesteps`` (None for timestep-only schedulers)."""
        return getattr(self._peer, "sigmas", None)

    @property
    def step_index(self) -> int | None:
        """Index of the next step into ``timesteps`` (None before the first step)."""
        return self._stage

    @property
    def begin_index(self) -> int | None:
        """The first step's index, when the pipeline set one (image-to-image)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Starts at ``timesteps[begin_index]`` (as diffusers' ``set_begin_index``)."""
        self._begin_index = begin_index
        if hasattr(self._peer, "set_begin_index"):
            self._peer.set_begin_index(begin_index)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        **kwargs: Any,
    ) -> None:
        """The original scheduler's timesteps (for ``num_inference_steps``, or explicit ``timesteps`` /
        ``sigmas``); builds the coefficient program on that grid."""
        if mu is not None:
            kwargs["mu"] = mu
        if device is not None:
            kwargs["device"] = device
        set_timesteps(self._peer, num_inference_steps, timesteps, sigmas, **kwargs)
        self._grid = grid_of(self.setup, self._peer)
        self.timesteps = self._peer.timesteps
        self.num_inference_steps = len(self.timesteps)
        self._programs.clear()
        self._stage = None
        self._begin_index = None
        self._slots = []

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input: the native state (``sample * alpha`` for the x / alpha schedulers)."""
        if not self.setup.spec.y_space:
            return sample
        if self._stage is None:
            self._init_stage(timestep)
        _, scale_in = self._program(0.0, False, sample.device)
        return sample * float(scale_in[self._stage])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> FastdiffSchedulerOutput | tuple[torch.Tensor]:
        """One step: one ``fastdiff.fused_step`` op on the program row of this step.

        ``eta`` (ddim) and ``use_clipped_model_output`` are diffusers' DDIM arguments; ``generator`` /
        ``variance_noise`` give the step noise where the original scheduler draws it.
        """
        if self._grid is None:
            raise ValueError("call set_timesteps before step")
        if self._stage is None:
            self._init_stage(timestep)
        k = self._stage
        prog, _ = self._program(float(eta), bool(use_clipped_model_output), sample.device)
        if k >= prog.stages:
            raise ValueError(f"step called {k + 1} times; the program has {prog.stages} stages")
        x = sample.contiguous()
        m = model_output.contiguous()
        noise = None
        if self.setup.noise_draws(float(timestep), float(eta)) or prog.uses_noise(k):
            noise = (
                variance_noise
                if variance_noise is not None
                else randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            )
        if len(self._slots) < prog.slots:
            self._slots = [torch.zeros_like(x) for _ in range(prog.slots)]
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        nonfinite = torch.full((x.shape[0],), _NO_NONFINITE, dtype=torch.int32, device=x.device)
        seeds = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        clip = None
        if self.setup.x0_clip is not None:
            clip = self.setup.x0_clip.bounds(x.shape[0], x.device)(x, m, None, 1.0, prog.coef[k])
        write = prog.writes(k)
        fused_step(
            x=x,
            m=m,
            history=[self._slots[i] for i in prog.reads(k)],
            coeffs=prog.coef_device,
            stage=k,
            seeds=seeds,
            use_noise=prog.uses_noise(k),
            noise=None if noise is None else noise.to(x).contiguous(),
            x_out=out,
            h_out=self._slots[write] if write >= 0 else None,
            x0_out=x0,
            nonfinite=nonfinite,
            clip=clip,
        )
        self._stage = k + 1
        if not return_dict:
            return (out, x0)
        return FastdiffSchedulerOutput(prev_sample=out, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The original scheduler's forward noising (image-to-image, inpainting)."""
        return self._peer.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ------------------------------------------------------------------ internals
    def _init_stage(self, timestep: Any) -> None:
        if self._begin_index is not None:
            self._stage = self._begin_index
            return
        t = torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device)
        hits = (self.timesteps == t).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t)} is not one of the scheduler's timesteps")
        self._stage = int(hits[1 if len(hits) > 1 else 0])

    def _program(self, eta: float, recompute_eps: bool, device: torch.device) -> tuple[Program, np.ndarray]:
        """The program for these step arguments on ``device`` (cached) and each stage's input scale."""
        key = (eta, recompute_eps, str(device))
        if key not in self._programs:
            options = dict(self.options)
            if "eta" in get_sampler(self.sampler).options and eta:
                options["eta"] = eta
            prog = build_program(
                self.setup.schedule, self._grid, self.sampler, self.setup.prediction, device, **options
            )
            if self.setup.x0_clip is not None:
                prog = self.setup.x0_clip.with_recompute_eps(recompute_eps).program(prog)
            scale_in = np.ones(prog.stages)
            if self.setup.spec.y_space:
                prog, scale_in = _y_space(prog, self.setup, device)
            self._programs[key] = (prog, scale_in)
        return self._programs[key]


def _y_space(prog: Program, setup: SchedulerSetup, device: torch.device) -> tuple[Program, np.ndarray]:
    """Rows that read y = x / alpha at their stage and write y at the next stage's point (history stays native)."""
    sch = setup.schedule
    a_in = np.asarray(sch.alpha(prog.t), dtype=np.float64)
    a_out = np.concatenate([a_in[1:], [float(prog.grid.alpha[-1])]])
    coef = np.array(prog.coef, dtype=np.float64, copy=True)
    coef[:, [CX, DX, EX]] *= a_in[:, None]
    coef[:, [CX, CM, CH0, CH1, CH2, CZ, CX0]] /= a_out[:, None]
    return replace(prog, coef=coef, coef_device=torch.as_tensor(coef, dtype=torch.float64).to(device)), a_in
