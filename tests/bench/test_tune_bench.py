"""The tuning benchmark (python -m fastdiff.bench tune): its goal check and table on known rows, and a tiny run."""

from __future__ import annotations

import math

from fastdiff.bench.tune import bench_mixtures, format_table, goals


def _row(nfe, default, tuned, sampler="ddim"):
    return dict(
        judge="mixture 2d", sampler=sampler, nfe=nfe, default=default, tuned=tuned, floor=0.05, tune_minutes=1.0
    )


def test_goals_compare_tuned_nfe5_and_nfe4_with_default_nfe10():
    rows = [_row(4, 0.9, 0.29), _row(5, 0.5, 0.2), _row(10, 0.2, 0.15)]
    (g,) = goals(rows)
    assert g["nfe5_reached"] and g["nfe4_reached"] is True  # 0.29 <= 1.5 * 0.2
    (g,) = goals([_row(4, 0.9, 0.31), _row(5, 0.5, 0.21), _row(10, 0.2, 0.15)])
    assert not g["nfe5_reached"] and not g["nfe4_reached"]
    assert goals([_row(5, 0.5, 0.2)]) == []  # no NFE 4 and 10 to compare with


def test_table_has_a_line_per_judge_and_sampler():
    rows = [_row(4, 0.9, 0.29), _row(10, 0.2, 0.15), _row(4, 1.0, 0.5, sampler="unipc")]
    table = format_table(rows, (4, 5, 10))
    lines = table.splitlines()
    assert len(lines) == 4 and "| mixture 2d | ddim | 0.9 / **0.29** |  | 0.2 / **0.15** | 0.05 | 1.0 |" in lines


def test_a_tiny_mixture_run_reports_every_cell():
    rows = bench_mixtures(["ddim"], [3], n=200, draws=1, max_evals=4, teacher_steps=8)
    assert [(r["judge"], r["nfe"]) for r in rows] == [("mixture 2d", 3), ("mixture 16d", 3)]
    assert all(math.isfinite(r["default"]) and math.isfinite(r["tuned"]) and r["floor"] > 0 for r in rows)


def test_the_bench_entry_dispatches_tune():
    from fastdiff.bench.throughput import main as bench_main

    result = bench_main(["tune", "--quick", "--no-mixtures", "--no-digits", "--json", ""])
    assert result["benchmark"] == "tune" and result["rows"] == [] and result["goals"] == []
