"""The shipped digits network: U-Net shapes and conditioning, the checkpoint format, the PNG writer, the
quality judge, and the shipped weights' sample quality against an untrained network of the same shape."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.checkpoint import load, read_metadata, save, schedule_from_config
from fastdiff.eval.quality import DigitsJudge, frechet_distance
from fastdiff.nets import UNet
from fastdiff.png import encode_png, image_grid
from fastdiff.pretrained import digits
from fastdiff.pretrained.train import DIGITS_UNET
from fastdiff.schedule import Schedule

# Frechet distance (classifier features) of 256 samples that the shipped network must beat. Measured when
# the weights were committed: 5-15 for 256 samples of the shipped network (DDIM, 20-50 steps), 3-8 for 256
# real digits, ~800 for the untrained network of the same shape and ~1000 for clipped Gaussian noise.
FD_THRESHOLD = 40.0


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge()


# ---------------------------------------------------------------- the U-Net
def test_unet_shapes_conditioning_and_null_class():
    torch.manual_seed(0)
    net = UNet(**DIGITS_UNET)
    for p in net.conv_out.parameters():  # the output conv starts at zero; make it speak
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 500.0, 999.0])
    y = torch.tensor([1, 7, net.null_class])
    out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, t, torch.tensor([2, 7, net.null_class])))  # the label matters
    assert torch.equal(net(x, t, torch.full((3,), net.null_class)), net(x, t))  # y=None is the null class
    assert torch.equal(net(x, torch.tensor(500.0))[1], net(x, torch.full((3,), 500.0))[1])  # 0-d t broadcasts
    # One sample's output does not depend on the others in its batch (GroupNorm is per sample).
    torch.testing.assert_close(net(x[:1], t[:1], y[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_unet_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=6, channels=[8, 16, 32])
    with pytest.raises(ValueError, match="channels"):
        UNet(channels=[])


# ---------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net = UNet(in_channels=1, image_size=8, channels=[8, 16], emb_dim=16, num_classes=3, groups=4)
    path = tmp_path / "net.safetensors"
    save(path, net, Schedule.vp_discrete(beta_end=0.03), "v", (1, 8, 8), extra={"note": "test"})
    meta = read_metadata(path)
    assert meta["architecture"] == "unet" and meta["prediction"] == "v" and meta["num_classes"] == 3
    assert meta["sample_shape"] == [1, 8, 8] and meta["extra"] == {"note": "test"}
    pipe = load(path, device="cpu")
    assert pipe.sample_shape == (1, 8, 8) and pipe.num_classes == 3 and pipe.prediction == "v"
    assert np.allclose(pipe.schedule.alphas_cumprod, Schedule.vp_discrete(beta_end=0.03).alphas_cumprod, rtol=0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    assert torch.equal(pipe.model(x, t, torch.tensor([0, 2])), net.eval()(x, t, torch.tensor([0, 2])))
    assert fastdiff.load is load and fastdiff.save is save


def test_checkpoint_errors(tmp_path):
    with pytest.raises(TypeError, match="fastdiff.nets"):
        save(tmp_path / "x.safetensors", torch.nn.Linear(2, 2), Schedule.vp_discrete(), "eps", (2,))
    net = UNet(channels=[8], emb_dim=16, num_classes=0, groups=4)
    with pytest.raises(ValueError, match="prediction"):
        save(tmp_path / "x.safetensors", net, Schedule.vp_discrete(), "noise", (1, 8, 8))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastdiff checkpoint"):
        load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no known kind"):
        schedule_from_config({"kind": "nonsense"})


def test_schedule_configs_round_trip():
    for sch in (
        Schedule.vp_discrete(beta_schedule="scaled_linear"),
        Schedule.vp_linear(),
        Schedule.edm(),
        Schedule.flow(),
        Schedule.from_betas(np.linspace(1e-4, 0.02, 50)),
    ):
        back = schedule_from_config(json.loads(json.dumps(sch.config)))
        t = np.linspace(sch.t_min, sch.t_max, 7)
        assert np.allclose(back.alpha(t), sch.alpha(t), rtol=0, atol=0) and back.kind == sch.kind


# ---------------------------------------------------------------- PNG and the quality judge
def test_png_encoding_decodes_back():
    img = (np.arange(12 * 5) % 256).astype(np.uint8).reshape(12, 5)
    data = encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(12, 6)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:], img)
    grid = image_grid(torch.zeros(5, 1, 8, 8), rows=2, scale=2, pad=1)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1) and grid.max() == 128 and grid[0, 0] == 64
    with pytest.raises(ValueError, match="uint8"):
        encode_png(img.astype(np.float32))


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3, up to sampling error.
    b = 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.1)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :2])


def test_judge_separates_real_digits_from_noise(judge):
    floor = judge.real_floor(256, draws=2)
    real = judge.score(
        judge.images[torch.randperm(len(judge.images), generator=torch.Generator().manual_seed(1))[:256]]
    )
    noise = judge.score(torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert judge.train_accuracy > 0.97
    assert floor < 15 and real.fd < 15 and noise.fd > 100 and real.confidence > noise.confidence
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        judge.score(torch.zeros(4, 64))


# ---------------------------------------------------------------- the shipped weights
def test_shipped_weights_sample_digits_an_untrained_network_does_not(judge):
    pipe = digits(device="cpu")
    assert pipe.sample_shape == (1, 8, 8) and pipe.num_classes == 10 and pipe.prediction == "eps"
    assert pipe.metadata["extra"]["dataset"] == "digits"
    with torch.inference_mode():
        x = pipe.sample((256, *pipe.sample_shape), steps=20, seed=0, progress=False)
    assert x.shape == (256, 1, 8, 8) and float(x.abs().max()) < 1.5  # images in [-1, 1], up to overshoot
    trained = judge.score(x)
    untrained_net = UNet(**DIGITS_UNET)
    torch.manual_seed(0)
    for p in untrained_net.parameters():  # a random initialisation, not the zero output layer
        torch.nn.init.normal_(p, std=0.05)
    untrained = fastdiff.Pipeline(untrained_net.eval(), pipe.schedule, device="cpu", sample_shape=(1, 8, 8))
    with torch.inference_mode():
        y = untrained.sample((256, 1, 8, 8), steps=20, seed=0, progress=False)
    bad = judge.score(y)
    assert trained.fd < FD_THRESHOLD < bad.fd, (trained, bad)


def test_shipped_weights_guidance_draws_the_requested_digit(judge):
    pipe = digits(device="cpu")
    labels = torch.arange(10).repeat(4)
    with torch.inference_mode():
        x = pipe.sample(
            (40, 1, 8, 8),
            steps=15,
            seed=3,
            progress=False,
            model_kwargs={"y": labels},
            uncond_kwargs={"y": torch.full_like(labels, 10)},
            guidance_scale=3.0,
        )
    assert judge.score(x, labels).accuracy >= 0.9


def test_digits_samples_leave_the_data_range_unless_x0_is_clipped():
    """What docs/pipeline.md says of the range: unclipped samples go past [-1, 1]; x0_clip at 1 keeps them inside, the
    guided ones too."""
    from fastdiff.runtime.x0_clip import X0Clip

    y = torch.arange(10).repeat(2)
    guided = dict(model_kwargs={"y": y}, uncond_kwargs={"y": torch.full_like(y, 10)}, guidance_scale=3.0)
    plain = digits(device="cpu").sample((20, 1, 8, 8), steps=10, seed=0, progress=False, **guided)
    assert plain.abs().max() > 1.05
    clipped = digits(device="cpu", x0_clip=X0Clip(clip_range=1.0))
    for kwargs in ({}, guided):
        x = clipped.sample((20, 1, 8, 8), steps=10, seed=0, progress=False, **kwargs)
        assert x.min() >= -1 and x.max() <= 1, (x.min(), x.max())
