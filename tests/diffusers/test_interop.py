"""fastdiff with diffusers' own pipelines: ``fastdiff.from_diffusers`` (own the loop) and ``FastdiffScheduler``
(drop in) against the original schedulers, on tiny seeded random diffusers models (no downloads).

Every comparison runs the same network on the same latents and, for stochastic schedulers, the same
generator: relative difference max|a - b| / max|b| <= 1e-4 (measured: 1e-7 .. 1e-5, printed with ``-s``).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # StableDiffusionPipeline needs it to import

from tiny_pipelines import cross_attention_unet  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusers import FastdiffScheduler  # noqa: E402

REL_TOL = 1e-4
# Thresholding at sample_max_value 0.5 doubles x0 at every step: the problem is so ill-conditioned that diffusers
# itself, float32 against float64, differs by 1.3e-4 here (measured); float32 cannot promise more than that.
ILL_CONDITIONED_TOL = {("DDIMScheduler", "thresholding=True,sample_max_value=0.5"): 3e-4}
STEPS = 5

# (class name, config overrides): the list.
SCHEDULERS = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.5}),
    ("DDPMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
    ("LMSDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 2.0}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    # beyond those: the classes' other defaults and options
    ("PNDMScheduler", {}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 0.5}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}),
]
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _id(v):
    return v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "default"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = REL_TOL) -> None:
    assert ours.shape == theirs.shape and torch.isfinite(theirs).all()
    rel = _rel(ours, theirs)
    print(f"{name}: max relative difference {rel:.2e}")
    assert rel <= tol, f"{name}: {rel:.3g}"


@pytest.fixture(scope="module")
def cond_unet():
    return cross_attention_unet()


@pytest.fixture(scope="module")
def sd_pipe(cond_unet):
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=cond_unet,
        scheduler=diffusers.DDIMScheduler(**SD_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)


@pytest.mark.parametrize("name,overrides", SCHEDULERS, ids=_id)
def test_stable_diffusion_pipeline_both_paths(sd_pipe, name, overrides):
    """StableDiffusionPipeline (prompt_embeds, classifier-free guidance 5, output_type="latent") with the original
    scheduler, with FastdiffScheduler dropped in, and fastdiff's own loop on the same latents and generator."""
    # As loaded from a checkpoint's scheduler_config.json (with _class_name).
    scheduler = getattr(diffusers, name).from_config({"_class_name": name, **SD_CONFIG, **overrides})
    cond, uncond = _embeds()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))

    def run(s):
        sd_pipe.scheduler = s
        with torch.no_grad():
            return sd_pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                latents=latents.clone(),
                num_inference_steps=STEPS,
                guidance_scale=5.0,
                output_type="latent",
                generator=torch.Generator().manual_seed(11),
            ).images

    theirs = run(scheduler)
    tol = ILL_CONDITIONED_TOL.get((name, _id(overrides)), REL_TOL)
    _check(f"{name} {_id(overrides)} drop-in", run(FastdiffScheduler.from_config(scheduler.config)), theirs, tol)
    pipe = fastdiff.from_diffusers(sd_pipe.unet, scheduler, device="cpu")
    with torch.no_grad():
        ours = pipe.sample(
            latents.shape,
            steps=STEPS,
            x_T=latents,
            guidance_scale=5.0,
            model_kwargs={"encoder_hidden_states": cond},
            uncond_kwargs={"encoder_hidden_states": uncond},
            generator=torch.Generator().manual_seed(11),
            progress=False,
        )
    _check(f"{name} {_id(overrides)} own loop", ours, theirs, tol)


def test_ddim_pipeline_both_paths():
    """DDIMPipeline (clip_sample=True, diffusers' DDIM default) on a tiny UNet2DModel."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    scheduler = diffusers.DDIMScheduler()
    ddim = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    ddim.set_progress_bar_config(disable=True)

    def run():
        with torch.no_grad():
            return torch.from_numpy(
                ddim(
                    batch_size=2,
                    num_inference_steps=STEPS,
                    eta=0.0,
                    output_type="np",
                    generator=torch.Generator().manual_seed(5),
                ).images
            )

    theirs = run()
    ddim.scheduler = FastdiffScheduler.from_config(scheduler)
    _check("DDIMPipeline drop-in", run(), theirs)
    latents = diffusers.utils.torch_utils.randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = fastdiff.from_diffusers(unet, scheduler, device="cpu").sample(
            latents.shape, steps=STEPS, x_T=latents, progress=False
        )
    _check("DDIMPipeline own loop", (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), theirs)


def test_flow_matching_transformer_both_paths():
    """A tiny SD3Transformer2DModel with FlowMatchEulerDiscreteScheduler(shift=3), SD3's loop
    (timestep = sigma * 1000)."""
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(2)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
    }
    latents = torch.randn(2, 4, 8, 8, generator=g)
    for cls in (diffusers.FlowMatchEulerDiscreteScheduler, diffusers.FlowMatchHeunDiscreteScheduler):
        scheduler = cls(shift=3.0)

        def loop(s):
            s.set_timesteps(STEPS)
            x = latents.clone()
            with torch.no_grad():
                for t in s.timesteps:
                    out = net(hidden_states=x, timestep=t.expand(2), **kwargs).sample
                    x = s.step(out, t, x).prev_sample
            return x

        theirs = loop(cls.from_config(scheduler.config))
        _check(f"{cls.__name__} drop-in", loop(FastdiffScheduler.from_config(scheduler)), theirs)
        with torch.no_grad():
            ours = fastdiff.from_diffusers(net, scheduler, device="cpu").sample(
                latents.shape, steps=STEPS, x_T=latents, model_kwargs=kwargs, progress=False
            )
        _check(f"{cls.__name__} own loop", ours, theirs)


# ------------------------------------------------------------------ diffusers' own DDIM full-loop expectations
def _sample_deter() -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def _dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    t = t.reshape(-1, 1, 1, 1).to(sample.dtype)
    return sample * t / (t + 1)


@pytest.mark.parametrize(
    "overrides,expected_sum,expected_mean",
    [
        ({}, 172.0067, 0.223967),
        ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    ],
    ids=["eps", "v", "set_alpha_to_one", "no_set_alpha_to_one"],
)
def test_ddim_full_loop_expectations(overrides, expected_sum, expected_mean):
    """diffusers' tests/schedulers/test_scheduler_ddim.py full loops (10 steps, clip_sample=True), through
    FastdiffScheduler, to diffusers' own tolerances."""
    config = {
        **dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True),
        **overrides,
    }
    s = FastdiffScheduler.from_config(diffusers.DDIMScheduler(**config))
    s.set_timesteps(10)
    x = _sample_deter()
    for t in s.timesteps:
        x = s.step(_dummy_model(x, t), t, x, 0.0).prev_sample
    assert abs(float(x.abs().sum()) - expected_sum) < 1e-2
    assert abs(float(x.abs().mean()) - expected_mean) < 1e-3


