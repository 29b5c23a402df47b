"""A text-to-image server's frontend (:class:`~fastdiff.serving.runner.Frontend`): the prompts of every job that
arrives by a tick encoded in one text-encoder call, and the latents of every job that finishes in a tick decoded
by the VAE in one call. A job whose prompts (or latents) make the encoder (or VAE) raise fails alone: the
runner retries the others apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.diffusers.text_to_image import Prompt, TextToImage
from fastdiff.kernels.philox import derive_seeds
from fastdiff.request import SampleRequest


@dataclass(frozen=True)
class ImageJob:
    """One images request: its prompts (one for all images, or one per image) and the settings of
    :meth:`TextToImage.request` (n, width, height, steps, guidance_scale, seed, sampler, sampler options)."""

    prompts: tuple[Prompt, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def skeleton(self, t2i: TextToImage) -> SampleRequest:
        """The job's request without its conditioning (what the runner checks and queues at submission)."""
        return t2i.request(None, **self.settings)


@dataclass
class ImagesResult:
    """A finished job: ``latents`` (float32 [n, C, h, w], the final state), ``images`` (float32 in [0, 1],
    [n, 3, H, W]) and each image's own seed (a request with that seed alone makes that image)."""

    latents: torch.Tensor
    images: torch.Tensor
    seeds: list[int]


class PromptFrontend:
    """Encodes jobs' prompts and decodes their latents, each in one call per pass, with ``t2i``."""

    def __init__(self, t2i: TextToImage):
        self.t2i = t2i

    def prepare(self, jobs: Sequence[ImageJob]) -> list[SampleRequest]:
        """Each job's request, its conditioning from one ``encode`` of all the jobs' prompts."""
        prompts = [p for job in jobs for p in job.prompts]
        encoded = self.t2i.encode(prompts)
        out, at = [], 0
        for job in jobs:
            own = encoded[at : at + len(job.prompts)]
            at += len(job.prompts)
            out.append(self.t2i.request(own[0] if len(own) == 1 else own, **job.settings))
        return out

    def finish(self, jobs: Sequence[ImageJob], samples: Sequence[torch.Tensor]) -> list[ImagesResult]:
        """Each job's images, from one VAE decode of every job's latents."""
        images = self.t2i.decode(torch.cat(list(samples))).cpu()
        out, at = [], 0
        for job, latents in zip(jobs, samples, strict=True):
            n = latents.shape[0]
            seeds = derive_seeds(job.settings.get("seed", 0), n).tolist()
            out.append(ImagesResult(latents.float().cpu(), images[at : at + n], [int(s) for s in seeds]))
            at += n
        return out


__all__ = ["ImageJob", "ImagesResult", "PromptFrontend"]
