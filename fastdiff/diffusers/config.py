"""A diffusers scheduler (or its config) read into what fastdiff runs: :func:`scheduler_setup`.

For each supported scheduler class this gives the schedule (float64 betas), the prediction type, the
sampler that is that class's algorithm with the options its config asks for, the x0 limit
(``clip_sample`` / ``thresholding``), and, for any step count, that scheduler's own grid: the grid is read
from a real instance of the class after its ``set_timesteps`` (so ``timestep_spacing``, ``steps_offset``,
Karras / exponential / beta sigmas, ``final_sigmas_type``, flow ``shift`` and the like are diffusers' own),
and the network is fed exactly the timesteps diffusers feeds it (rounded ones on Karras sigmas, ``sigma *
1000`` for flow matching).

Every config field of a supported class that changes the math is honoured or refused with a ValueError
naming the field and its value (:data:`REFUSED` lists the refused values); a field this module does not
know is accepted only at the class's default value.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastdiff.runtime.x0_clip import X0Clip
from fastdiff.schedule import Grid, Schedule

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@dataclass(frozen=True)
class ClassSpec:
    """How a diffusers scheduler class maps onto fastdiff.

    ``grid``: where its grid comes from ("timesteps": integer timesteps, each step from t to t - N // n;
    "sigmas": its sigmas and timesteps; "flow": its flow-matching sigmas). ``y_space``: its sample is
    x / alpha (its ``scale_model_input`` multiplies by alpha). ``noise``: when its ``step`` draws noise
    from the generator ("never", "every_step", "t_positive", "eta" for DDIM's eta > 0, "sde" for the SDE
    algorithm types). ``repeats``: its timesteps list a point twice (Heun's second stages, PLMS's first step).
    """

    sampler: str
    grid: str
    y_space: bool
    noise: str
    repeats: bool = False


CLASSES: dict[str, ClassSpec] = {
    "DDIMScheduler": ClassSpec("ddim", "timesteps", False, "eta"),
    "DDPMScheduler": ClassSpec("ddpm", "timesteps", False, "t_positive"),
    "PNDMScheduler": ClassSpec("pndm", "timesteps", False, "never", repeats=True),
    "LMSDiscreteScheduler": ClassSpec("lms", "sigmas", True, "never"),
    "EulerDiscreteScheduler": ClassSpec("euler", "sigmas", True, "never"),
    "EulerAncestralDiscreteScheduler": ClassSpec("euler_ancestral", "sigmas", True, "every_step"),
    "HeunDiscreteScheduler": ClassSpec("heun", "sigmas", True, "never", repeats=True),
    "DPMSolverMultistepScheduler": ClassSpec("dpmpp_2m", "sigmas", False, "sde"),
    "UniPCMultistepScheduler": ClassSpec("unipc", "sigmas", False, "never"),
    "DEISMultistepScheduler": ClassSpec("deis", "sigmas", False, "never"),
    "FlowMatchEulerDiscreteScheduler": ClassSpec("flow_euler", "flow", False, "never"),
    "FlowMatchHeunDiscreteScheduler": ClassSpec("flow_heun", "flow", False, "never", repeats=True),
}

# Fields whose every value is honoured: by the schedule, or by the grid read from the class's own set_timesteps.
HONOURED = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "final_sigmas_type",
        "interpolation_type",
        "timestep_type",
        "sigma_min",
        "sigma_max",
        "lambda_min_clipped",
        "use_lu_lambdas",
        "set_alpha_to_one",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "lower_order_final",
        "solver_type",
        "solver_order",
        "algorithm_type",
        "variance_type",
        "skip_prk_steps",
        "euler_at_final",
        "rescale_betas_zero_snr",
        "shift",
        "use_dynamic_shifting",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "shift_terminal",
        "time_shift_type",
        "predict_x0",
        "disable_corrector",
        "solver_p",
        "invert_sigmas",
        "stochastic_sampling",
        "use_flow_sigmas",
        "flow_shift",
    }
)

# (class or "*", field) -> (allowed values, why the others are refused).
REFUSED: dict[tuple[str, str], tuple[tuple, str]] = {
    ("DDPMScheduler", "variance_type"): (
        ("fixed_small", "fixed_small_log", "fixed_large"),
        "learned variances need the network's variance channels; diffusers' "
        "fixed_large_log step takes the square root of log(beta) < 0",
    ),
    ("DPMSolverMultistepScheduler", "algorithm_type"): (
        ("dpmsolver++", "sde-dpmsolver++"),
        "fastdiff implements the data-prediction (++) solvers",
    ),
    ("UniPCMultistepScheduler", "solver_type"): (("bh1", "bh2"), "diffusers maps every other name onto bh2"),
    ("UniPCMultistepScheduler", "predict_x0"): ((True,), "fastdiff's unipc predicts x0"),
    ("UniPCMultistepScheduler", "solver_order"): ((1, 2, 3), "fastdiff's unipc takes solver_order 1, 2 or 3"),
    ("UniPCMultistepScheduler", "disable_corrector"): (([], ()), "fastdiff's unipc corrects every step"),
    ("UniPCMultistepScheduler", "solver_p"): ((None,), "a custom predictor cannot be a coefficient program"),
    ("*", "use_flow_sigmas"): ((False,), "flow sigmas on a VP scheduler are not supported; use FlowMatch* schedulers"),
    ("*", "invert_sigmas"): ((False,), "inverted sigmas are not supported"),
    ("*", "stochastic_sampling"): ((False,), "stochastic flow sampling is not supported"),
}


DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
"""The variance_type names DDPMScheduler knows."""


def _diffusers() -> Any:
    """The real diffusers library (imported on first use; fastdiff does not need it otherwise)."""
    return importlib.import_module("diffusers")


@dataclass
class SchedulerSetup:
    """What fastdiff runs for one diffusers scheduler config.

    Attributes:
        class_name: the diffusers scheduler class (its config's ``_class_name``).
        config: the full config (the class's defaults filled in).
        spec: the class's :class:`ClassSpec`.
        schedule: the float64 schedule of its betas (or ``Schedule.flow`` for flow matching).
        prediction: fastdiff's prediction type.
        sampler: the fastdiff sampler that is the class's algorithm.
        options: that sampler's options from the config.
        x0_clip: the x0 limit the config asks for, or None.
    """

    class_name: str
    config: dict[str, Any]
    spec: ClassSpec
    schedule: Schedule
    prediction: str
    sampler: str
    options: dict[str, Any] = field(default_factory=dict)
    x0_clip: X0Clip | None = None

    def peer(self) -> Any:
        """A fresh instance of the diffusers class with this config (the source of its grids)."""
        return getattr(_diffusers(), self.class_name).from_config(self.config)

    def grid(
        self,
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        peer: Any = None,
        **set_timesteps_kwargs: Any,
    ) -> Grid:
        """The class's own grid for ``steps`` (or for explicit ``timesteps`` / ``sigmas``, with diffusers'
        meanings), after ``set_timesteps`` on ``peer`` (default: a fresh instance)."""
        peer = self.peer() if peer is None else peer
        set_timesteps(peer, steps, timesteps, sigmas, **set_timesteps_kwargs)
        return grid_of(self, peer)

    def noise_draws(self, step_timestep: float, eta: float = 0.0) -> bool:
        """Whether the class's ``step`` at this timestep draws noise from the generator."""
        rule = self.spec.noise
        if rule == "every_step":
            return True
        if rule == "t_positive":
            return step_timestep > 0
        if rule == "eta":
            return eta > 0
        if rule == "sde":
            return self.config.get("algorithm_type") == "sde-dpmsolver++"
        return False


def scheduler_setup(scheduler_or_config: Any) -> SchedulerSetup:
    """Reads a diffusers scheduler or its config (a mapping with ``_class_name``) into a :class:`SchedulerSetup`.

    Raises:
        TypeError: for something that is neither.
        ValueError: for a scheduler class fastdiff does not implement, or a config field value it refuses
            (the message names the field and the value).
    """
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"scheduler must be a diffusers scheduler or its config mapping, got {type(scheduler_or_config).__name__}"
        )
    class_name = config.get("_class_name")
    if not class_name:
        if isinstance(scheduler_or_config, Mapping):
            raise ValueError(
                "the scheduler config has no _class_name; pass the scheduler itself, or a config with "
                "_class_name (as scheduler_config.json has)"
            )
        class_name = type(scheduler_or_config).__name__
    if class_name == "FastdiffScheduler":
        class_name = config.get("source_class") or "DDIMScheduler"
    if class_name not in CLASSES:
        raise ValueError(f"scheduler class {class_name!r} is not supported; supported: {', '.join(sorted(CLASSES))}")
    spec = CLASSES[class_name]
    cls = getattr(_diffusers(), class_name)
    defaults = _init_defaults(cls)
    full = {k: config.get(k, d) for k, d in defaults.items()}
    # The class's own reading of the config: diffusers maps some values onto others (DPMSolverMultistep's
    # algorithm_type "deis" is "dpmsolver++", UniPC's solver_type "midpoint" is "bh2", ...) and refuses its own.
    instance = cls(**full)
    full = {k: instance.config.get(k, v) for k, v in full.items()}
    if class_name == "DDPMScheduler" and full["variance_type"] not in DDPM_VARIANCES:
        full["variance_type"] = "fixed_small"  # DDPMScheduler.step adds the fixed_small noise for a name it lacks
    _check_fields(class_name, spec, full, defaults)
    prediction, schedule = _prediction_and_schedule(spec, full, instance)
    sampler, options = _sampler_and_options(class_name, spec, full)
    x0_clip = X0Clip.from_config(full) if ("clip_sample" in full or "thresholding" in full) else None
    return SchedulerSetup(class_name, full, spec, schedule, prediction, sampler, options, x0_clip)


