"""``python -m fastdiff.bench gpu-check --dry-run``: the plan a lent GPU will run checks out on the CPU (every
command's arguments parse, every model factory builds at a tiny size) and the JSON skeleton is written."""

from __future__ import annotations

import json

import pytest

from fastdiff.bench.gpu_check import DEFAULT_BUDGET_S, PLAN, main, slug
from fastdiff.bench.throughput import main as bench_main

pytest.importorskip("diffusers")


def test_dry_run_checks_the_plan_and_writes_the_skeleton(tmp_path):
    res = bench_main(["gpu-check", "--dry-run", "--json", str(tmp_path / "gpu-{device}.json")])
    path = tmp_path / "gpu-dry-run.json"
    assert res["path"] == str(path)
    written = json.loads(path.read_text())
    assert written["device"] == "dry-run" and written["torch"] and "driver" in written and "triton" in written
    assert [s["name"] for s in written["steps"]] == [s.name for s in PLAN]
    for step in written["steps"]:
        assert step["status"] == "planned", step
        assert step["command"] and step["budget_s"] > 0
    built = {m["model"]: m for s in written["steps"] for m in s.get("dry_models", [])}
    assert built["fastdiff.bench.models:sd15_unet_tiny"]["output_finite"]
    assert "digits" in built


def test_the_budgets_fit_eight_minutes():
    assert sum(s.budget_s for s in PLAN) <= DEFAULT_BUDGET_S <= 480


def test_a_bad_plan_entry_is_reported_not_raised(tmp_path, monkeypatch):
    import fastdiff.bench.gpu_check as gpu_check

    bad = gpu_check.Step("bad", "arguments that do not parse", 1, ("step", "--no-such-flag"))
    monkeypatch.setattr(gpu_check, "PLAN", (bad,))
    res = main(["--dry-run", "--json", str(tmp_path / "x.json")])
    assert res["steps"][0]["status"] == "invalid" and "do not parse" in res["steps"][0]["error"]


def test_slug():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
