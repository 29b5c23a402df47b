"""Replacement inpainting (and RePaint's resampling) against the exact conditional distribution of a Gaussian mixture.

The exact conditional (``GaussianMixture.conditional``) is checked against the joint density itself (Bayes' rule with
the known coordinate's marginal integrated numerically). Then the measured distance of ``Pipeline.sample(init=,
mask=)`` to it (docs/editing.md's table, ``python -m fastdiff.eval.inpainting``) is held with margin, and the same
check on samples that ignore the mask must fail it: it is not vacuous.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastdiff.eval.exact import GaussianMixture  # noqa: E402
from fastdiff.eval.inpainting import inpainting_distance, mixture_cases, noise_floor  # noqa: E402

# Measured with 10,000 samples, seed 0 (docs/editing.md), and the bound each test holds: ~1.25x the measurement. The
# sampling error of 10,000 samples (exact vs exact) is 0.018 (decisive) and 0.082 (ambiguous).
MEASURED = {
    ("decisive", "ddpm", 50, 0): (0.304, 0.38),
    ("decisive", "ddim", 10, 0): (0.439, 0.55),
    ("ambiguous", "ddpm", 50, 0): (0.613, 0.77),
    ("decisive", "ddpm", 50, 4): (0.100, 0.13),  # RePaint's resampling: a third of replacement's distance
}
NO_MASK_DECISIVE = 1.299  # ddpm, 50 steps, the mask ignored: the unconditional marginal of x


@pytest.mark.parametrize("value", [-2.5, 0.5, 1.7])
def test_conditional_is_bayes_rule_on_the_joint_density(value: float) -> None:
    gmm = GaussianMixture([[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0], [0.0, -2.5, 0.5]], [[0.5, 0.4, 0.3], [0.35, 0.3, 0.6],
                          [0.6, 0.5, 0.4]], [0.5, 0.3, 0.2])  # fmt: skip
    cond = gmm.conditional([False, True, False], [value])
    # The joint density at (x, value, z) over a fine grid of (x, z), normalised numerically: p(x, z | y = value).
    xs = torch.linspace(-6, 6, 241, dtype=torch.float64)
    gx, gz = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), torch.full_like(gx.reshape(-1), value), gz.reshape(-1)], dim=1)
    log_joint = gmm.log_prob(pts)
    cell = float(xs[1] - xs[0]) ** 2
    log_norm = torch.logsumexp(log_joint, 0) + torch.log(torch.tensor(cell, dtype=torch.float64))
    expected = log_joint - log_norm
    got = cond.log_prob(pts[:, [0, 2]])
    keep = expected > -20  # where the density is not negligible
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)


def test_conditional_refuses_bad_masks() -> None:
    gmm = mixture_cases()["decisive"].gmm
    with pytest.raises(ValueError, match="known must be"):
        gmm.conditional([True, True], [0.0, 0.0])
    with pytest.raises(ValueError, match="values must hold"):
        gmm.conditional([False, True], [0.0, 1.0])


@pytest.mark.parametrize("case,sampler,steps,jumps", list(MEASURED))
def test_inpainting_within_its_measured_distance(case: str, sampler: str, steps: int, jumps: int) -> None:
    measured, bound = MEASURED[(case, sampler, steps, jumps)]
    dist = inpainting_distance(mixture_cases()[case], sampler, steps, n=10_000, jumps=jumps)
    print(f"{case} {sampler} {steps} steps, jumps {jumps}: sliced W2 {dist:.3f} (measured {measured}, bound {bound})")
    assert dist <= bound
    if jumps:  # resampling narrows the gap: below what replacement alone measured
        assert bound < MEASURED[(case, sampler, steps, 0)][0]
    assert dist > noise_floor(mixture_cases()[case]), "closer than sampling error: not a measurement of the gap"


def test_ignoring_the_mask_fails_the_bound() -> None:
    """What inpainting that dropped the blend would give is far outside the bound the test above holds."""
    dist = inpainting_distance(mixture_cases()["decisive"], "ddpm", 50, n=10_000, use_mask=False)
    print(f"mask ignored: sliced W2 {dist:.3f} (measured {NO_MASK_DECISIVE})")
    assert dist > 2 * MEASURED[("decisive", "ddpm", 50, 0)][1]


def test_the_cases_use_the_demos_mixture() -> None:
    from fastdiff.demos.mixture import default_mixture

    demo, case = default_mixture(), mixture_cases()["decisive"].gmm
    for name in ("means", "stds", "weights"):
        assert torch.equal(getattr(demo, name), getattr(case, name)), name
