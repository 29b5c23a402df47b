"""``FastdiffScheduler`` as a stand-in for diffusers' scheduler classes, used the way code written for those classes
uses them: constructed by class (``FastdiffScheduler.for_class``), read before ``set_timesteps``, stepped from
timesteps off the inference grid, driven by hand, saved and loaded. Each check compares with the diffusers class on
the same inputs (a network whose output depends on the sample and the timestep).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.diffusers import FastdiffScheduler, X0Clip  # noqa: E402

LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _net(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype)
    return torch.tanh(x) * (t / 1000.0) + 0.1 * x


def _state(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _pair(name: str, **config):
    return getattr(diffusers, name)(**config), FastdiffScheduler.for_class(name)(**config)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
    assert err <= rel, err


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_for_class_reads_like_the_class_before_set_timesteps(name):
    theirs, ours = _pair(name, **LINEAR)
    assert type(ours).__name__ == f"Fastdiff{name}" and isinstance(ours, FastdiffScheduler)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.num_inference_steps is None
    assert torch.equal(ours.betas, theirs.betas) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma) and len(ours) == len(theirs)
    assert FastdiffScheduler.for_class(name) is type(ours)  # one class per name
    with pytest.raises(ValueError, match="source_class must be one of"):
        FastdiffScheduler.for_class("KDPM2DiscreteScheduler")


def test_config_round_trip_and_compatible_classes(tmp_path):
    cls = FastdiffScheduler.for_class("DDIMScheduler")
    ours = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    listed = ours.config["_use_default_values"]  # what the caller left at the class's defaults, as diffusers keeps
    assert "num_train_timesteps" in listed and "beta_schedule" not in listed
    ours.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert "_use_default_values" not in loaded.config  # a saved config holds every field
    assert {k: v for k, v in ours.config.items() if k != "_use_default_values"} == dict(loaded.config)
    # Through another class's config and back: the bound class stays DDIM, with the same fields.
    lms = diffusers.LMSDiscreteScheduler.from_config(ours.config)
    back = cls.from_config(lms.config)
    assert back.setup.class_name == "DDIMScheduler" and back.config["beta_schedule"] == "scaled_linear"


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_ddim_and_ddpm_step_from_any_timestep(name):
    """Off the inference grid and repeated: each step goes from its timestep to the one the class steps to (DDIM:
    t - 1000 // steps; DDPM before set_timesteps, the only time it takes any timestep: t - 1)."""
    theirs, ours = _pair(name, **LINEAR)
    if name == "DDIMScheduler":
        for s in (theirs, ours):
            s.set_timesteps(10)
    x = _state()
    for t in (537, 537, 3, 999):
        kwargs = {"generator": torch.Generator().manual_seed(t)}
        a = theirs.step(_net(x, t), t, x, **kwargs).prev_sample
        b = ours.step(_net(x, t), t, x, **{"generator": torch.Generator().manual_seed(t)}).prev_sample
        _close(b, a)


def test_ddpm_without_set_timesteps_steps_one_timestep():
    """DDPM before set_timesteps steps t -> t - 1; its near-clean steps follow diffusers' float32 weights."""
    theirs, ours = _pair("DDPMScheduler", **LINEAR, clip_sample=True)
    x0, noise = _state(1), _state(2)
    outs = []
    for s in (theirs, ours):
        x, g = s.add_noise(x0, noise, torch.tensor([2])), torch.Generator().manual_seed(5)
        for t in s.timesteps[997:]:
            x = s.step(_net(x, t), t, x, generator=g).prev_sample
        outs.append(x)
    _close(outs[1], outs[0], 1e-6)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"])
def test_multistep_from_mid_schedule_and_unlisted_timestep(name):
    """Started at timesteps[6] (no begin index), the history starts there as in diffusers; a timestep the schedule
    does not list is its last step, as diffusers takes it."""
    theirs, ours = _pair(name, **LINEAR)
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        x = _state()
        for t in s.timesteps[6:]:
            x = s.step(_net(x, t), t, x).prev_sample
        outs.append(x)
    _close(outs[1], outs[0])
    theirs, ours = _pair(name, **LINEAR)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = _state()
    _close(ours.step(_net(x, 5), 5, x).prev_sample, theirs.step(_net(x, 5), 5, x).prev_sample)


def test_pndm_default_with_its_two_phase_names():
    """PNDMScheduler's default (Runge-Kutta start), driven through step_prk over prk_timesteps and step_plms over
    plms_timesteps, as code written for the class does."""
    theirs, ours = _pair("PNDMScheduler", **LINEAR)
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        x = _state()
        for t in s.prk_timesteps:
            x = s.step_prk(_net(x, t), t, x).prev_sample
        for t in s.plms_timesteps:
            x = s.step_plms(_net(x, t), t, x).prev_sample
        outs.append(x)
    _close(outs[1], outs[0])


def test_heun_second_stage_reads_the_sample_only_through_its_slope():
    """HeunDiscrete's second call steps from its stored first-stage sample; callers that pass the scaled sample
    (as diffusers' own tests do) get diffusers' result."""
    theirs, ours = _pair("HeunDiscreteScheduler", **LINEAR)
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(6)
        x = _state() * s.init_noise_sigma
        for t in s.timesteps:
            x = s.scale_model_input(x, t)
            x = s.step(_net(x, t), t, x).prev_sample
        outs.append(x)
    _close(outs[1], outs[0])


def test_duplicate_timesteps_stop_the_multistep_program():
    """A short training schedule rounds two inference timesteps to one; the steps before it match diffusers and
    the step from it is refused (diffusers' divides by a zero step size there)."""
    theirs, ours = _pair("DPMSolverMultistepScheduler", num_train_timesteps=25)
    for s in (theirs, ours):
        s.set_timesteps(25)
    repeat = int((theirs.timesteps[1:] == theirs.timesteps[:-1]).nonzero()[0])
    x_a = x_b = _state()
    for t in theirs.timesteps[:repeat]:
        x_a = theirs.step(_net(x_a, t), t, x_a).prev_sample
        x_b = ours.step(_net(x_b, t), t, x_b).prev_sample
    _close(x_b, x_a)
    t = ours.timesteps[repeat]
    with pytest.raises(ValueError, match="listed twice"):
        ours.step(_net(x_b, t), t, x_b)


def test_thresholding_below_one_and_at_ratio_zero_as_diffusers():
    """diffusers clamps the per-sample quantile to [1, sample_max_value], which is sample_max_value itself below 1,
    and takes a quantile ratio of 0 (the smallest |x0|); a bound of 0 or a ratio above 1 is refused."""
    for extra in ({"sample_max_value": 0.5}, {"sample_max_value": 0.5, "dynamic_thresholding_ratio": 0.0}):
        theirs, ours = _pair("DDIMScheduler", **LINEAR, thresholding=True, **extra)
        for s in (theirs, ours):
            s.set_timesteps(10)
        x = _state() * 3
        t = theirs.timesteps[2]
        _close(ours.step(_net(x, t), t, x).prev_sample, theirs.step(_net(x, t), t, x).prev_sample)
    with pytest.raises(ValueError, match="sample_max_value must be > 0"):
        X0Clip(threshold_ratio=0.9, sample_max_value=0.0)
    with pytest.raises(ValueError, match=r"dynamic_thresholding_ratio must be in \[0, 1\]"):
        X0Clip(threshold_ratio=1.5)
