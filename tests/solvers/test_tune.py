"""Time grids fitted to a network (fastdiff.solvers.tune): the search, judged on held-out seeds and against exact
samples of a Gaussian mixture whose network is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.metrics import sliced_wasserstein
from fastdiff.solvers.tune import EVAL_SEED_BASE, GridParams, Teacher, pattern_search, reference, tune


@pytest.fixture(scope="module")
def mixture_pipe():
    schedule = Schedule.vp_discrete()
    return Pipeline(default_mixture().as_model(schedule), schedule, device="cpu")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_tuned_grid_beats_the_default_on_held_out_seeds_and_against_exact_samples(mixture_pipe, sampler):
    res = tune(
        mixture_pipe,
        sampler,
        4,
        teacher=Teacher(steps=50),
        n_tune=128,
        n_eval=256,
        sample_shape=(2,),
        max_evals=60,
        progress=False,
    )
    loss = res.tuned.loss
    assert loss["tuned"] < 0.7 * loss["default"], loss
    assert res.evals <= 60
    # Judged independently of the teacher: sliced W2 to exact samples, from seeds neither set used.
    gmm = mixture_pipe.model.gmm
    exact = gmm.sample(4000, seed=5)
    seeds = list(range(2 * EVAL_SEED_BASE, 2 * EVAL_SEED_BASE + 4000))
    kw = dict(sampler=sampler, steps=4, seed=seeds, progress=False)
    default = mixture_pipe.sample((4000, 2), **kw)
    tuned = mixture_pipe.sample((4000, 2), grid=res.tuned.grid(mixture_pipe.schedule), **kw)
    assert sliced_wasserstein(tuned, exact) < 0.85 * sliced_wasserstein(default, exact)


def test_tuned_times_are_a_decreasing_grid_from_t_max(mixture_pipe):
    res = tune(
        mixture_pipe,
        "ddim",
        3,
        teacher=Teacher(steps=20),
        n_tune=16,
        n_eval=16,
        sample_shape=(2,),
        max_evals=8,
        progress=False,
        shifts=True,
    )
    times = np.array(res.tuned.times)
    assert times[0] == mixture_pipe.schedule.t_max and np.all(np.diff(times) < 0) and times[-1] > 0
    assert res.tuned.teacher["n_tune"] == 16 and res.tuned.teacher["sampler"] == "unipc"


def test_the_parameterisation_inverts_and_stays_monotone(mixture_pipe):
    params = GridParams(mixture_pipe, 5)
    grid = mixture_pipe.schedule.grid(5, spacing="trailing")
    theta = params.theta(grid.t)
    np.testing.assert_allclose(params.times(theta), grid.t[:5], rtol=1e-9)
    for seed in range(5):  # any parameters at all give a strictly decreasing grid
        times = params.times(np.random.default_rng(seed).normal(scale=3.0, size=5))
        assert np.all(np.diff(times) < 0)


def test_pattern_search_finds_a_quadratic_minimum():
    target = np.array([0.3, -1.2, 2.0])
    calls = []

    def f(x):
        calls.append(1)
        return float(np.square(x - target).sum())

    x, fx = pattern_search(
        f, np.zeros(3), f(np.zeros(3)), step=0.5, min_step=1e-4, max_evals=2000, evals=lambda: len(calls)
    )
    np.testing.assert_allclose(x, target, atol=1e-3)
    assert fx < 1e-5


def test_tuning_and_evaluation_seeds_must_be_disjoint(mixture_pipe):
    ref = reference(mixture_pipe, range(4), 1.0, Teacher(steps=4), (2,))
    with pytest.raises(ValueError, match="disjoint"):
        tune(mixture_pipe, "ddim", 2, sample_shape=(2,), references=(ref, ref), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sampler="rk45", steps=4), "no fixed grid"),
        (dict(sampler="ddim", steps=1), "steps must be an int >= 2"),
        (dict(sampler="ddim", steps=4, max_evals=0), "max_evals"),
        (dict(sampler="ddim", steps=4, guidance_scale=2.0), "class-conditional"),
    ],
)
def test_bad_settings_are_refused(mixture_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(mixture_pipe, sample_shape=(2,), progress=False, n_tune=2, n_eval=2, teacher=Teacher(steps=4), **kwargs)


def test_a_teacher_must_be_a_fixed_program():
    with pytest.raises(ValueError, match="coefficient-program"):
        Teacher(sampler="rk45")
    with pytest.raises(ValueError, match="teacher steps"):
        Teacher(steps=1)


def test_guided_tuning_labels_each_seed_and_uses_the_null_class():
    from fastdiff.nets import UNet

    torch.manual_seed(0)
    net = UNet(channels=[8], emb_dim=16, num_classes=3, groups=4).eval().requires_grad_(False)
    pipe = Pipeline(net, Schedule.vp_discrete(), device="cpu", sample_shape=(1, 8, 8), num_classes=3)
    ref = reference(pipe, [4, 5, 6], 2.0, Teacher(steps=3), (1, 8, 8))
    assert ref.model_kwargs["y"].tolist() == [1, 2, 0] and ref.uncond_kwargs["y"].tolist() == [3, 3, 3]
