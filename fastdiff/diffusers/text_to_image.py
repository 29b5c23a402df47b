"""A diffusers text-to-image pipeline's parts around a fastdiff pipeline: :class:`TextToImage`.

The text encoders and the VAE stay diffusers' own (their ``encode_prompt`` and the VAE's decode with the image
processor's post-processing), so embeddings and images are what diffusers makes; the denoising loop is fastdiff's
(:func:`~fastdiff.diffusers.pipeline.from_diffusers` on the pipeline's denoiser and scheduler). What the serving
engine batches per step is a :class:`~fastdiff.request.SampleRequest` whose rows carry their prompt embeddings
(and SDXL's added conditioning) as conditioning: :meth:`TextToImage.request` builds it, so the server and an
offline call run the same request.

Supported: ``StableDiffusionPipeline`` (SD 1.x/2.x, eps or v prediction), ``StableDiffusionXLPipeline`` (two text
encoders, pooled embeddings and ``add_time_ids`` per row) and ``StableDiffusion3Pipeline`` (flow matching; the T5
encoder optional, as diffusers allows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.diffusers.pipeline import DiffusersPipeline, from_diffusers
from fastdiff.request import SampleRequest, SeedLike

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")


class AddedConditionUNet(torch.nn.Module):
    """SDXL's UNet called with flat keyword arguments: ``text_embeds`` (pooled) and ``time_ids`` become its
    ``added_cond_kwargs``, so that each is a per-row tensor the serving engine can slice and stack."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample


@dataclass(frozen=True)
class Prompt:
    """One request's text: its prompt, its negative prompt (None: the pipeline's default unconditional) and
    whether it is guided (diffusers guides when ``guidance_scale > 1``)."""

    text: str
    negative: str | None = None
    guided: bool = False


@dataclass
class Encoded:
    """One prompt's conditioning (one row; the request repeats it for its n images) and, if guided, the
    unconditional's."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None


def pipeline_class(path: str) -> str:
    """The ``_class_name`` of the pipeline saved at ``path`` (a folder with ``model_index.json``, or a hub id)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".")):
        raise FileNotFoundError(f"no folder {path!r} (a diffusers save_pretrained folder, or a hub id)")
    if os.path.isdir(path):
        if not os.path.exists(index):
            raise FileNotFoundError(f"{path!r} has no model_index.json (not a diffusers save_pretrained folder)")
        with open(index) as f:
            return json.load(f).get("_class_name", "")
    import diffusers

    return diffusers.DiffusionPipeline.load_config(path).get("_class_name", "")


def load_text_to_image(path: str, device: str | torch.device | None = None) -> TextToImage:
    """The pipeline saved at ``path`` (diffusers' ``save_pretrained`` layout, or a hub id where a hub is reachable)
    as a :class:`TextToImage` on ``device`` (default CUDA if available); ValueError for a class not supported."""
    name = pipeline_class(path)
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"pipeline class {name or '(none)'!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(path)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}  # saved as None
    pipeline = getattr(diffusers, name).from_pretrained(path, **absent)
    return TextToImage(pipeline, device)


