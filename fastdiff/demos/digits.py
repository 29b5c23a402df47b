"""The main job on the embedded network: ``make demo`` / ``python -m fastdiff demo``.

Samples the shipped digits network (:func:`fastdiff.pretrained.digits`) with the default sampler and with
classifier-free guidance for each class, inpaints digits (the lower half of real and of generated digits
regenerated, guided to another class), writes the grids as PNGs, and prints sample quality against
network evaluations for fastdiff's samplers and diffusers' schedulers on the same network, from the same
initial noise. Quality is judged independently of the network (:mod:`fastdiff.eval.quality`): the Frechet
distance in a digit classifier's feature space to the real digits, with real digits as the floor.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastdiff.eval.quality import DigitsJudge
from fastdiff.extras import require
from fastdiff.pipeline import Pipeline
from fastdiff.png import image_grid, write_png
from fastdiff.pretrained import digits

# fastdiff sampler -> the diffusers scheduler class running the same algorithm (on the same trailing grid).
DIFFUSERS_PEERS = {
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
}
TABLE_SAMPLERS = ("ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc")


def diffusers_sample(
    scheduler: Any,
    model: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    steps: int,
    seed: int = 0,
    **model_kwargs: Any,
) -> torch.Tensor:
    """diffusers' own sampling loop (``set_timesteps``, ``scale_model_input``, ``step``) with ``model``.

    ``x_T`` is taken as diffusers' ``latents`` (scaled by ``init_noise_sigma``, as its pipelines do).
    """
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        m = model(inp, t.to(torch.float32).expand(x.shape[0]), **model_kwargs)
        x = scheduler.step(m, t, x, **extra).prev_sample
    return x


def _diffusers_scheduler(sampler: str) -> Any:
    diffusers = require("diffusers", "demo")

    cls = getattr(diffusers, DIFFUSERS_PEERS[sampler])
    kw: dict = dict(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_spacing="trailing"
    )
    if sampler == "ddim":
        kw.update(clip_sample=False)
    return cls(**kw)


def quality_table(
    pipe: Pipeline,
    judge: DigitsJudge,
    n: int,
    nfes: Sequence[int],
    samplers: Sequence[str] = TABLE_SAMPLERS,
    with_diffusers: bool = True,
) -> list[dict]:
    """Unconditional samples of every sampler at every NFE, scored; fastdiff on the trailing grid and, where the
    network ships one (docs/tune.md), on its tuned grid; diffusers' peers with their own scheduler classes on the
    trailing grid, all from the same x_T."""
    shape = (n, *pipe.sample_shape)
    x_T = pipe.initial_noise(shape, seed=1234)
    rows = []
    for sampler in samplers:
        for nfe in nfes:
            x = pipe.sample(shape, sampler=sampler, steps=nfe, x_T=x_T, seed=1, spacing="trailing", progress=False)
            rows.append(dict(library="fastdiff", sampler=sampler, nfe=nfe, **vars(judge.score(x))))
        for nfe in (k for k in nfes if (sampler, k, 1.0) in pipe.tuned.settings()):  # the grids the network ships
            x = pipe.sample(shape, sampler=sampler, steps=nfe, x_T=x_T, seed=1, spacing="tuned", progress=False)
            rows.append(dict(library="fastdiff", sampler=f"{sampler}, tuned grid", nfe=nfe, **vars(judge.score(x))))
    if with_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("(diffusers is not installed: its rows are left out)")
            return rows
        for sampler in samplers:
            if sampler not in DIFFUSERS_PEERS:
                continue
            for nfe in nfes:
                x = diffusers_sample(_diffusers_scheduler(sampler), pipe.model, x_T, nfe)
                rows.append(
                    dict(
                        library="diffusers",
                        sampler=DIFFUSERS_PEERS[sampler].replace("Scheduler", ""),
                        nfe=nfe,
                        **vars(judge.score(x)),
                    )
                )
    return rows


def format_table(rows: list[dict], nfes: Sequence[int], floor: float, n: int) -> str:
    """The quality table as Markdown: Frechet distance (classifier confidence) per sampler and NFE."""
    lines = ["| library | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    keys = dict.fromkeys((r["library"], r["sampler"]) for r in rows)
    for lib, name in keys:
        cells = {
            r["nfe"]: f"{r['fd']:.1f} ({r['confidence']:.2f})"
            for r in rows
            if r["library"] == lib and r["sampler"] == name
        }
        lines.append(f"| {lib} | {name} | " + " | ".join(cells.get(k, "") for k in nfes) + " |")
    lines.append(
        f"| real digits | (floor: {n} real digits, mean of 8 draws) | "
        + " | ".join(f"{floor:.1f}" for _ in nfes)
        + " |"
    )
    return "\n".join(lines)


def lower_half_mask(shape: Sequence[int]) -> torch.Tensor:
    """[1, 1, H, W]: 1 (regenerate) on the lower half of each image, 0 (keep) on the upper half."""
    h, w = shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 2 :, :] = 1.0
    return mask


def inpaint_digits(
    pipe: Pipeline, images: torch.Tensor, labels: torch.Tensor, guidance_scale: float, steps: int = 50, seed: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower half of each of ``images`` regenerated, guided to the class after its own (``labels + 1`` mod 10),
    the upper half kept (:meth:`Pipeline.sample` with ``init`` and ``mask``). Returns (inpainted, target labels)."""
    targets = (labels + 1) % 10
    out = pipe.sample(
        tuple(images.shape),
        steps=steps,
        seed=seed,
        progress=False,
        init=images,
        mask=lower_half_mask(images.shape),
        model_kwargs={"y": targets},
        uncond_kwargs={"y": torch.full_like(targets, pipe.num_classes)},
        guidance_scale=guidance_scale,
    )
    return out, targets