def _init_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _same(a: Any, b: Any) -> bool:
    """Config values equal (lists, arrays and None included)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        except Exception:
            return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_fields(class_name: str, spec: ClassSpec, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    for name, value in config.items():
        rule = REFUSED.get((class_name, name)) or REFUSED.get(("*", name))
        if rule is not None:
            allowed, why = rule
            if not any(_same(value, a) for a in allowed):
                raise ValueError(
                    f"{class_name} config field {name}={value!r} is not supported by fastdiff "
                    f"(supported: {', '.join(repr(a) for a in allowed)}): {why}"
                )
        elif name not in HONOURED and not _same(value, defaults.get(name)):
            raise ValueError(
                f"{class_name} config field {name}={value!r} is not supported by fastdiff "
                f"(it honours this field only at diffusers' default {defaults.get(name)!r})"
            )
    if class_name == "DPMSolverMultistepScheduler":
        if config.get("algorithm_type") == "sde-dpmsolver++" and config.get("solver_order") == 3:
            raise ValueError(
                "DPMSolverMultistepScheduler config field solver_order=3 with algorithm_type="
                "'sde-dpmsolver++' is not supported by fastdiff: diffusers' third-order SDE step is not "
                "third order (fastdiff's dpmpp_3m_sde is k-diffusion's)"
            )
    if "prediction_type" in config and spec.grid != "flow" and config["prediction_type"] not in PREDICTIONS:
        raise ValueError(
            f"{class_name} config field prediction_type={config['prediction_type']!r} is not supported "
            f"by fastdiff (supported: {', '.join(PREDICTIONS)})"
        )


def _prediction_and_schedule(spec: ClassSpec, config: Mapping[str, Any], instance: Any) -> tuple[str, Schedule]:
    if spec.grid == "flow":
        # x_t = (1 - t) x0 + t eps, the network fed t * num_train_timesteps; the grid decides where t runs.
        return "flow", Schedule.flow(t_min=1e-9, t_max=1.0, time_scale=float(config["num_train_timesteps"]))
    return PREDICTIONS[config.get("prediction_type", "epsilon")], schedule_of_table(instance.alphas_cumprod)


def schedule_of_table(alphas_cumprod: Any) -> Schedule:
    """The schedule of a class's own ``alphas_cumprod`` table: diffusers computes it in float32 (every beta
    schedule it has, zero-SNR rescaling, and the sigma-based classes' 2**-24 in place of a zero terminal SNR), and
    fastdiff takes those values as they are, so its float64 rows are diffusers' steps without diffusers' float32
    step arithmetic."""
    abar = np.asarray(
        alphas_cumprod.double().numpy() if hasattr(alphas_cumprod, "numpy") else alphas_cumprod, dtype=np.float64
    ).copy()
    # With rescale_betas_zero_snr the sigma-based classes end on 2**-24 in place of 0, above the entry before it.
    # Their steps only see (alpha, sigma) at their own sigmas, tied by alpha^2 = 1 / (1 + (sigma / alpha)^2), so the
    # end is put below that entry: the table stays a schedule that holds every sigma diffusers steps through (4096,
    # and the larger ones of its full training table), at schedule times of its own.
    if len(abar) > 1 and abar[-1] >= abar[-2]:
        abar[-1] = 0.5 * abar[-2]
    prev = np.concatenate([[1.0], abar[:-1]])
    return Schedule.from_betas(1.0 - abar / prev)


def _sampler_and_options(class_name: str, spec: ClassSpec, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if class_name == "PNDMScheduler":  # diffusers' pndm_order 4: three Runge-Kutta steps start the history
        return ("pndm" if config["skip_prk_steps"] else "pndm_prk"), {}
    if class_name == "DDPMScheduler":
        return "ddpm", {"variance_type": "fixed_large" if config["variance_type"] == "fixed_large" else "fixed_small"}
    if class_name == "DPMSolverMultistepScheduler":
        sde = config["algorithm_type"] == "sde-dpmsolver++"
        if config["solver_order"] == 1:  # DPM-Solver++(1) is DDIM; its SDE form is DDIM with eta = 1
            return "ddim", {"eta": 1.0} if sde else {}
        options = {
            "lower_order_final": bool(config["lower_order_final"]),
            "solver_type": config["solver_type"],
            "euler_at_final": bool(config["euler_at_final"]),
        }
        if config["solver_order"] == 3:
            return "dpmpp_3m", dict(options, legacy_third_order=True)
        return ("dpmpp_2m_sde" if sde else "dpmpp_2m"), options
    if class_name in ("UniPCMultistepScheduler", "DEISMultistepScheduler"):
        options = {"solver_order": int(config["solver_order"]), "lower_order_final": bool(config["lower_order_final"])}
        if class_name == "UniPCMultistepScheduler":
            options["variant"] = config["solver_type"]
        return spec.sampler, options
    return spec.sampler, {}


# ---------------------------------------------------------------------------------------------- grids
def set_timesteps(
    peer: Any, steps: int | None, timesteps: Sequence[float] | None, sigmas: Sequence[float] | None, **kwargs: Any
) -> None:
    """``peer.set_timesteps`` with diffusers' arguments (one of steps, timesteps, sigmas)."""
    params = inspect.signature(peer.set_timesteps).parameters
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None:
            if name not in params:
                raise ValueError(f"{type(peer).__name__}.set_timesteps takes no {name}")
            kwargs[name] = list(value)
    if steps is not None:  # with timesteps or sigmas too: the class decides (diffusers' own refuse both)
        kwargs["num_inference_steps"] = steps
    peer.set_timesteps(**kwargs)


