"""Image editing through ``Pipeline.sample``: image-to-image (``init``, ``strength``) and inpainting (``mask``).

Exact networks of a Gaussian mixture (``GaussianMixture.as_model``). What is checked: the grid is cut where
diffusers' ``get_timesteps`` cuts it; the start state is ``alpha init + sigma z`` with z the seed's initial noise; a
sample depends on its seed alone; every fixed-step sampler runs both edits and inpainting keeps the known region
(exactly ``init`` at the end); a mask of ones is image-to-image and a mask of zeros returns ``init``; at zero
terminal SNR and strength 1 image-to-image is plain sampling; one step op per stage; clear errors for bad input.
The distance to the exact conditional distribution is tests/eval/test_inpainting.py's.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastdiff import Pipeline, Schedule  # noqa: E402
from fastdiff.demos.mixture import default_mixture  # noqa: E402
from fastdiff.eval.exact import GaussianMixture  # noqa: E402
from fastdiff.program import edit_start  # noqa: E402
from fastdiff.samplers import EAGER_SAMPLERS, list_samplers  # noqa: E402

GMM = default_mixture()
GMM4 = GaussianMixture([[1.0, -1.0, 0.5, 0.0], [-1.0, 2.0, 0.0, 1.0]], [0.5, 0.8], [0.4, 0.6])
FIXED_STEP = [s.name for s in list_samplers() if s.name not in EAGER_SAMPLERS]


def _pipe(schedule: Schedule | None = None, gmm: GaussianMixture = GMM) -> Pipeline:
    schedule = Schedule.vp_discrete() if schedule is None else schedule
    return Pipeline(gmm.as_model(schedule, "eps"), schedule, device="cpu")


def _schedule_for(sampler: str) -> Schedule:
    return Schedule.flow() if sampler.startswith("flow_") else Schedule.vp_discrete()


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.55, 0.8, 1.0])
def test_the_grid_is_cut_where_diffusers_cuts_it(strength: float, steps: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    if init_timestep == 0:
        with pytest.raises(ValueError, match="no step"):
            edit_start(steps, strength)
        return
    theirs = sched.timesteps[max(steps - init_timestep, 0) :]
    pipe = _pipe()
    init = GMM.sample(4, seed=1)
    _, traj = pipe.sample((4, 2), "ddim", steps, init=init, strength=strength, return_x0=True, progress=False)
    assert traj.shape[0] == len(theirs)
    prog = pipe.program("ddim", steps, spacing="leading")
    assert [float(t) for t in prog.grid.model_time[edit_start(steps, strength) : -1]] == [float(t) for t in theirs]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler", "heun"])
def test_the_start_is_init_noised_with_the_seeds_initial_noise(sampler: str) -> None:
    pipe = _pipe()
    init = GMM.sample(6, seed=2)
    strength = 0.6
    _, traj = pipe.sample((6, 2), sampler, 20, seed=[3, 4, 5, 6, 7, 8], init=init, strength=strength,
                          return_trajectory=True, progress=False)  # fmt: skip
    full = pipe.program(sampler, 20).grid
    start = edit_start(20, strength)
    z = pipe.initial_noise((6, 2), [3, 4, 5, 6, 7, 8]) / pipe.schedule.prior_std
    expected = float(full.alpha[start]) * init + float(full.sigma[start]) * z
    torch.testing.assert_close(traj[0], expected, rtol=0, atol=1e-6)
    assert traj.shape[0] == 20 - start + 1


@pytest.mark.parametrize("mask", [None, "half"])
def test_a_sample_depends_on_its_seed_alone(mask: str | None) -> None:
    pipe = _pipe(gmm=GMM4)
    init = GMM4.sample(5, seed=3)
    m = None if mask is None else torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    kw = dict(init=init, strength=0.7, mask=m, progress=False)
    together = pipe.sample((5, 4), "ddpm", 12, seed=[10, 11, 12, 13, 14], **kw)
    for b in (0, 3):
        alone = pipe.sample((1, 4), "ddpm", 12, seed=[10 + b], init=init[b : b + 1], strength=0.7,
                            mask=m, progress=False)  # fmt: skip
        assert torch.equal(together[b : b + 1], alone)
    again = pipe.sample((5, 4), "ddpm", 12, seed=[10, 11, 12, 13, 14], **kw)
    assert torch.equal(together, again)
    other = pipe.sample((5, 4), "ddpm", 12, seed=[20, 11, 12, 13, 14], **kw)
    assert not torch.equal(together[0], other[0]) and torch.equal(together[1:], other[1:])


@pytest.mark.parametrize("sampler", FIXED_STEP)
def test_every_fixed_step_sampler_edits(sampler: str) -> None:
    """Image-to-image and inpainting run for every coefficient-program sampler; inpainting ends on init exactly in
    the known region, and its unknown region stays near the data (finite, within the mixture's range)."""
    schedule = _schedule_for(sampler)
    pipe = _pipe(schedule, GMM4)
    init = GMM4.sample(16, seed=4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    steps = 12
    img2img = pipe.sample((16, 4), sampler, steps, seed=1, init=init, strength=0.5, progress=False)
    inpaint = pipe.sample((16, 4), sampler, steps, seed=1, init=init, strength=0.5, mask=mask, progress=False)
    for out in (img2img, inpaint):
        assert torch.isfinite(out).all() and out.abs().max() < 10
    assert torch.equal(inpaint[:, 2:], init[:, 2:])
    # Only the unknown coordinates differ from image-to-image's: the blend changes the state it steps from.
    assert not torch.equal(inpaint[:, :2], img2img[:, :2])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm"])
@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_a_mask_of_ones_is_image_to_image_and_of_zeros_is_init(sampler: str, strength: float) -> None:
    pipe = _pipe(gmm=GMM4)
    init = GMM4.sample(8, seed=5)
    kw = dict(seed=2, init=init, strength=strength, progress=False)
    ones = pipe.sample((8, 4), sampler, 10, mask=torch.ones(8, 4), **kw)
    zeros = pipe.sample((8, 4), sampler, 10, mask=torch.zeros(1, 4), **kw)
    assert torch.equal(zeros, init)
    if strength < 1.0:  # at strength 1 inpainting starts from pure noise (as diffusers' does), image-to-image not
        assert torch.equal(ones, pipe.sample((8, 4), sampler, 10, **kw))
    else:
        assert torch.equal(ones, pipe.sample((8, 4), sampler, 10, seed=2, progress=False))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_zero_terminal_snr_strength_one_is_plain_sampling(sampler: str) -> None:
    schedule = Schedule.vp_discrete(rescale_zero_terminal_snr=True)
    assert float(schedule.grid(10, spacing="trailing").alpha[0]) == 0.0
    pipe = Pipeline(GMM.as_model(schedule, "v"), schedule, prediction="v", device="cpu")
    init = GMM.sample(64, seed=6) * 3.0  # far from the data: it must not matter at all
    plain = pipe.sample((64, 2), sampler, 10, seed=9, spacing="trailing", progress=False)
    edited = pipe.sample((64, 2), sampler, 10, seed=9, spacing="trailing", init=init, strength=1.0, progress=False)
    assert torch.equal(edited, plain)


def test_strength_one_image_to_image_without_zero_snr_keeps_some_of_init() -> None:
    """At strength 1 on an ordinary schedule (alpha_T > 0) the start still holds alpha_T init, as diffusers' img2img:
    the result moves with init (a check that the test above is not vacuous)."""
    pipe = _pipe()
    a = pipe.sample((4, 2), "ddim", 10, seed=1, init=torch.zeros(4, 2), strength=1.0, progress=False)
    b = pipe.sample((4, 2), "ddim", 10, seed=1, init=torch.full((4, 2), 50.0), strength=1.0, progress=False)
    assert not torch.equal(a, b)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket if hasattr(func, "overloadpacket") else func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler,stages", [("ddpm", 6), ("heun", 11)])
def test_inpainting_is_one_step_op_per_stage(sampler: str, stages: int) -> None:
    """The blend is inside the step op: between the first and the last step op there is nothing but step ops (the
    network here dispatches nothing)."""
    out_m = torch.zeros(3, 4)
    schedule = Schedule.vp_discrete()
    pipe = Pipeline(lambda x, t: out_m, schedule, device="cpu")
    init, mask = torch.randn(3, 4), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    with _OpCounter() as counter:
        pipe.sample((3, 4), sampler, 6, init=init, mask=mask, strength=1.0, progress=False)
    steps = [i for i, op in enumerate(counter.ops) if op == "fastdiff.fused_step"]
    assert len(steps) == stages, counter.ops
    assert counter.ops[steps[0] : steps[-1] + 1] == ["fastdiff.fused_step"] * stages, counter.ops


def test_explicit_known_noise_is_used_at_every_step() -> None:
    """``init_noise`` replaces the known region's Philox noise: with sigma_next z at each step and x_{t-1} read by
    the next step, a different z changes the unknown coordinates; the known ones end on init either way."""
    pipe = _pipe(gmm=GMM4)
    init, mask = GMM4.sample(8, seed=7), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    kw = dict(seed=1, init=init, mask=mask, strength=0.8, progress=False)
    philox = pipe.sample((8, 4), "ddim", 10, **kw)
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    explicit = pipe.sample((8, 4), "ddim", 10, init_noise=z, **kw)
    assert torch.equal(explicit[:, 2:], init[:, 2:]) and torch.equal(philox[:, 2:], init[:, 2:])
    assert not torch.equal(explicit, philox)
    assert torch.equal(explicit, pipe.sample((8, 4), "ddim", 10, init_noise=z.clone(), **kw))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(strength=0.5), ValueError, "strength needs init"),
        (dict(mask=torch.ones(4, 2)), ValueError, "mask needs init"),
        (dict(init=torch.zeros(4, 2), strength=0.0), ValueError, r"strength must be in \(0, 1\]"),
        (dict(init=torch.zeros(4, 2), strength=1.5), ValueError, r"strength must be in \(0, 1\]"),
        (dict(init=torch.zeros(4, 2), strength=float("nan")), ValueError, r"strength must be in \(0, 1\]"),
        (dict(init=torch.zeros(4, 2), strength="0.5"), TypeError, "strength must be a number"),
        (dict(init=torch.zeros(4, 2), strength=0.01), ValueError, "leaves no step"),
        (dict(init=torch.zeros(3, 2)), ValueError, "init must have the sample shape"),
        (dict(init=[[0.0, 0.0]] * 4), TypeError, "init must be a tensor"),
        (dict(init=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(init=torch.zeros(4, 2), mask=torch.ones(4, 3)), ValueError, "mask must broadcast"),
        (dict(init=torch.zeros(4, 2), mask=torch.ones(2, 4, 2)), ValueError, "mask must broadcast"),
        (dict(init=torch.zeros(4, 2), mask=torch.full((4, 2), 2.0)), ValueError, r"mask values must be in \[0, 1\]"),
        (dict(init=torch.zeros(4, 2), mask="half"), TypeError, "mask must be a tensor"),
        (dict(init=torch.zeros(4, 2), init_noise=torch.zeros(4, 2)), ValueError, "init_noise .* needs init and mask"),
        (dict(init=torch.zeros(4, 2), mask=torch.ones(4, 2), init_noise=torch.zeros(3, 2)), ValueError, "init_noise"),
        (dict(init=torch.zeros(4, 2), sampler="rk45"), ValueError, "cannot edit images"),
    ],
)
def test_bad_editing_arguments_are_refused_clearly(kwargs: dict, exc: type, match: str) -> None:
    pipe = Pipeline(GMM.as_model(Schedule.vp_linear(), "eps"), Schedule.vp_linear(), device="cpu")
    kwargs = dict(kwargs)
    sampler = kwargs.pop("sampler", "ddim")
    with pytest.raises(exc, match=match):
        pipe.sample((4, 2), sampler, 10, progress=False, **kwargs)


