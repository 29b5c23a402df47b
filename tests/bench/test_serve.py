"""The serving load benchmark's command line, on a tiny workload against real server processes (loopback)."""

from __future__ import annotations

import json
import os

import pytest
from repo_paths import TESTS as TESTS_DIR

from fastdiff.bench.serve import format_table, image_workload, workload
from fastdiff.bench.throughput import main

pytestmark = pytest.mark.http


def test_workload_is_seeded_poisson_and_mixed():
    a, b = workload(200, rate=4.0, seed=1), workload(200, rate=4.0, seed=1)
    assert a == b
    gaps = [y["at"] - x["at"] for x, y in zip(a, a[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.25) < 0.05  # mean inter-arrival 1 / rate
    assert {r["body"]["sampler"] for r in a} >= {"ddim", "dpmpp_2m", "euler_ancestral"}
    assert min(r["body"]["steps"] for r in a) == 4 and max(r["body"]["steps"] for r in a) == 50
    assert {r["body"]["n"] for r in a} == set(range(1, 9))
    unlabelled = workload(200, rate=4.0, seed=1, num_classes=0)
    assert all("class_label" not in r["body"] for r in unlabelled)
    assert [r["body"]["seed"] for r in unlabelled] == [r["body"]["seed"] for r in a]


def test_bench_serve_runs_every_policy_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "serve.json"
    res = main(
        [
            "serve",
            "--model",
            "serving_models:mixture_pipeline",
            "--rates",
            "20",
            "--requests",
            "4",
            "--time-limit",
            "5",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "serve.png"),
        ]
    )
    saved = json.loads(out.read_text())
    assert [r["policy"] for r in saved["rows"]] == ["single", "request", "continuous"]
    for row in saved["rows"]:
        assert row["sent"] == row["ok"] == 4 and row["errors"] == 0
        assert row["samples_per_s"] > 0 and row["p99_s"] >= row["p50_s"] > 0
        assert 0 < row["engine_busy"] <= 1 and row["mean_rows_per_tick"] >= 1 and row["unloaded_request_ms"] > 0
    assert "continuous_vs_single_throughput" in saved["summary"]
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert format_table(res).count("\n") == 4


def test_bench_serve_diffusers_sends_images_requests(tiny_pipelines, tmp_path):
    """``--diffusers``: the images workload (prompts, two sizes, guidance on and off) against every policy."""
    out = tmp_path / "serve.json"
    main(["serve", "--diffusers", tiny_pipelines["sd"], "--rates", "20", "--requests", "3", "--time-limit", "5",
          "--policies", "single,continuous", "--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert [r["policy"] for r in saved["rows"]] == ["single", "continuous"]
    for row in saved["rows"]:
        assert row["sent"] == row["ok"] == 3 and row["mean_time_to_first_step_s"] > 0


def test_image_workload_mixes_sizes_samplers_and_guidance():
    info = {"samplers": ["ddim", "dpmpp_2m", "unipc", "euler", "ddpm"], "default_size": "16x16"}
    load = image_workload(300, rate=5.0, info=info, seed=2)
    assert load == image_workload(300, rate=5.0, info=info, seed=2)
    bodies = [r["body"] for r in load]
    assert {b["size"] for b in bodies} == {"16x16", "32x16"}
    assert {b["sampler"] for b in bodies} == {"ddim", "dpmpp_2m", "unipc"}
    assert {b["guidance_scale"] for b in bodies} == {1.0, 5.0}
    assert min(b["num_inference_steps"] for b in bodies) == 4 and max(b["num_inference_steps"] for b in bodies) == 50