def inpainting_figure(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of images [n, 1, H, W] stacked for :func:`image_grid` (one figure row each, the same n)."""
    return torch.cat(list(rows), dim=0)


def run_digits_demo(
    out_dir: str = "out",
    n: int = 128,
    nfes: Sequence[int] = (5, 10, 20),
    with_diffusers: bool = True,
    guidance_scale: float = 3.0,
    threads: int | None = None,
) -> dict:
    """Runs the demo; returns what it printed as data (rows, floor, accuracies, paths, seconds)."""
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    pipe = digits(device="cpu")
    judge = DigitsJudge()
    with torch.inference_mode():
        grid = pipe.sample((64, *pipe.sample_shape), seed=0, progress=False)  # the defaults: ddim, 50 steps
        path_default = os.path.join(out_dir, "digits.png")
        write_png(path_default, image_grid(grid, rows=8))
        labels = torch.arange(10).repeat_interleave(8)
        guided = pipe.sample(
            (80, *pipe.sample_shape),
            steps=25,
            seed=1,
            progress=False,
            model_kwargs={"y": labels},
            uncond_kwargs={"y": torch.full_like(labels, pipe.num_classes)},
            guidance_scale=guidance_scale,
        )
        path_guided = os.path.join(out_dir, "digits_guided.png")
        write_png(path_guided, image_grid(guided.reshape(10, 8, 1, 8, 8).transpose(0, 1).reshape(80, 1, 8, 8), rows=8))
        default_score = judge.score(grid)
        guided_score = judge.score(guided, labels)
        real = torch.stack([judge.images[judge.labels == d][0] for d in range(10)])  # one real digit per class
        generated = guided.reshape(10, 8, 1, 8, 8)[:, 0]  # the first guided sample of each class
        real_inpainted, targets = inpaint_digits(pipe, real, torch.arange(10), guidance_scale)
        gen_inpainted, _ = inpaint_digits(pipe, generated, torch.arange(10), guidance_scale)
        known = real * (1 - lower_half_mask(real.shape))
        figure = inpainting_figure([real, known, real_inpainted, generated, gen_inpainted])
        path_inpaint = os.path.join(out_dir, "digits_inpainting.png")
        write_png(path_inpaint, image_grid(figure, rows=5))
        inpaint_score = judge.score(torch.cat([real_inpainted, gen_inpainted]), torch.cat([targets, targets]))
        rows = quality_table(pipe, judge, n, nfes, with_diffusers=with_diffusers)
    floor = judge.real_floor(n)
    print(
        f"wrote {path_default} (64 samples, ddim, 50 steps: FD {default_score.fd:.1f}, "
        f"confidence {default_score.confidence:.2f})"
    )
    print(
        f"wrote {path_guided} (one column per digit 0-9, guidance {guidance_scale}, ddim 25 steps: "
        f"{100 * guided_score.accuracy:.0f}% classified as the requested digit)"
    )
    print(
        f"wrote {path_inpaint} (rows: real digits 0-9, their kept upper halves, the lower halves regenerated guided "
        f"to the next digit; generated digits, likewise: {100 * inpaint_score.accuracy:.0f}% classified as the "
        "digit they were guided to)"
    )
    print(
        f"\nFrechet distance to the real digits in a digit classifier's features, lower is better "
        f"(mean classifier confidence); {n} unconditional samples from the same x_T, trailing timesteps\n"
        f"('tuned grid': the grid fitted to this network, docs/tune.md):\n"
    )
    print(format_table(rows, nfes, floor, n))
    seconds = time.time() - start
    print(f"\n({seconds:.0f} s)")
    return dict(
        rows=rows,
        floor=floor,
        default=vars(default_score),
        guided=vars(guided_score),
        inpainting=vars(inpaint_score),
        paths=[path_default, path_guided, path_inpaint],
        seconds=seconds,
    )
