"""The throughput harness and the per-step op count: one ``fastdiff.fused_step`` per stage, nothing else
outside the model, counted by a TorchDispatchMode during ``Pipeline.sample``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.bench.throughput import OpCounter, format_table, main, step_cost
from fastdiff.samplers import SAMPLERS


def test_op_counter_counts_ops_and_distinct_tensor_bytes():
    a, b = torch.ones(10), torch.ones(10)
    with OpCounter() as c:
        torch.add(a, b)  # reads 2 x 40 bytes, writes 40
    assert c.ops == ["add"] and c.bytes == 120
    with OpCounter() as c:
        a.mul_(b)  # in place: the returned tensor is `a`, counted once
    assert c.count == 1 and c.bytes == 80
    with OpCounter() as c:
        (a.double() * 2).sum()
    assert c.count == 3


class ConstantModel:
    """A network that dispatches no framework op: it returns a tensor made beforehand."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, x, t, **kwargs):
        return self.out


SAMPLER_CASES = [("ddim", {}), ("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_maruyama", {}), ("pf_ode_euler", {})]
SAMPLER_CASES += [
    (n, {})
    for n in ("heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler_ancestral", "unipc", "deis")
    if n in SAMPLERS
]


@pytest.mark.parametrize("sampler,opts", SAMPLER_CASES)
def test_each_stage_is_exactly_one_framework_op(sampler, opts):
    shape = (3, 4)
    model = ConstantModel(torch.full(shape, 0.1))
    pipe = Pipeline(model, Schedule.vp_discrete(), prediction="eps", device="cpu")
    steps = 6
    with OpCounter() as c:
        pipe.sample(shape, sampler=sampler, steps=steps, progress=False, **opts)
    fused = [i for i, name in enumerate(c.ops) if name == "fused_step"]
    from fastdiff.program import build_program

    sched = pipe.schedule
    prog = build_program(sched, sched.grid(steps), sampler, "eps", torch.device("cpu"), **opts)
    assert len(fused) == prog.stages
    # between the first and the last stage nothing but fused steps is dispatched
    assert c.ops[fused[0] : fused[-1] + 1] == ["fused_step"] * prog.stages, c.ops


def test_guided_stage_is_still_one_op():
    """With separate guidance calls both outputs go to the same fused op (m_uncond, guidance_scale)."""
    shape = (2, 4)
    pipe = Pipeline(ConstantModel(torch.full(shape, 0.2)), Schedule.vp_discrete(), device="cpu")
    with OpCounter() as c:
        pipe.sample(shape, steps=5, progress=False, guidance_scale=3.0, uncond_kwargs={}, guidance_batching="separate")
    i = c.ops.index("fused_step")
    assert c.ops[i : i + 5] == ["fused_step"] * 5


def test_step_cost_bytes_match_the_tensors_read_and_written():
    shape = (4, 3, 8)
    sched = Schedule.vp_discrete()
    cost = step_cost("ddim", shape, torch.device("cpu"), torch.float32, sched, 10)
    numel = 4 * 3 * 8
    # x, m, x_out (4 bytes each) + the [10, 12] float64 coefficient table + int64 seeds + int32 nonfinite
    expected = 3 * 4 * numel + 10 * 12 * 8 + 4 * 8 + 4 * 4
    assert cost["fastdiff"]["ops"] == 1 and cost["fastdiff"]["bytes"] == expected
    d = cost["diffusers"]
    assert d["ops"] > 1 and d["bytes"] > 3 * 4 * numel


