"""Image editing against diffusers' own pipelines: ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` (4-channel UNet: the known region blended after every step; 9-channel UNet: mask
and masked-image latents concatenated to the input) against ``fastdiff.from_diffusers(...).sample(init=, strength=,
mask=)``, on tiny seeded random models (no downloads), in latent space (``output_type="latent"``, image latents given
as the image).

Both runs take the same image latents, mask, prompt embeddings (guidance 5) and noise: diffusers draws its ``noise``
from the generator (its first draw: the image is latents, so nothing is encoded first), and fastdiff gets the same
draw as ``x_T`` and, for the stochastic schedulers, the generator after that draw (their steps draw from it next).
Relative difference max|a - b| / max|b| <= 1e-4 (printed with ``-s``). DDIM, DPMSolverMultistep and Euler at every
strength; UniPC, DEIS, Euler ancestral and DDPM at one.

Known differences (not tested here): diffusers' Heun inpainting blends after each of its two stages (fastdiff once
per step); LMS img2img takes its order from the step index counted from the schedule's start, not from the cut;
PNDM's cut drops its repeated first PLMS timestep.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the Stable Diffusion pipelines need it to import

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from tiny_pipelines import cross_attention_unet  # noqa: E402

import fastdiff  # noqa: E402

REL_TOL = 1e-4
STEPS = 10
SEED = 11
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
MORE_SCHEDULERS = [
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EulerAncestralDiscreteScheduler",  # stochastic: the generator's draws after the noise
    "DDPMScheduler",
]
CASES = [(name, None) for name in SCHEDULERS] + [(name, 0.6) for name in MORE_SCHEDULERS]
SHAPE = (2, 4, 8, 8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and torch.isfinite(theirs).all()
    rel = _rel(ours, theirs)
    print(f"{name}: max relative difference {rel:.2e}")
    assert rel <= REL_TOL, f"{name}: {rel:.3g}"


def _vae() -> torch.nn.Module:
    """One block: latents and pixels share their size (vae_scale_factor 1); never run (latents in and out)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _pipe(cls, unet, vae=None):
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
               scheduler=diffusers.DDIMScheduler(**SD_CONFIG), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img():
    return _pipe(diffusers.StableDiffusionImg2ImgPipeline, cross_attention_unet(4))


@pytest.fixture(scope="module", params=[4, 9], ids=["4-channel", "9-channel"])
def inpaint(request):
    return _pipe(diffusers.StableDiffusionInpaintPipeline, cross_attention_unet(request.param), _vae())


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(SHAPE, generator=g)
    cond, uncond = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1.0  # the lower half regenerated
    mask[1, :, :, :2] = 1.0  # and, in the second image, a strip on the left
    return image, cond, uncond, mask


def _ours(pipe, scheduler, strength: float, cond, uncond, **edit):
    generator = torch.Generator().manual_seed(SEED)
    noise = randn_tensor(SHAPE, generator=generator)  # diffusers' first draw; a stochastic step draws next
    ours = fastdiff.from_diffusers(pipe.unet, scheduler, device="cpu")
    with torch.no_grad():
        return ours.sample(SHAPE, steps=STEPS, x_T=noise, strength=strength, guidance_scale=5.0, generator=generator,
                           model_kwargs={"encoder_hidden_states": cond},
                           uncond_kwargs={"encoder_hidden_states": uncond}, progress=False, **edit)  # fmt: skip


def _strengths(cases: list, strengths: list) -> list:
    """(scheduler, strength) pairs: every strength for a case without its own, else the case's one."""
    return [(name, s) for name, only in cases for s in (strengths if only is None else [only])]


@pytest.mark.parametrize("name,strength", _strengths(CASES, [0.3, 0.6, 0.9]))
def test_img2img_pipeline(img2img, name: str, strength: float) -> None:
    scheduler = getattr(diffusers, name).from_config({"_class_name": name, **SD_CONFIG})
    image, cond, uncond, _ = _inputs()
    img2img.scheduler = scheduler
    with torch.no_grad():
        theirs = img2img(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, strength=strength,
                         num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                         generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip
    ours = _ours(img2img, scheduler, strength, cond, uncond, init=image)
    _check(f"img2img {name} strength {strength}", ours, theirs)
    # Not vacuous: the image matters, and the start is not plain sampling's.
    assert _rel(ours, _ours(img2img, scheduler, strength, cond, uncond, init=image * 0.5)) > 1e-2


@pytest.mark.parametrize("name,strength", _strengths(CASES, [0.6, 1.0]))
def test_inpaint_pipeline(inpaint, name: str, strength: float) -> None:
    scheduler = getattr(diffusers, name).from_config({"_class_name": name, **SD_CONFIG})
    image, cond, uncond, mask = _inputs()
    inpaint.scheduler = scheduler
    with torch.no_grad():
        theirs = inpaint(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, mask_image=mask,
                         masked_image_latents=image * (mask < 0.5), strength=strength, height=8, width=8,
                         num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                         generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip
    ours = _ours(inpaint, scheduler, strength, cond, uncond, init=image, mask=mask)
    channels = inpaint.unet.config.in_channels
    _check(f"inpaint {channels}-channel {name} strength {strength}", ours, theirs)
    keep = (mask < 0.5).expand(SHAPE)
    if channels == 4:  # the 4-channel loop ends on the image itself where the mask keeps it
        assert torch.equal(ours[keep], image[keep])
    else:  # the 9-channel UNet reads the mask: without it (a mask of zeros) the result differs
        other = _ours(inpaint, scheduler, strength, cond, uncond, init=image, mask=torch.zeros_like(mask),
                      masked_image_latents=image * (mask < 0.5))  # fmt: skip
        assert _rel(other, ours) > 1e-3