def grid_of(setup: SchedulerSetup, peer: Any) -> Grid:
    """The grid of a peer after its ``set_timesteps``: its points (noisiest first, then where the last step
    lands) with ``model_time`` the timesteps diffusers feeds the network there."""
    if setup.spec.grid == "timesteps":
        return _timestep_grid(setup, peer)
    sig = np.asarray(
        peer.sigmas.double().cpu().numpy() if hasattr(peer.sigmas, "cpu") else peer.sigmas, dtype=np.float64
    )
    ts = np.asarray(peer.timesteps.double().cpu().numpy(), dtype=np.float64)
    if setup.spec.repeats:  # Heun: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, s_n], timesteps alike without the end
        sig = np.concatenate([sig[:-1:2], sig[-1:]])
        ts = ts[::2]
    if len(sig) > len(ts) + 1:  # Euler's log_linear interpolation lists one sigma more than its steps reach
        sig = sig[: len(ts) + 1]
    sch = setup.schedule
    if setup.spec.grid == "flow":
        t = sig.copy()
    else:
        top, bottom = float(sch.edm_sigma(sch.t_max)), float(sch.edm_sigma(sch.t_min))
        # The peer's sigmas are float32 values of the same table: ends within their rounding are the ends.
        near = lambda s, end: abs(s - end) <= 1e-6 * end  # noqa: E731
        t = np.array(
            [
                sch.clean_end
                if s == 0
                else sch.t_max
                if near(s, top)
                else sch.t_min
                if near(s, bottom)
                else sch.t_from_edm_sigma(s)
                for s in sig
            ],
            dtype=np.float64,
        )
    if len(ts) != len(t) - 1:
        raise ValueError(f"{setup.class_name}: {len(ts)} timesteps for {len(t)} sigmas")
    model_time = np.concatenate([ts, sch.model_time(t[-1:])])
    return Grid(t=t, alpha=sch.alpha(t), sigma=sch.sigma(t), log_snr=sch.log_snr(t), model_time=model_time)


