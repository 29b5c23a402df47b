"""Tuned grids as data: TunedGrid, the weights' fingerprint, spacing="tuned" in Pipeline.sample, the checkpoint
round trip (fastdiff.save / fastdiff.load / save_tuned) and ``python -m fastdiff tune``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastdiff
from fastdiff import Pipeline, Schedule
from fastdiff.checkpoint import save_tuned
from fastdiff.cli import main
from fastdiff.nets import UNet
from fastdiff.solvers.tuned import TunedGrid, tuned_grids_from_json, weights_fingerprint

SCHEDULE = Schedule.vp_discrete()


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(channels=[8], emb_dim=16, num_classes=0, groups=4).eval().requires_grad_(False)


def make_tuned(net, sampler="ddim", steps=3, guidance_scale=1.0, shifts=(0.0, 0.0, 0.0)) -> TunedGrid:
    return TunedGrid(
        sampler=sampler,
        steps=steps,
        guidance_scale=guidance_scale,
        times=(999.0, 612.123456789012345, 87.000000000000014)[:steps],
        shifts=shifts[:steps],
        teacher={"sampler": "unipc", "steps": 200},
        loss={"tuned": 0.1, "default": 0.3},
        fingerprint=weights_fingerprint(net),
    )


@pytest.fixture
def net():
    return tiny_unet()


@pytest.fixture
def pipe(net):
    return Pipeline(net, SCHEDULE, device="cpu", sample_shape=(1, 8, 8))


def test_spacing_tuned_samples_on_the_tuned_grid(pipe, net):
    tuned = make_tuned(net)
    pipe.add_tuned(tuned)
    got = pipe.sample((3, 1, 8, 8), sampler="ddim", steps=3, spacing="tuned", seed=4, progress=False)
    want = pipe.sample(
        (3, 1, 8, 8), sampler="ddim", steps=3, grid=SCHEDULE.grid_from_times(tuned.times), seed=4, progress=False
    )
    assert torch.equal(got, want)
    other = pipe.sample((3, 1, 8, 8), sampler="ddim", steps=3, seed=4, progress=False)
    assert not torch.equal(got, other)


def test_shifts_move_only_the_time_fed_to_the_network(pipe, net):
    shifts = (0.5, -0.25, 1.0)
    pipe.add_tuned(make_tuned(net, shifts=shifts))
    seen = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(float(args[1][0])))
    try:
        pipe.sample((2, 1, 8, 8), sampler="ddim", steps=3, spacing="tuned", progress=False)
    finally:
        handle.remove()
    times = np.array(make_tuned(net).times)
    fed = SCHEDULE.model_time(SCHEDULE.t_from_log_snr(SCHEDULE.log_snr(times) + np.array(shifts)))
    np.testing.assert_allclose(seen, fed, rtol=1e-6)
    assert abs(seen[1] - times[1]) > 1.0  # really moved


def test_spacing_tuned_without_a_grid_lists_the_tuned_settings(pipe, net):
    with pytest.raises(
        ValueError, match=r"no tuned grid for \(ddim, steps=3, guidance_scale=1\); tuned settings: none"
    ):
        pipe.sample((1, 1, 8, 8), sampler="ddim", steps=3, spacing="tuned", progress=False)
    pipe.add_tuned([make_tuned(net), make_tuned(net, sampler="unipc")])
    with pytest.raises(ValueError, match=r"tuned settings: \(ddim, steps=3, guidance_scale=1\), \(unipc, steps=3"):
        pipe.sample((1, 1, 8, 8), sampler="dpmpp_2m", steps=3, spacing="tuned", progress=False)
    with pytest.raises(ValueError, match="no tuned grid for \\(ddim, steps=4"):
        pipe.sample((1, 1, 8, 8), sampler="ddim", steps=4, spacing="tuned", progress=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        pipe.sample((1, 1, 8, 8), sampler="ddim", steps=3, spacing="tuned", timesteps=[999, 500, 100], progress=False)


def test_a_grid_fitted_to_other_weights_is_refused(pipe):
    other = make_tuned(tiny_unet(seed=1))
    with pytest.raises(ValueError, match="fitted to other weights"):
        pipe.add_tuned(other)
    assert len(pipe.tuned) == 0


def test_the_fingerprint_follows_every_weight(net):
    before = weights_fingerprint(net)
    assert weights_fingerprint(tiny_unet()) == before  # same weights, another object
    with torch.no_grad():
        next(iter(net.parameters())).view(-1)[0] += 1e-6
    assert weights_fingerprint(net) != before
    assert weights_fingerprint(net.state_dict()) == weights_fingerprint(net)
    with pytest.raises(ValueError, match="no weights"):
        weights_fingerprint(lambda x, t: x)


def test_save_and_load_keep_tuned_grids_exactly(tmp_path, net):
    path = tmp_path / "net.safetensors"
    grids = [make_tuned(net, shifts=(0.1, 0.2, 0.3)), make_tuned(net, sampler="unipc", guidance_scale=2.5)]
    fastdiff.save(path, net, SCHEDULE, "eps", (1, 8, 8), tuned=grids)
    pipe = fastdiff.load(path, device="cpu")
    assert list(pipe.tuned) == sorted(grids, key=lambda g: g.key)
    assert pipe.tuned.find("ddim", 3, 1.0).times[1] == 612.123456789012345  # float64 bit for bit
    assert pipe.metadata["tuned"] == list(pipe.tuned)
    # a cast after loading keeps them: the fingerprint is of the weights as stored
    assert len(fastdiff.load(path, device="cpu", dtype=torch.bfloat16).tuned) == 2


def test_save_refuses_grids_of_other_weights(tmp_path, net):
    with pytest.raises(ValueError, match="fitted to other weights"):
        fastdiff.save(tmp_path / "x.safetensors", net, SCHEDULE, "eps", (1, 8, 8), tuned=make_tuned(tiny_unet(1)))
    with pytest.raises(TypeError, match="TunedGrid"):
        fastdiff.save(tmp_path / "x.safetensors", net, SCHEDULE, "eps", (1, 8, 8), tuned=[{"sampler": "ddim"}])


def test_load_leaves_out_a_grid_of_other_weights_with_a_warning(tmp_path, net):
    path = tmp_path / "net.safetensors"
    fastdiff.save(path, net, SCHEDULE, "eps", (1, 8, 8), tuned=make_tuned(net))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors[sorted(tensors)[0]].view(-1)[0] += 1.0  # other weights, the old grid
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="fitted to other weights"):
        pipe = fastdiff.load(path, device="cpu")
    assert len(pipe.tuned) == 0


def test_save_tuned_adds_grids_and_keeps_the_weights(tmp_path, net):
    path, out = tmp_path / "net.safetensors", tmp_path / "tuned.safetensors"
    fastdiff.save(path, net, SCHEDULE, "eps", (1, 8, 8), tuned=make_tuned(net))
    save_tuned(path, [make_tuned(net, sampler="unipc"), make_tuned(net, steps=2)], out=out)
    before, after = load_file(str(path)), load_file(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert fastdiff.load(out, device="cpu").tuned.settings() == [("ddim", 2, 1.0), ("ddim", 3, 1.0), ("unipc", 3, 1.0)]
    with pytest.raises(ValueError, match="fitted to other weights"):
        save_tuned(path, make_tuned(tiny_unet(1)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(times=(999.0, 999.0, 10.0)), "strictly decreasing"),
        (dict(times=(999.0, 10.0)), "steps = 3"),
        (dict(shifts=(0.0, float("nan"), 0.0)), "finite"),
        (dict(steps=0), "steps must be"),
    ],
)
def test_bad_tuned_grids_are_refused(net, change, match):
    fields = make_tuned(net).to_dict() | change
    with pytest.raises(ValueError, match=match):
        TunedGrid(**fields)


def test_json_round_trip_and_missing_fields(net):
    grid = make_tuned(net, shifts=(0.1, 0.0, -0.3))
    assert tuned_grids_from_json(json.dumps([grid.to_dict()])) == [grid]
    with pytest.raises(ValueError, match="missing \\['fingerprint'\\]"):
        TunedGrid.from_dict({k: v for k, v in grid.to_dict().items() if k != "fingerprint"})
    with pytest.raises(ValueError, match="JSON list"):
        tuned_grids_from_json("{}")


def test_cli_tune_writes_the_grids_into_a_checkpoint(tmp_path, net, capsys):
    path, out = tmp_path / "net.safetensors", tmp_path / "tuned.safetensors"
    fastdiff.save(path, net, SCHEDULE, "eps", (1, 8, 8))
    small = ["--n-tune", "4", "--n-eval", "4", "--max-evals", "3", "--teacher-steps", "4", "--no-progress"]
    main(["tune", "--model", str(path), "--sampler", "ddim", "unipc", "--steps", "2", "--out", str(out), *small])
    printed = capsys.readouterr().out
    assert "ddim steps=2 guidance=1: held-out loss" in printed and "unipc steps=2" in printed
    pipe = fastdiff.load(out, device="cpu")
    assert pipe.tuned.settings() == [("ddim", 2, 1.0), ("unipc", 2, 1.0)]
    assert pipe.tuned.find("ddim", 2, 1.0).teacher["n_eval"] == 4
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--model", str(tmp_path / "missing.safetensors"), "--sampler", "ddim", "--steps", "2"])
    assert exc.value.code == 2
    assert "existing .safetensors checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--model", str(path), "--sampler", "rk45", "--steps", "2", *small])
    assert "no fixed grid" in capsys.readouterr().err