class TextToImage:
    """A diffusers text-to-image pipeline (:data:`SUPPORTED_PIPELINES`) with fastdiff's loop.

    Args:
        pipeline: the diffusers pipeline (its text encoders, tokenizers, denoiser, VAE and scheduler are used).
        device: where everything runs (default CUDA if available, else the CPU).

    Attributes:
        pipe: the :class:`~fastdiff.diffusers.pipeline.DiffusersPipeline` of the denoiser and scheduler: the
            scheduler's sampler and grid by default, exactly as :func:`fastdiff.from_diffusers` reads them.
        kind: the pipeline class name.
        size_factor: image sizes are multiples of this (the VAE's factor, times the transformer's patch size).
        default_size: (width, height) of the denoiser's native sample size.
    """

    def __init__(self, pipeline: Any, device: str | torch.device | None = None):
        self.kind = type(pipeline).__name__
        if self.kind not in SUPPORTED_PIPELINES:
            raise ValueError(
                f"pipeline class {self.kind!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        denoiser = pipeline.transformer if self.kind == "StableDiffusion3Pipeline" else pipeline.unet
        network = AddedConditionUNet(denoiser) if self.kind == "StableDiffusionXLPipeline" else denoiser
        self.pipe: DiffusersPipeline = from_diffusers(network, pipeline.scheduler, device=device, dtype=denoiser.dtype)
        self.latent_channels = int(denoiser.config.in_channels)
        self.size_factor = int(pipeline.vae_scale_factor) * int(getattr(denoiser.config, "patch_size", 1) or 1)
        side = int(denoiser.config.sample_size) * int(pipeline.vae_scale_factor)
        self.default_size = (side, side)

    # ------------------------------------------------------------------ sizes and prompts
    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """One image's latent shape for a ``width`` x ``height`` image (ValueError unless both are positive
        multiples of :attr:`size_factor`)."""
        f = self.size_factor
        if width < 1 or height < 1 or width % f or height % f:
            raise ValueError(f"width and height must be positive multiples of {f}, got {width}x{height}")
        vae = int(self.pipeline.vae_scale_factor)
        return (self.latent_channels, height // vae, width // vae)

    def token_limit(self) -> int:
        """The most tokens a prompt may have before the text encoders cut it (the smallest of theirs)."""
        return min(t.model_max_length for t in self._tokenizers())

    def truncated(self, text: str) -> bool:
        """Whether ``text`` is longer than a text encoder takes (diffusers cuts it, with a warning)."""
        return any(len(t(text, truncation=False).input_ids) > t.model_max_length for t in self._tokenizers())

    def _tokenizers(self) -> list[Any]:
        names = ("tokenizer", "tokenizer_2")  # SD3's T5 has its own longer limit (max_sequence_length)
        return [t for t in (getattr(self.pipeline, n, None) for n in names) if t is not None]

    def encode(self, prompts: Sequence[Prompt]) -> list[Encoded]:
        """The conditioning of each prompt, with every text (prompts and the negative prompts of guided ones)
        encoded in one ``encode_prompt`` call, as diffusers encodes them."""
        texts: list[str] = [p.text for p in prompts]
        zero_negative = self.kind == "StableDiffusionXLPipeline" and self.pipeline.config.force_zeros_for_empty_prompt
        negative_at: dict[int, int] = {}
        for i, p in enumerate(prompts):
            if p.guided and not (zero_negative and p.negative is None):
                negative_at[i] = len(texts)
                texts.append(p.negative or "")
        rows = self._encode_texts(texts)
        out = []
        for i, p in enumerate(prompts):
            cond = {k: v[i : i + 1] for k, v in rows.items()}
            uncond = None
            if p.guided:
                j = negative_at.get(i)
                uncond = {k: (v[j : j + 1] if j is not None else torch.zeros_like(cond[k])) for k, v in rows.items()}
            out.append(Encoded(cond, uncond))
        return out

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The texts' conditioning as the denoiser's keyword arguments, one row per text."""
        device = self.pipe.device
        pipeline = self.pipeline
        with torch.no_grad():
            if self.kind == "StableDiffusionPipeline":
                embeds, _ = pipeline.encode_prompt(texts, device, 1, False)
                return {"encoder_hidden_states": embeds}
            if self.kind == "StableDiffusionXLPipeline":
                embeds, _, pooled, _ = pipeline.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
                return {"encoder_hidden_states": embeds, "text_embeds": pooled}
            embeds, _, pooled, _ = pipeline.encode_prompt(
                texts, None, None, device=device, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ------------------------------------------------------------------ requests
    def request(
        self,
        encoded: Encoded | Sequence[Encoded] | None,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        steps: int = 50,
        guidance_scale: float = 1.0,
        seed: SeedLike = 0,
        sampler: str | None = None,
        init: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        **options: Any,
    ) -> SampleRequest:
        """The sample request of ``n`` images: ``encoded`` (from :meth:`encode`) is one prompt's conditioning for
        all of them or one per image (None: the request without its conditioning, what a server checks before it
        encodes the prompts). ``sampler`` default the scheduler's, with its config's options (``options``
        override them); on the scheduler's own grid. ``init`` (image latents, :meth:`encode_images`), ``mask``
        (:meth:`latent_mask`) and ``strength`` edit images (:meth:`edit`). What the server runs and what
        :meth:`generate` runs."""
        width, height = (width or self.default_size[0]), (height or self.default_size[1])
        shape = self.latent_shape(width, height)
        sampler = sampler or self.pipe.setup.sampler
        opts = dict(self.pipe.setup.options) if sampler == self.pipe.setup.sampler else {}
        opts.update(options)
        guided = guidance_scale > 1  # as diffusers: guidance only above 1
        cond, uncond = ({}, {}) if encoded is None else self._rows(encoded, n, width, height)
        if not guided:
            uncond = None
        elif uncond is None:
            raise ValueError("guidance_scale > 1 needs prompts encoded as guided (Prompt(..., guided=True))")
        return SampleRequest(
            n=n,
            sample_shape=shape,
            sampler=sampler,
            steps=steps,
            seed=seed,
            guidance_scale=float(guidance_scale) if guided else 1.0,
            model_kwargs=cond,
            uncond_kwargs=uncond,
            options=opts,
            init=init,
            mask=mask,
            strength=strength,
        )

    def _rows(
        self, encoded: Encoded | Sequence[Encoded], n: int, width: int, height: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The n rows of conditioning (and of the unconditional, if guided) of one prompt or one per image."""
        each = [encoded] * n if isinstance(encoded, Encoded) else list(encoded)
        if len(each) != n:
            raise ValueError(f"one prompt for all images or one per image ({n}), got {len(each)}")
        guided = {e.uncond is not None for e in each}
        if len(guided) != 1:
            raise ValueError("the prompts of one request must all be guided or all unguided")
        if self.kind == "StableDiffusionXLPipeline":  # (original size, crop top-left, target size): its defaults
            pooled = each[0].cond["text_embeds"]
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
            each = [Encoded(dict(e.cond, time_ids=ids), None if e.uncond is None else dict(e.uncond, time_ids=ids))
                    for e in each]  # fmt: skip
        cond = {k: torch.cat([e.cond[k] for e in each]) for k in each[0].cond}
        if each[0].uncond is None:
            return cond, None
        return cond, {k: torch.cat([e.uncond[k] for e in each]) for k in each[0].uncond}

    def generate(
        self, prompt: str, negative_prompt: str | None = None, guidance_scale: float = 1.0, **request: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline: ``(latents, images)`` for one prompt (``request``: :meth:`request`'s other arguments); images
        are float32 in [0, 1], [n, 3, H, W]. A served request with the same settings and seeds equals this."""
        from fastdiff.pipeline import Pipeline

        (encoded,) = self.encode([Prompt(prompt, negative_prompt, guidance_scale > 1)])
        req = self.request(encoded, guidance_scale=guidance_scale, **request)
        with torch.no_grad():
            latents = Pipeline.sample(self.pipe, req, progress=False)  # the engine's path: the request as it is
        return latents, self.decode(latents)

    def edit(
        self,
        prompt: str,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        strength: float = 0.8,
        negative_prompt: str | None = None,
        guidance_scale: float = 1.0,
        **request: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline image editing: ``(latents, images)`` for one prompt from ``image`` (float in [0, 1], [1 or n, 3,
        H, W]; the images' size is the image's): image-to-image from ``strength``, or with ``mask`` ([1 or n, 1, H,
        W], 1 = regenerate) inpainting. ``request``: :meth:`request`'s other arguments. A served edit
        (``POST /v1/images/edits``) with the same settings and seeds equals this."""
        n = int(request.pop("n", 1))
        height, width = int(image.shape[-2]), int(image.shape[-1])
        init, latent_mask = self.edit_latents(image, mask, n)
        return self.generate(prompt, negative_prompt, guidance_scale, n=n, width=width, height=height,
                             init=init, mask=latent_mask, strength=strength, **request)  # fmt: skip

    def edit_latents(
        self, image: torch.Tensor, mask: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` rows of an edit's image latents (:meth:`encode_images`) and latent mask (:meth:`latent_mask`)."""
        init = self.encode_images(image).to(self.pipe.device)
        init = init.expand(n, *init.shape[1:]).contiguous() if init.shape[0] == 1 else init
        if mask is None:
            return init, None
        latent = self.latent_mask(mask)
        return init, latent.expand(n, *latent.shape[1:]).contiguous() if latent.shape[0] == 1 else latent

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (float32 in [0, 1], [n, 3, H, W]) from final latents, as the diffusers pipeline makes them: the
        VAE's scaling (and shift, or latent mean/std) undone, decoded, then its image processor's post-processing."""
        vae = self.pipeline.vae
        cfg = vae.config
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * std_t / cfg.scaling_factor + mean_t
        else:
            latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The latents of images (float in [0, 1], [n, 3, H, W]) for editing, scaled as diffusers' image-to-image
        and inpainting pipelines scale them: the VAE posterior's mean (diffusers draws a sample of it with its
        generator; the mean keeps an edit a function of its seed alone, and the posterior's spread is the VAE's
        small latent noise)."""
        vae = self.pipeline.vae
        cfg = vae.config
        with torch.no_grad():
            latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype) * 2 - 1).latent_dist.mode()
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            return (latents - mean_t) * cfg.scaling_factor / std_t
        return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask ([n, 1, H, W], 1 = regenerate) at the latents' size, as diffusers' inpainting pipelines
        make it: binarized at 0.5, then resized (nearest) to the latent grid."""
        binary = (mask >= 0.5).to(torch.float32)
        vae = int(self.pipeline.vae_scale_factor)
        size = (mask.shape[-2] // vae, mask.shape[-1] // vae)
        return torch.nn.functional.interpolate(binary, size=size).to(self.pipe.device)

    def diffusers_latents(self, x_T: torch.Tensor, steps: int) -> torch.Tensor:
        """What diffusers' ``latents=`` argument must be for its pipeline to start where fastdiff's native
        ``x_T`` starts on the scheduler's grid for ``steps`` (the inverse of its ``init_noise_sigma`` scaling)."""
        _, scale = self.pipe.diffusers_grid(steps)
        return x_T / scale


__all__ = [
    "SUPPORTED_PIPELINES",
    "AddedConditionUNet",
    "Encoded",
    "Prompt",
    "TextToImage",
    "load_text_to_image",
    "pipeline_class",
]
