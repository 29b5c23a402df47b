"""Classifier-free guidance: the fused guided step against the guided output formed outside fastdiff,
doubled-batch against separate calls, guidance_rescale against diffusers' own function, per-sample
conditioning routing, and argument checks."""

from __future__ import annotations

import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.eval.exact import GaussianMixture
from fastdiff.runtime.guidance import rescale_noise_cfg


class CondGaussians:
    """A class-conditional exact network: class y is a Gaussian N(mu_y, s^2 I); y = -1 is the mixture.

    eps(x_t) = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2) for one Gaussian; the unconditional output
    is the exact mixture network. Records every call's batch size.
    """

    def __init__(self, schedule: Schedule):
        self.means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
        self.std = 0.4
        mixture = GaussianMixture(self.means, torch.full((3,), self.std), torch.ones(3) / 3)
        self.mixture = mixture.as_model(schedule, "eps")
        self.schedule = schedule
        self.batches = []

    def __call__(self, x, t, y=None):
        self.batches.append(x.shape[0])
        tt = self.schedule.t_from_model_time(t.double().cpu())
        a = torch.as_tensor(self.schedule.alpha(tt), dtype=torch.float64)[:, None]
        s = torch.as_tensor(self.schedule.sigma(tt), dtype=torch.float64)[:, None]
        mix = self.mixture(x, t).double()
        mu = self.means.double()[y.clamp(min=0)]
        cond = s * (x.double() - a * mu) / (a**2 * self.std**2 + s**2)
        out = torch.where((y >= 0)[:, None], cond, mix)
        return out.to(x.dtype)


@pytest.fixture()
def setup():
    sched = Schedule.vp_discrete()
    return sched, CondGaussians(sched)


def _guided_reference_model(model, w, rescale=0.0):
    """The guided output computed outside fastdiff (diffusers' formula), as a plain unguided model."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg as d_rescale

    def f(x, t, y=None):
        m_c = model(x, t, y=y).float()
        m_u = model(x, t, y=torch.full_like(y, -1)).float()
        m = m_u + w * (m_c - m_u)
        return d_rescale(m, m_c, guidance_rescale=rescale) if rescale else m

    return f


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 0.6)])
@pytest.mark.parametrize("batching", ["double", "separate"])
def test_fused_guidance_equals_guided_model(setup, sampler, eta, batching):
    sched, model = setup
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    kw = dict(sampler=sampler, steps=15, seed=3, progress=False)
    if eta:
        kw["eta"] = eta
    pipe = Pipeline(model, sched, device="cpu")
    got = pipe.sample(
        (6, 2),
        guidance_scale=3.5,
        model_kwargs={"y": y},
        uncond_kwargs={"y": torch.full_like(y, -1)},
        guidance_batching=batching,
        **kw,
    )
    ref = Pipeline(_guided_reference_model(model, 3.5), sched, device="cpu").sample((6, 2), model_kwargs={"y": y}, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_doubled_batch_is_one_call_separate_is_two(setup):
    sched, model = setup
    y = torch.tensor([0, 1, 2])
    pipe = Pipeline(model, sched, device="cpu")
    common = dict(steps=4, progress=False, guidance_scale=2.0, model_kwargs={"y": y}, uncond_kwargs={"y": y * 0 - 1})
    model.batches.clear()
    a = pipe.sample((3, 2), guidance_batching="double", **common)
    assert model.batches == [6] * 4
    model.batches.clear()
    b = pipe.sample((3, 2), guidance_batching="separate", **common)
    assert model.batches == [3] * 8
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    model.batches.clear()
    pipe.sample((3, 2), steps=4, progress=False, model_kwargs={"y": y})  # guidance off: one plain call per step
    assert model.batches == [3] * 4


def test_guidance_rescale_matches_diffusers(setup):
    from diffusers.guiders.guider_utils import rescale_noise_cfg as d_rescale

    g = torch.Generator().manual_seed(0)
    cfg, text = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g) * 2
    for r in (0.0, 0.3, 0.7, 1.0):
        torch.testing.assert_close(rescale_noise_cfg(cfg, text, r), d_rescale(cfg, text, guidance_rescale=r))
    sched, model = setup
    y = torch.tensor([0, 1, 2, 0])
    kw = dict(steps=12, seed=1, progress=False, model_kwargs={"y": y})
    got = Pipeline(model, sched, device="cpu").sample(
        (4, 2), guidance_scale=5.0, guidance_rescale=0.7, uncond_kwargs={"y": torch.full_like(y, -1)}, **kw
    )
    ref = Pipeline(_guided_reference_model(model, 5.0, 0.7), sched, device="cpu").sample((4, 2), **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_per_sample_conditioning_follows_its_row(setup):
    """A row's result depends on its own seed and label only: a mixed batch equals per-class batches."""
    sched, model = setup
    pipe = Pipeline(model, sched, device="cpu")
    y = torch.tensor([2, 0, 1, 0, 2])
    seeds = [11, 12, 13, 14, 15]
    g = dict(guidance_scale=2.5, steps=20, progress=False, sampler="ddpm")
    mixed = pipe.sample((5, 2), seed=seeds, model_kwargs={"y": y}, uncond_kwargs={"y": torch.full_like(y, -1)}, **g)
    for c in (0, 1, 2):
        rows = (y == c).nonzero().flatten()
        yc = y[rows]
        alone = pipe.sample(
            (len(rows), 2),
            seed=[seeds[i] for i in rows],
            model_kwargs={"y": yc},
            uncond_kwargs={"y": torch.full_like(yc, -1)},
            **g,
        )
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-6, atol=1e-6)
    # and conditioning is real: with strong guidance each sample lands near its class mean
    near = pipe.sample(
        (5, 2),
        seed=seeds,
        model_kwargs={"y": y},
        uncond_kwargs={"y": torch.full_like(y, -1)},
        guidance_scale=1.0,
        steps=50,
        progress=False,
    )
    assert ((near - model.means[y]).norm(dim=1) < 4 * model.std * 2).all()