def _timestep_grid(setup: SchedulerSetup, peer: Any) -> Grid:
    """DDIM, DDPM and PNDM step from timestep t to t - N // n (DDPM with custom timesteps: to the next one);
    fastdiff's grids are chains, so every step must land on the next timestep."""
    sch, cfg = setup.schedule, setup.config
    ts = peer.timesteps.cpu().numpy().astype(np.float64)
    if setup.spec.repeats:  # PLMS lists its second timestep twice
        ts = np.asarray(peer._timesteps[::-1], dtype=np.float64)
    n = len(ts)
    custom = bool(getattr(peer, "custom_timesteps", False))
    ratio = cfg["num_train_timesteps"] // (peer.num_inference_steps or n)
    prev = np.concatenate([ts[1:], [-1.0]]) if custom else ts - ratio
    if np.any(prev[:-1] != ts[1:]):
        bad = int(np.nonzero(prev[:-1] != ts[1:])[0][0])
        raise ValueError(
            f"{setup.class_name} with timestep_spacing={cfg.get('timestep_spacing')!r} and {n} steps "
            f"steps from timestep {int(ts[bad])} to {int(prev[bad])} but evaluates the next step at "
            f"{int(ts[bad + 1])}; fastdiff runs grids whose steps land on the next timestep (use "
            "timestep_spacing='leading', or 'trailing' with a step count dividing num_train_timesteps)"
        )
    last = prev[-1]
    if last < 0:
        last = sch.clean_end if cfg.get("set_alpha_to_one", True) else 0.0
    t = np.concatenate([ts, [last]])
    return Grid(t=t, alpha=sch.alpha(t), sigma=sch.sigma(t), log_snr=sch.log_snr(t), model_time=sch.model_time(t))


def timestep_step_grid(setup: SchedulerSetup, timestep: int, prev: int) -> Grid:
    """The two-point grid of one DDIM / DDPM step from ``timestep`` to ``prev``, any timesteps those classes take
    (``prev < 0``: the end the class steps into, as in :func:`_timestep_grid`)."""
    sch, cfg = setup.schedule, setup.config
    last = float(prev) if prev >= 0 else (sch.clean_end if cfg.get("set_alpha_to_one", True) else 0.0)
    t = np.array([float(timestep), last], dtype=np.float64)
    return Grid(t=t, alpha=sch.alpha(t), sigma=sch.sigma(t), log_snr=sch.log_snr(t), model_time=sch.model_time(t))


def initial_state_scale(setup: SchedulerSetup, peer: Any, grid: Grid) -> float:
    """Native x_T = scale * latents, where diffusers starts from ``latents * init_noise_sigma`` in its own
    sample space (x / alpha for the y-space classes)."""
    scale = float(getattr(peer, "init_noise_sigma", 1.0))  # flow-matching schedulers have none (1)
    return scale * float(grid.alpha[0]) if setup.spec.y_space else scale
