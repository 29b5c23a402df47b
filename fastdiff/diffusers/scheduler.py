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

It behaves as the class it stands in for wherever code reads or drives that class (docs/diffusers.md): timesteps
and schedule tables from construction, DDIM/DDPM steps from any timestep they take, diffusers' step index for the
others (a multistep history starting at the first step taken), ``add_noise`` at the step index reached, the config
round trip; :meth:`FastdiffScheduler.for_class` gives a class constructed as a diffusers class is.
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

from fastdiff.diffusers.config import (
    CLASSES,
    SchedulerSetup,
    grid_of,
    scheduler_setup,
    set_timesteps,
    timestep_step_grid,
)
from fastdiff.kernels.reference import CH0, CH1, CH2, CM, CX, CX0, CZ, DX, EM, EX
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
        used_defaults = config.pop("_use_default_values", None)
        self.setup: SchedulerSetup = scheduler_setup({**config, "_class_name": source_class})
        if sampler is not None:
            info = get_sampler(sampler)
            if self.setup.prediction not in info.predictions:
                raise ValueError(f"sampler {sampler!r} cannot use prediction {self.setup.prediction!r}")
        self.sampler = sampler or self.setup.sampler
        self.options: dict[str, Any] = dict(self.setup.options) if self.sampler == self.setup.sampler else {}
        registered = {"sampler": sampler, "source_class": source_class, **self.setup.config}
        # As diffusers' register_to_config: the fields the caller left at their defaults are listed (a saved config
        # holds every field, so a loaded scheduler lists none).
        defaults = sorted(set(self.setup.config) - set(config)) if used_defaults is None else list(used_defaults)
        self.register_to_config(**registered, **({"_use_default_values": defaults} if defaults else {}))
        self._peer = self.setup.peer()
        self._programs: dict[tuple, tuple[Program, np.ndarray]] = {}
        self._rows: dict[tuple, Program] = {}
        self._begin_index: int | None = None
        self._reset(grid_from_peer=False)

    def _reset(self, grid_from_peer: bool) -> None:
        """State after construction or ``set_timesteps``: the peer's timesteps, no step taken yet."""
        self._grid: Grid | None = grid_of(self.setup, self._peer) if grid_from_peer else None
        self._programs.clear()
        self._stage: int | None = None
        self._start: int | None = None
        self._slots: list[torch.Tensor] = []
        self.timesteps: torch.Tensor = self._peer.timesteps
        self.num_inference_steps: int | None = getattr(self._peer, "num_inference_steps", None)

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
                    # PNDM's two phases by name (pipelines call step; code driving the phases calls these): one
                    # program runs both
                    **(
                        {"step_prk": FastdiffScheduler.step, "step_plms": FastdiffScheduler.step}
                        if source_class == "PNDMScheduler"
                        else {}
                    ),
                },
            )
        return bound

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """From any supported diffusers scheduler's config (its ``_class_name`` becomes ``source_class``)
        or a saved FastdiffScheduler config; ``kwargs`` override fields (``sampler=`` among them)."""
        cfg = dict(getattr(config, "config", config) or {})
        cfg.update(kwargs)
        # As diffusers' extract_init_dict: fields the config only holds at their defaults are not passed on.
        skip = set(cfg.pop("_use_default_values", None) or ())
        cfg = {k: v for k, v in cfg.items() if k not in skip}
        original = dict(cfg)
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
        # As diffusers' from_config: what the config holds beyond this class's fields stays in its config (for the
        # classes it is compatible with), under this class's name.
        hidden = {k: v for k, v in original.items() if k not in scheduler.config}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
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
        """Starts at ``timesteps[begin_index]`` (as diffusers' ``set_begin_index``): the first step there starts the
        multistep history afresh, as diffusers' does."""
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
        ``sigmas``); the coefficient program on that grid is built at the first step."""
        if mu is not None:
            kwargs["mu"] = mu
        if device is not None:
            kwargs["device"] = device
        set_timesteps(self._peer, num_inference_steps, timesteps, sigmas, **kwargs)
        self._begin_index = None
        self._reset(grid_from_peer=True)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input: the native state (``sample * alpha`` for the x / alpha schedulers)."""
        if not self.setup.spec.y_space:
            return sample
        if self._stage is None:
            self._init_stage(timestep)
        _, scale_in = self._program(0.0, False, sample.device)
        return sample * float(scale_in[self._stage - self._start])

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

        DDIM and DDPM steps are stateless as diffusers' (each goes from ``timestep`` to the timestep before it,
        any timestep those classes take); the others follow the step index diffusers keeps (set from the first
        ``timestep`` or ``set_begin_index``, their history starting there). ``eta`` (ddim) and
        ``use_clipped_model_output`` are diffusers' DDIM arguments; ``generator`` / ``variance_noise`` give the
        step noise where the original scheduler draws it.
        """
        eta, recompute = float(eta), bool(use_clipped_model_output)
        if self.setup.config.get("variance_type") in ("learned", "learned_range") and self.setup.spec.grid == "sigmas":
            model_output = model_output[:, : sample.shape[1]]  # DPMSolverMultistep drops the variance channels
        if self._stateless():
            prog, k = self._timestep_row(timestep, eta, recompute, sample.device), 0
        else:
            if self._stage is None:
                self._init_stage(timestep)
            prog, _ = self._program(eta, recompute, sample.device)
            k = self._stage - self._start
            if k >= prog.stages:
                raise ValueError(
                    f"no step from timesteps[{self._stage}]: the scheduler has {len(self.timesteps)} steps, and its "
                    "multistep solvers stop before a timestep listed twice (a zero step size)"
                )
        out, x0 = self._apply(prog, k, model_output, float(timestep), sample, eta, generator, variance_noise)
        if not self._stateless():
            self._stage += 1
        if not return_dict:
            return (out, x0)
        return FastdiffSchedulerOutput(prev_sample=out, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The original scheduler's forward noising (image-to-image, inpainting): for the sigma-grid schedulers at
        the noise level of the step index this scheduler is at, as diffusers' (before the first step its begin
        index, after a step the next step's), so re-noising the known region of an inpainting loop is exact."""
        if self.setup.spec.grid != "sigmas":
            return self._peer.add_noise(original_samples, noise, timesteps)
        sigmas = self._peer.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps).to(original_samples.device).reshape(-1)
        if self._begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            indices = [self._peer.index_for_timestep(t, schedule) for t in timesteps]
        else:
            indices = [self._begin_index if self._stage is None else self._stage] * timesteps.shape[0]
        sigma = sigmas[indices].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        if self.setup.spec.y_space:
            return original_samples + noise * sigma
        alpha_t = 1.0 / (sigma**2 + 1.0) ** 0.5
        return alpha_t * original_samples + sigma * alpha_t * noise

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def __getattr__(self, name: str) -> Any:
        # The original scheduler's tables and pure functions of its schedule (betas, alphas_cumprod, ...,
        # previous_timestep); nothing of its stepping state.
        if name in _PEER_TABLES and "_peer" in self.__dict__ and hasattr(self._peer, name):
            return getattr(self._peer, name)
        return super().__getattr__(name)  # ConfigMixin's: config fields registered later

    # ------------------------------------------------------------------ internals
    def _stateless(self) -> bool:
        """DDIM and DDPM running their own algorithm: each step is a function of its timestep alone."""
        return self.setup.class_name in ("DDIMScheduler", "DDPMScheduler") and self.sampler == self.setup.sampler

    def _apply(
        self,
        prog: Program,
        k: int,
        model_output: torch.Tensor,
        timestep: float,
        sample: torch.Tensor,
        eta: float,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``k`` of ``prog`` as one fused op: (x_next, x0-hat)."""
        x = sample.contiguous()
        m = model_output.to(x.dtype).contiguous()
        noise = None
        if self.setup.noise_draws(timestep, eta) or prog.uses_noise(k):
            noise = (
                variance_noise
                if variance_noise is not None
                else randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            )
        if len(self._slots) < prog.slots or any(h.shape != x.shape or h.dtype != x.dtype for h in self._slots):
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
        return out, x0

    def _timestep_row(self, timestep: Any, eta: float, recompute_eps: bool, device: torch.device) -> Program:
        """The one-stage program stepping from ``timestep`` to the one diffusers' DDIM / DDPM steps to."""
        t = int(torch.as_tensor(timestep).reshape(-1)[0].item())
        if self.setup.class_name == "DDIMScheduler":
            if self.num_inference_steps is None:
                raise ValueError("call set_timesteps before step (DDIM steps by num_train_timesteps // steps)")
            prev = t - self.config.num_train_timesteps // self.num_inference_steps
        else:
            prev = int(torch.as_tensor(self._peer.previous_timestep(t)).item())
        key = (t, prev, eta, recompute_eps, str(device))
        if key not in self._rows:
            grid = timestep_step_grid(self.setup, t, prev)
            self._rows[key] = self._finish(grid, eta, recompute_eps, self.options, device)[0]
        return self._rows[key]

    def _init_stage(self, timestep: Any) -> None:
        """The step index diffusers sets at the first step: the begin index, else where ``timestep`` is (its
        second listing when listed twice; the multistep schedulers take an unlisted one as their last step)."""
        if self._begin_index is not None:
            self._stage = self._begin_index
        elif self.setup.class_name == "PNDMScheduler":
            self._stage = 0  # PNDM counts its calls from the first, whatever timestep it is given
        else:
            t = torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device).reshape(-1)[0]
            hits = (self.timesteps == t).nonzero().flatten()
            if len(hits) == 0:
                if self.setup.class_name not in _LAST_STEP_IF_UNLISTED:
                    raise ValueError(f"timestep {float(t)} is not one of the scheduler's timesteps")
                self._stage = len(self.timesteps) - 1
            else:
                self._stage = int(hits[1 if len(hits) > 1 else 0])
        # The multistep solvers start their history (and warm-up) at the first step taken; the others run the
        # whole grid's program from there, its history empty (LMS weighs the derivatives it has as diffusers does).
        self._start = self._stage if self.setup.class_name in _FRESH_HISTORY else 0
        self._programs.clear()

    def _program(self, eta: float, recompute_eps: bool, device: torch.device) -> tuple[Program, np.ndarray]:
        """The program from the first step taken to the end for these step arguments on ``device`` (cached) and each
        stage's input scale. Started mid-schedule, it is the program of the rest of the grid: its multistep
        history starts there, as diffusers' does."""
        key = (eta, recompute_eps, str(device))
        if key not in self._programs:
            if self._grid is None:
                if self.timesteps is None:  # PNDM has none before set_timesteps
                    raise ValueError("call set_timesteps before step")
                try:
                    self._grid = grid_of(self.setup, self._peer)
                except ValueError as exc:
                    raise ValueError("call set_timesteps before step") from exc
            grid, options = self._grid, dict(self.options)
            step = self._start or 0  # nonzero only for the multistep solvers, one timestep per grid point
            if step:
                grid = _cut(grid, step, len(grid.t))
                if options.get("lower_order_final") and self.setup.class_name in _SHORT_RUN_RULE:
                    # diffusers lowers the last steps only when the whole schedule is short
                    options["lower_order_final"] = len(self.timesteps) < 15
            try:
                self._programs[key] = self._finish(grid, eta, recompute_eps, options, device)
            except ValueError:
                # A point listed twice inside the grid (rounded timesteps of a short training schedule) is a zero
                # step size that a multistep step divides by, in diffusers too: the program stops before it.
                repeats = np.nonzero(np.diff(np.asarray(grid.t)) == 0)[0]
                if not len(repeats) or self.setup.class_name not in _FRESH_HISTORY:
                    raise
                grid = _cut(grid, 0, int(repeats[0]) + 1)
                self._programs[key] = self._finish(grid, eta, recompute_eps, options, device)
        return self._programs[key]

    def _finish(
        self, grid: Grid, eta: float, recompute_eps: bool, options: dict[str, Any], device: torch.device
    ) -> tuple[Program, np.ndarray]:
        """The program of ``sampler`` on ``grid`` with the step arguments, x0 limit and sample space applied."""
        options = dict(options)
        if "eta" in get_sampler(self.sampler).options and eta:
            options["eta"] = eta
        prog = build_program(self.setup.schedule, grid, self.sampler, self.setup.prediction, device, **options)
        if self.setup.class_name == "DDPMScheduler" and self.sampler == "ddpm" and prog.stages == 1:
            prog = _ddpm_float32_row(prog, self._peer, grid, options["variance_type"])
        if self.setup.x0_clip is not None:
            prog = self.setup.x0_clip.with_recompute_eps(recompute_eps).program(prog)
        scale_in = np.ones(prog.stages)
        if self.setup.spec.y_space:
            prog, scale_in = _y_space(prog, self.setup, device)
        return prog, scale_in