def test_guidance_argument_errors(setup):
    sched, model = setup
    pipe = Pipeline(model, sched, device="cpu")
    y = torch.tensor([0, 1])
    base = dict(steps=2, progress=False, model_kwargs={"y": y})
    with pytest.raises(ValueError, match="guidance_batching must be one of"):
        pipe.sample((2, 2), guidance_scale=2.0, uncond_kwargs={"y": y}, guidance_batching="triple", **base)
    with pytest.raises(ValueError, match="guidance_rescale must lie in"):
        pipe.sample((2, 2), guidance_scale=2.0, guidance_rescale=1.5, uncond_kwargs={"y": y}, **base)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        pipe.sample((2, 2), guidance_rescale=0.5, **base)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        pipe.sample((2, 2), guidance_scale=float("nan"), **base)
    with pytest.raises(TypeError, match="guidance_scale must be a real number"):
        pipe.sample((2, 2), guidance_scale="7", **base)
    with pytest.raises(ValueError, match="same names"):
        pipe.sample((2, 2), guidance_scale=2.0, uncond_kwargs={}, **base)
    with pytest.raises(ValueError, match="cannot be stacked"):
        pipe.sample((2, 2), guidance_scale=2.0, uncond_kwargs={"y": torch.zeros(2, 3, dtype=torch.long)}, **base)
    with pytest.raises(ValueError, match=r"uncond_kwargs\['y'\] has batch size 3"):
        pipe.sample((2, 2), guidance_scale=2.0, uncond_kwargs={"y": torch.tensor([0, 1, 2])}, **base)
    with pytest.raises(TypeError, match="uncond_kwargs must be a mapping"):
        pipe.sample((2, 2), guidance_scale=2.0, uncond_kwargs=[1], **base)