# ------------------------------------------------------------------ config fields: honoured or refused
def test_clip_sample_changes_the_samples_as_diffusers():
    """The issue's example: clip_sample=True on values beyond [-1, 1] (before: fastdiff ignored it)."""
    for clip in (True, False):
        sched = diffusers.DDIMScheduler(clip_sample=clip)
        pipe = fastdiff.from_diffusers(lambda x, t: -x, sched, device="cpu")
        x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2
        s = diffusers.DDIMScheduler.from_config(sched.config)
        s.set_timesteps(10)
        x = x_T.clone()
        for t in s.timesteps:
            x = s.step(-x, t, x).prev_sample
        _check(f"clip_sample={clip}", pipe.sample((64, 2), steps=10, x_T=x_T, progress=False), x)
        assert (float(x.abs().max()) <= 1.0 + 1e-6) == clip  # the last step lands on the (clipped) x0


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("DDPMScheduler", "variance_type", "learned_range"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
        ("UniPCMultistepScheduler", "predict_x0", False),
        ("FlowMatchEulerDiscreteScheduler", "stochastic_sampling", True),
    ],
)
def test_refused_fields_name_field_and_value(name, field, value):
    config = {**getattr(diffusers, name)().config, field: value, "_class_name": name}
    config.pop("_use_default_values")  # it would list the field as left at its default, as diffusers reads it
    if field == "algorithm_type":
        config["final_sigmas_type"] = "sigma_min"  # diffusers' own check refuses the non-++ solvers into sigma 0
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        fastdiff.from_diffusers(lambda x, t: x, config)
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        FastdiffScheduler.from_config(config)


def test_unknown_scheduler_class_and_non_chain_grid_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        fastdiff.from_diffusers(lambda x, t: x, diffusers.KDPM2DiscreteScheduler())
    pipe = fastdiff.from_diffusers(lambda x, t: x, diffusers.DDIMScheduler(timestep_spacing="linspace"))
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        pipe.sample((2, 2), steps=10, progress=False)


def test_default_samplers_and_timestep_conventions():
    from fastdiff.diffusers import scheduler_setup

    cases = {
        "DDIMScheduler": "ddim",
        "PNDMScheduler": "pndm",
        "LMSDiscreteScheduler": "lms",
        "HeunDiscreteScheduler": "heun",
        "UniPCMultistepScheduler": "unipc",
        "DEISMultistepScheduler": "deis",
        "FlowMatchEulerDiscreteScheduler": "flow_euler",
    }
    for name, sampler in cases.items():
        kw = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
        assert scheduler_setup(getattr(diffusers, name)(**kw)).sampler == sampler
    assert (
        scheduler_setup(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")).sampler
        == "dpmpp_2m_sde"
    )
    flow = scheduler_setup(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    grid = flow.grid(4)
    assert flow.prediction == "flow"
    assert abs(grid.model_time[0] - 1000.0) < 1e-3 and grid.t[-1] == 0.0  # fed sigma * 1000, ends clean
    karras = scheduler_setup(diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)).grid(6)
    assert all(float(v).is_integer() for v in karras.model_time[:-1])  # diffusers' rounded timesteps
    assert not all(float(v).is_integer() for v in karras.t[1:-1])  # on the Karras sigmas themselves


def test_fastdiff_scheduler_config_round_trip(tmp_path):
    s = FastdiffScheduler.from_config(diffusers.DPMSolverMultistepScheduler(solver_order=3))
    assert s.sampler == "dpmpp_3m" and s.config.source_class == "DPMSolverMultistepScheduler"
    s.save_config(tmp_path)
    again = FastdiffScheduler.from_pretrained(tmp_path)
    assert again.sampler == "dpmpp_3m" and again.config.solver_order == 3
    assert FastdiffScheduler.from_config(s.config, sampler="unipc").sampler == "unipc"
