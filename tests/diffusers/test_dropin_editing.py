"""``FastdiffScheduler`` dropped into diffusers' image-to-image and inpainting pipelines.

Both pipelines start the loop mid-schedule (``set_begin_index`` at the strength's cut) from ``add_noise`` of the
encoded image, and the 4-channel inpainting loop re-noises the known region with ``add_noise`` at the next timestep
after every step. On tiny seeded random models (a one-block VAE with latents the image's size, a 4-channel UNet),
prompt embeddings given, classifier-free guidance 5, 10 steps, strengths 0.5 and 0.8 and the same generator, the
drop-in must give diffusers' own scheduler's latents: relative difference max|a - b| / max|b| <= 1e-4 (printed with
``-s``).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the Stable Diffusion pipelines need it to import

from tiny_pipelines import cross_attention_unet  # noqa: E402

from fastdiff.diffusers import FastdiffScheduler  # noqa: E402

REL_TOL = 1e-4
STEPS = 10
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CLASSES = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"]


@pytest.fixture(scope="module")
def parts():
    unet = cross_attention_unet()
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    return dict(
        vae=vae,
        unet=unet,
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1.0  # regenerate the lower half
    return dict(
        prompt_embeds=torch.randn(2, 6, 16, generator=g),
        negative_prompt_embeds=torch.randn(2, 6, 16, generator=g),
        image=image,
        mask_image=mask,
    )


def _run(pipe, scheduler, strength: float) -> torch.Tensor:
    pipe.scheduler = scheduler
    kwargs = _inputs()
    if not isinstance(pipe, diffusers.StableDiffusionInpaintPipeline):
        kwargs.pop("mask_image")
    with torch.no_grad():
        return pipe(
            **kwargs,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(11),
        ).images


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("kind", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_dropin_matches_diffusers_when_editing(parts, kind, name, strength):
    pipe = getattr(diffusers, kind)(scheduler=diffusers.DDIMScheduler(**SD_CONFIG), **parts)
    pipe.set_progress_bar_config(disable=True)
    original = getattr(diffusers, name).from_config({"_class_name": name, **SD_CONFIG})
    theirs = _run(pipe, original, strength)
    ours = _run(pipe, FastdiffScheduler.from_config(original.config), strength)
    assert ours.shape == theirs.shape and torch.isfinite(theirs).all()
    rel = float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())
    print(f"{kind} {name} strength {strength}: max relative difference {rel:.2e}")
    assert rel <= REL_TOL, f"{kind} {name} strength {strength}: {rel:.3g}"


def test_add_noise_follows_the_step_index_in_an_inpainting_loop():
    """After a step, the sigma-grid schedulers noise the known region at the next step's level (diffusers'
    step index), not at the begin index: the two differ, and the drop-in gives the former."""
    config = {"_class_name": "EulerDiscreteScheduler", **SD_CONFIG}
    ours = FastdiffScheduler.from_config(config)
    theirs = diffusers.EulerDiscreteScheduler.from_config(config)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for s in (ours, theirs):
        s.set_timesteps(STEPS)
        s.set_begin_index(4)
    before = ours.add_noise(x0, noise, ours.timesteps[4:5])
    torch.testing.assert_close(before, theirs.add_noise(x0, noise, theirs.timesteps[4:5]))
    x = before
    for s in (ours, theirs):
        s.step(torch.zeros_like(x), s.timesteps[4], x)
    after = ours.add_noise(x0, noise, ours.timesteps[5:6])
    torch.testing.assert_close(after, theirs.add_noise(x0, noise, theirs.timesteps[5:6]))
    assert (after - before).abs().max() > 1e-3