_PEER_TABLES = frozenset(
    {
        "betas",
        "alphas",
        "alphas_cumprod",
        "final_alpha_cumprod",
        "one",
        "alpha_t",
        "sigma_t",
        "lambda_t",
        "log_sigmas",
        "sigma_min",
        "sigma_max",
        "custom_timesteps",
        "prk_timesteps",
        "plms_timesteps",
        "pndm_order",
        "use_karras_sigmas",
        "previous_timestep",
        "index_for_timestep",
        "_get_variance",
        "_sigma_to_t",
    }
)
_LAST_STEP_IF_UNLISTED = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"})
_FRESH_HISTORY = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"})
_SHORT_RUN_RULE = frozenset({"DPMSolverMultistepScheduler", "DEISMultistepScheduler"})


def _ddpm_float32_row(prog: Program, peer: Any, grid: Grid, variance_type: str) -> Program:
    """The one-step DDPM program with its step weights as DDPMScheduler forms them, in float32.

    Its beta for the step, ``1 - abar_t / abar_prev``, cancels in float32 near the clean end (at t = 1, a relative
    error of 5e-4), which moves diffusers' own samples by more than its full-loop tests allow; the drop-in takes
    those weights (not its float64 ones) so that its results are diffusers'.
    """
    abar = peer.alphas_cumprod
    t, prev = int(grid.t[0]), int(round(float(grid.t[1])))
    a_t = abar[t]
    a_prev = abar[prev] if prev >= 0 else peer.one
    beta_t = 1 - a_t / a_prev
    x0_weight = float(a_prev**0.5 * beta_t / (1 - a_t))
    x_weight = float((a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t))
    variance = beta_t if variance_type == "fixed_large" else torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
    coef = np.array(prog.coef, dtype=np.float64, copy=True)
    coef[0, CX] = x0_weight * coef[0, EX] + x_weight
    coef[0, CM] = x0_weight * coef[0, EM]
    coef[0, CZ] = float(variance**0.5) if t > 0 else 0.0
    return replace(prog, coef=coef, coef_device=torch.as_tensor(coef, dtype=torch.float64).to(prog.coef_device.device))


def _cut(grid: Grid, start: int, end: int) -> Grid:
    """Points ``start:end`` of ``grid``."""
    return Grid(*(np.asarray(a)[start:end] for a in (grid.t, grid.alpha, grid.sigma, grid.log_snr, grid.model_time)))


def _y_space(prog: Program, setup: SchedulerSetup, device: torch.device) -> tuple[Program, np.ndarray]:
    """Rows that read y = x / alpha at their stage and write y at the next stage's point (history stays native)."""
    sch = setup.schedule
    a_in = np.asarray(sch.alpha(prog.t), dtype=np.float64)
    a_out = np.concatenate([a_in[1:], [float(prog.grid.alpha[-1])]])
    coef = np.array(prog.coef, dtype=np.float64, copy=True)
    coef[:, [CX, DX, EX]] *= a_in[:, None]
    coef[:, [CX, CM, CH0, CH1, CH2, CZ, CX0]] /= a_out[:, None]
    return replace(prog, coef=coef, coef_device=torch.as_tensor(coef, dtype=torch.float64).to(device)), a_in
