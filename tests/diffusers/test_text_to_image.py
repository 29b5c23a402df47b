"""``TextToImage``: diffusers' text-to-image pipelines with fastdiff's loop. The contract with diffusers: its own
pipeline, called with ``latents=`` set to fastdiff's x_T for a seed, makes the same images (relative difference of
the decoded image <= 1e-4 in float32) for SD (eps and v prediction, DDIM and DPM-Solver++), SDXL (Euler) and SD3
(flow Euler)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from tiny_pipelines import stable_diffusion

from fastdiff.diffusers.text_to_image import Prompt, TextToImage, load_text_to_image, pipeline_class

STEPS = 5
PROMPT, NEGATIVE = "a cat at the mat", "dog"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _diffusers_images(t2i: TextToImage, guidance: float, seeds: list[int], **call) -> tuple[torch.Tensor, torch.Tensor]:
    """fastdiff's images and diffusers' own pipeline's, from fastdiff's x_T for ``seeds``."""
    _, ours = t2i.generate(PROMPT, NEGATIVE, guidance, n=len(seeds), steps=STEPS, seed=seeds)
    x_T = t2i.pipe.initial_noise((len(seeds), *t2i.latent_shape(*t2i.default_size)), seeds)
    with torch.no_grad():
        theirs = t2i.pipeline(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_images_per_prompt=len(seeds),
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=t2i.diffusers_latents(x_T, STEPS),
            output_type="pt",
            **call,
        ).images
    return ours, theirs


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_equals_the_diffusers_pipeline_on_fastdiffs_initial_noise(tiny_pipelines, name, guidance):
    t2i = load_text_to_image(tiny_pipelines[name], device="cpu")
    ours, theirs = _diffusers_images(t2i, guidance, [3, 4])
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert _rel(ours, theirs) <= 1e-4, (name, _rel(ours, theirs))


SCHEDULERS = ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_schedulers_sampler_and_grid_are_the_default(scheduler):
    """Another scheduler in the pipeline: its algorithm (sampler, options) and its grid are what fastdiff runs."""
    pipeline = stable_diffusion()
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    t2i = TextToImage(pipeline, device="cpu")
    ours, theirs = _diffusers_images(t2i, 5.0, [8])
    assert _rel(ours, theirs) <= 1e-4, (scheduler, _rel(ours, theirs))


def test_v_prediction():
    t2i = TextToImage(stable_diffusion("v_prediction"), device="cpu")
    assert t2i.pipe.prediction == "v"
    ours, theirs = _diffusers_images(t2i, 5.0, [1])
    assert _rel(ours, theirs) <= 1e-4


def test_prompts_encoded_together_equal_each_alone(tiny_pipelines):
    """One encode call for many prompts (a server's tick) gives each prompt the embeddings it gets alone; SDXL's
    unconditional without a negative prompt is zeros (its force_zeros_for_empty_prompt)."""
    t2i = load_text_to_image(tiny_pipelines["sdxl"], device="cpu")
    prompts = [Prompt("the cat", None, True), Prompt("a dog", "cat", True), Prompt("the mat")]
    together = t2i.encode(prompts)
    for prompt, got in zip(prompts, together):
        (alone,) = t2i.encode([prompt])
        for name, value in alone.cond.items():
            torch.testing.assert_close(got.cond[name], value, rtol=1e-5, atol=1e-6)
        assert (got.uncond is None) == (alone.uncond is None)
    assert all(float(v.abs().max()) == 0 for v in together[0].uncond.values())
    assert together[2].uncond is None
    request = t2i.request(together[:2], n=2, width=32, height=16, steps=4, guidance_scale=5.0)
    assert request.model_kwargs["time_ids"].tolist() == [[16, 32, 0, 0, 16, 32]] * 2
    assert torch.equal(request.uncond_kwargs["time_ids"], request.model_kwargs["time_ids"])
    with pytest.raises(ValueError, match="all be guided or all unguided"):
        t2i.request(together, n=3)
    with pytest.raises(ValueError, match="one per image"):
        t2i.request(together[:2], n=3)


def test_sizes_and_classes_are_checked(tiny_pipelines, tmp_path):
    t2i = load_text_to_image(tiny_pipelines["sd3"], device="cpu")
    assert t2i.latent_shape(32, 16) == (4, 8, 16)
    with pytest.raises(ValueError, match="multiples of 2"):
        t2i.latent_shape(15, 16)
    assert pipeline_class(tiny_pipelines["sdxl"]) == "StableDiffusionXLPipeline"
    (tmp_path / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    with pytest.raises(ValueError, match="'DDPMPipeline' is not supported; supported: StableDiffusionPipeline"):
        load_text_to_image(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no folder"):
        pipeline_class(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pipeline_class(str(tmp_path.parent))