def test_bench_main_writes_json_and_matches_diffusers(tmp_path, capsys):
    out = tmp_path / "t.json"
    res = main(["--model", "mlp", "--shape", "8", "--batch", "4", "--steps", "5", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "fastdiff_eager" in printed and "diffusers" in printed
    data = json.loads(out.read_text())
    assert isinstance(data, list) and data[-1]["sampler"] == "ddim" and data[-1]["batch"] == 4
    for key in ("samples_per_s", "step_latency_ms", "speedup_vs_diffusers", "step_cost"):
        assert key in res
    assert res["step_cost"]["fastdiff"]["ops"] == 1
    # same x_T, same model, same DDIM grid: fastdiff and diffusers' DDIMScheduler agree
    assert res["max_abs_diff_vs_diffusers"] < 1e-4
    assert "fastdiff_graph" not in res["samples_per_s"] or torch.cuda.is_available()
    assert isinstance(format_table(res), str)
    # a second run with the same configuration replaces its entry
    main(["--model", "mlp", "--shape", "8", "--batch", "4", "--steps", "5", "--repeats", "1", "--json", str(out)])
    assert len(json.loads(out.read_text())) == 1


def test_bench_takes_a_user_model_factory():
    import sys
    import types

    from fastdiff.bench.throughput import make_model

    mod = types.ModuleType("user_models_for_bench_test")
    mod.make = lambda shape, device, dtype: ConstantModel(torch.zeros(shape, dtype=dtype, device=device))
    sys.modules["user_models_for_bench_test"] = mod
    try:
        res = main(
            [
                "--model",
                "user_models_for_bench_test:make",
                "--shape",
                "6",
                "--batch",
                "2",
                "--steps",
                "3",
                "--repeats",
                "1",
                "--json",
                "",
            ]
        )
        assert res["model"] == "user_models_for_bench_test:make" and res["step_cost"]["fastdiff"]["ops"] == 1
        with pytest.raises(ValueError, match="model must be"):
            make_model("unet", (2, 6), torch.device("cpu"), torch.float32, Schedule.vp_discrete())
    finally:
        del sys.modules["user_models_for_bench_test"]


def test_bench_default_model_is_the_shipped_digits_network(capsys):
    res = main(["--batch", "2", "--steps", "3", "--repeats", "1", "--json", ""])
    assert res["model"] == "digits" and res["shape"] == [1, 8, 8]
    assert res["max_abs_diff_vs_diffusers"] < 1e-4  # same network, same x_T, same DDIM steps
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        main(["--shape", "8", "--batch", "2", "--steps", "2", "--repeats", "1", "--json", ""])


def test_bench_step_cli_times_fastdiff_and_diffusers(tmp_path):
    out = tmp_path / "step.json"
    res = main(
        [
            "step",
            "--sizes",
            "2,2;1,3,5",
            "--samplers",
            "ddim eta=0,unipc",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert [r["sampler"] for r in res["rows"]] == ["ddim eta=0", "unipc"] * 2
    assert all(r["fastdiff_ms_per_step"] > 0 and r["diffusers_ms_per_step"] > 0 for r in res["rows"])
    assert json.loads(out.read_text())["rows"][0]["shape"] == [2, 2]
    with pytest.raises(SystemExit, match="unknown samplers"):
        main(["step", "--samplers", "nope", "--json", ""])


def test_bench_step_refuses_a_device_it_cannot_use():
    with pytest.raises(SystemExit, match="--device"):
        main(["step", "--device", "tpu", "--json", ""])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="available CUDA device"):
            main(["step", "--device", "cuda", "--json", ""])


@pytest.mark.cuda
def test_bench_step_on_cuda(tmp_path):
    res = main(
        [
            "step",
            "--device",
            "cuda",
            "--sizes",
            "4,4,16,16",
            "--samplers",
            "ddim eta=1,dpmpp_2m",
            "--steps",
            "4",
            "--repeats",
            "2",
            "--json",
            str(tmp_path / "cuda.json"),
        ]
    )
    assert res["device"] == "cuda" and res["gpu"] and all(r["speedup"] > 0 for r in res["rows"])


def test_benchmarks_write_to_a_temporary_path_unless_told(tmp_path, monkeypatch, capsys):
    """No benchmark writes into the repository by default: each default JSON path is in the temporary folder, and a
    run without --json writes its default (here moved into tmp_path) and says where."""
    import tempfile

    import fastdiff.bench.serve
    import fastdiff.bench.step
    import fastdiff.bench.throughput

    for module in (fastdiff.bench.throughput, fastdiff.bench.step, fastdiff.bench.serve):
        assert module.DEFAULT_JSON.startswith(os.path.join(tempfile.gettempdir(), "fastdiff-bench") + os.sep)
    written = tmp_path / "step.json"
    monkeypatch.setattr(fastdiff.bench.step, "DEFAULT_JSON", str(written))
    main(["step", "--sizes", "2,2", "--samplers", "ddim eta=0", "--steps", "2", "--repeats", "1"])
    assert json.loads(written.read_text())["rows"][0]["shape"] == [2, 2]
    assert f"results written to {written}" in capsys.readouterr().out
