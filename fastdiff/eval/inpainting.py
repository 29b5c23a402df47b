"""How close replacement inpainting comes to the exact conditional distribution, on a Gaussian mixture.

Inpainting by replacement (diffusers' 4-channel loop, :meth:`fastdiff.Pipeline.sample` with ``mask``) keeps the known
coordinates on the forward-noised known values and lets the sampler fill in the rest. It only approximates sampling
from ``p(x_unknown | x_known)``: early steps see the known values through heavy noise, so the unknown part can commit
to a component the known values make unlikely. On an exact mixture network that conditional is known in closed form
(:meth:`fastdiff.eval.exact.GaussianMixture.conditional`), so the gap can be measured: sliced W2 between the
inpainted unknown coordinates and exact conditional samples. ``python -m fastdiff.eval.inpainting`` prints the table
docs/editing.md shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdiff.eval.exact import GaussianMixture
from fastdiff.eval.metrics import sliced_wasserstein
from fastdiff.pipeline import Pipeline
from fastdiff.schedule import Schedule


@dataclass(frozen=True)
class InpaintingCase:
    """A mixture, which coordinates are known (``known``: [D] bool) and their values: the inpainting problem."""

    gmm: GaussianMixture
    known: tuple[bool, ...]
    values: tuple[float, ...]

    @property
    def known_mask(self) -> torch.Tensor:
        """``known`` as a bool tensor."""
        return torch.tensor(self.known, dtype=torch.bool)

    def exact(self, n: int, seed: int) -> torch.Tensor:
        """``n`` exact samples of the unknown coordinates given the known values, [n, number unknown]."""
        return self.gmm.conditional(self.known_mask, self.values).sample(n, seed=seed)


def mixture_cases() -> dict[str, InpaintingCase]:
    """A 2-D mixture (components at (-2, 0), (2, 1), (0, -2.5), standard deviations 0.5, 0.35, 0.6, weights 0.5 /
    0.3 / 0.2: the mixture fastdiff's demo samples) with y known. ``"decisive"``: y = -2.5, which only the third
    component explains, so x given y is N(0, 0.6^2). ``"ambiguous"``: y = 0.5, between the first two: x given y is
    bimodal, weights 0.66 at x = -2 and 0.34 at x = 2 (unconditionally x is 0.5 / 0.3 / 0.2 over -2, 2, 0)."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])  # float32 values, as the demo's
    gmm = GaussianMixture(means, torch.tensor([0.5, 0.35, 0.6]), torch.tensor([0.5, 0.3, 0.2]))
    return {
        "decisive": InpaintingCase(gmm, (False, True), (-2.5,)),
        "ambiguous": InpaintingCase(gmm, (False, True), (0.5,)),
    }


def inpainting_distance(
    case: InpaintingCase,
    sampler: str = "ddpm",
    steps: int = 50,
    n: int = 10_000,
    seed: int = 0,
    schedule: Schedule | None = None,
    use_mask: bool = True,
    jumps: int = 0,
) -> float:
    """Sliced W2 between ``n`` inpainted samples' unknown coordinates (``sampler``, ``steps``, the exact eps network
    on ``schedule``, default diffusers' DDPM schedule) and ``n`` exact conditional samples. ``use_mask=False`` samples
    without the mask (the unconditional marginal of the unknown coordinates): what broken inpainting would give;
    ``jumps`` adds RePaint's resampling."""
    schedule = Schedule.vp_discrete() if schedule is None else schedule
    pipe = Pipeline(case.gmm.as_model(schedule, "eps"), schedule, device="cpu")
    known = case.known_mask
    dim = case.gmm.dim
    init = torch.zeros(n, dim)
    init[:, known] = torch.tensor(case.values, dtype=torch.float32)
    edit = dict(init=init, mask=(~known).float()[None], jumps=jumps) if use_mask else {}
    out = pipe.sample((n, dim), sampler, steps, seed=seed, progress=False, **edit)
    return sliced_wasserstein(out[:, ~known].double(), case.exact(n, seed + 1))


def noise_floor(case: InpaintingCase, n: int = 10_000, seed: int = 0) -> float:
    """Sliced W2 between two independent sets of ``n`` exact conditional samples: the distance sampling error alone
    gives."""
    return sliced_wasserstein(case.exact(n, seed + 1), case.exact(n, seed + 2))


def table(
    samplers: Sequence[str] = ("ddpm", "ddim"), steps: Sequence[int] = (10, 25, 50, 100, 250), n: int = 10_000
) -> str:
    """The measurement as a markdown table: per case, one row per sampler and step count, RePaint's resampling, then
    two references: the samples without the mask (what inpainting that ignored it would give) and two exact sets
    (sampling error)."""
    cases = mixture_cases()
    lines = [
        "| sampler | steps | " + " | ".join(f"{name} (y = {c.values[0]})" for name, c in cases.items()) + " |",
        "|---|---|" + "---|" * len(cases),
    ]
    for sampler in samplers:
        for k in steps:
            row = " | ".join(f"{inpainting_distance(c, sampler, k, n):.3f}" for c in cases.values())
            lines.append(f"| {sampler} | {k} | {row} |")
    for k in (10, 50):
        for jumps in (4, 9):
            row = " | ".join(f"{inpainting_distance(c, 'ddpm', k, n, jumps=jumps):.3f}" for c in cases.values())
            lines.append(f"| ddpm, jumps={jumps} ({jumps + 1}x the evaluations) | {k} | {row} |")
    no_mask = " | ".join(f"{inpainting_distance(c, 'ddpm', 50, n, use_mask=False):.3f}" for c in cases.values())
    lines.append(f"| ddpm, mask ignored | 50 | {no_mask} |")
    floor = " | ".join(f"{noise_floor(c, n):.3f}" for c in cases.values())
    lines.append(f"| exact vs exact ({n} samples) | | {floor} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(table())