# ---------------------------------------------------------------- RePaint resampling (jumps=)
def test_resampled_program_runs_each_step_jumps_plus_one_times() -> None:
    from fastdiff.program import blend_table, resampled

    pipe = _pipe()
    prog = pipe.program("ddpm", 6)
    assert resampled(prog, 0) is prog
    res = resampled(prog, 3)
    assert res.stages == 6 * (1 + 2 * 3)
    assert sum(res.calls_model(k) for k in range(res.stages)) == 6 * 4
    blend = blend_table(res)
    for k in range(res.stages):
        step = res.step_of(k)
        if res.calls_model(k):  # a run of step `step`: its own row, blending at the step's end
            assert np.array_equal(res.coef[k], prog.coef[step]) and blend[k, 0] == 1.0
        else:  # the jump back: the forward process from the step's end to its start, nothing blended
            a, s = prog.grid.alpha, prog.grid.sigma
            ratio = a[step] / a[step + 1]
            assert res.coef[k, 0] == pytest.approx(ratio) and blend[k, 0] == 0.0
            assert ratio**2 * s[step + 1] ** 2 + res.coef[k, 5] ** 2 == pytest.approx(s[step] ** 2)
            assert np.count_nonzero(res.coef[k]) == 2


def test_jumps_keep_the_known_region_and_are_one_op_per_stage() -> None:
    pipe = _pipe(gmm=GMM4)
    init, mask = GMM4.sample(8, seed=8), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with _OpCounter() as counter:
        out = pipe.sample((8, 4), "ddpm", 5, seed=1, init=init, mask=mask, jumps=2, progress=False)
    assert torch.equal(out[:, 2:], init[:, 2:]) and torch.isfinite(out).all()
    assert counter.ops.count("fastdiff.fused_step") == 5 * 5
    plain = pipe.sample((8, 4), "ddpm", 5, seed=1, init=init, mask=mask, progress=False)
    assert not torch.equal(out, plain)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="dpmpp_2m", mask=torch.ones(1, 2)), "one-stage sampler without history"),
        (dict(sampler="heun", mask=torch.ones(1, 2)), "one-stage sampler without history"),
        (dict(sampler="ddpm"), "needs init and mask"),
        (dict(sampler="ddpm", mask=torch.ones(1, 2), jumps=-1), "jumps must be an int >= 0"),
        (dict(sampler="ddpm", mask=torch.ones(1, 2), jumps=1.5), "jumps must be an int >= 0"),
    ],
)
def test_bad_jumps_are_refused(kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    kwargs.setdefault("jumps", 2)
    with pytest.raises(ValueError, match=match):
        _pipe().sample((4, 2), steps=5, init=torch.zeros(4, 2), progress=False, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_inpainting_through_the_triton_kernel_equals_the_cpp_one(sampler: str) -> None:
    """The whole inpainting loop through the (interpreted) Triton kernel, registered as the op's CPU kernel for a
    while, gives the C++ kernel's samples: the blend, its Philox stream and the 8-warp launch included."""
    import warnings

    from fastdiff.kernels.fused_step import launch_fused_step

    pipe = _pipe(gmm=GMM4)
    init, mask = GMM4.sample(6, seed=9), torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    kw = dict(seed=4, init=init, mask=mask, strength=0.7, progress=False)
    ref = pipe.sample((6, 4), sampler, 8, **kw)
    calls = []

    def via_triton(*args, **kwargs) -> None:
        calls.append(1)
        launch_fused_step(*args, **kwargs)

    override = torch.library.Library("fastdiff", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
            override.impl("fused_step", via_triton, "CPU")
        tri = pipe.sample((6, 4), sampler, 8, **kw)
    finally:
        override._destroy()
    assert len(calls) == 5  # int(8 * 0.7) = 5 of the 8 steps, as diffusers' get_timesteps keeps
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tri[:, 1::2], init[:, 1::2])
