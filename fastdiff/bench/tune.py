"""Tuned grids against the samplers' default grids: ``python -m fastdiff.bench tune``.

Two judges, both on seeds that neither tuned nor selected the grid:

* exact Gaussian mixtures (2-D: the demo's, 16-D: :func:`mixture16`) on diffusers' discrete DDPM schedule with
  their exact eps networks: each (sampler, NFE) is tuned here (the minutes it takes are reported) and judged by
  sliced W2 to exact samples, mean over ``--draws`` sets of initial noise; the floor is exact against exact;
* the shipped digits network with the grids it ships (``python -m fastdiff tune`` wrote them into
  ``digits.safetensors``): Frechet distance in the digit judge's features (:mod:`fastdiff.eval.quality`), mean
  over draws, with real digits as the floor.

Every cell is a (sampler, NFE), default grid against tuned; the goal it reports against is "tuned NFE 5 at least as
good as default NFE 10, tuned NFE 4 within 1.5x of default NFE 10".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

from fastdiff.bench.timing import default_results_path, write_results
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.exact import GaussianMixture
from fastdiff.eval.metrics import sliced_wasserstein
from fastdiff.pipeline import Pipeline
from fastdiff.schedule import Schedule
from fastdiff.solvers.tune import EVAL_SEED_BASE, Teacher, reference, tune

SAMPLERS = ("dpmpp_2m", "unipc", "ddim")
NFES = (4, 5, 6, 8, 10)
JUDGE_SEED_BASE = 3 * EVAL_SEED_BASE
"""Judging draw d uses seeds JUDGE_SEED_BASE + d * 100_000 + i: apart from the tuning and evaluation seeds."""


def mixture16() -> GaussianMixture:
    """A 16-D mixture of three Gaussians (means ~ N(0, 1.5^2), stds 0.5-0.7)."""
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(
        torch.randn(3, 16, generator=g) * 1.5, torch.tensor([0.5, 0.7, 0.6]), torch.tensor([0.5, 0.3, 0.2])
    )


def judge_seeds(draw: int, n: int) -> list[int]:
    """The seeds of judging draw ``draw``."""
    start = JUDGE_SEED_BASE + draw * 100_000
    return list(range(start, start + n))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _draws(pipe: Pipeline, sampler: str, steps: int, shape: tuple, draws: int, score: Any, **grid: Any) -> float:
    """Mean score of ``draws`` sample sets of ``shape`` (default grid, or ``grid=``)."""
    values = []
    with torch.inference_mode():
        for d in range(draws):
            x = pipe.sample(shape, sampler=sampler, steps=steps, seed=judge_seeds(d, shape[0]), progress=False, **grid)
            values.append(score(x))
    return _mean(values)


def bench_mixtures(
    samplers: Sequence[str], nfes: Sequence[int], n: int, draws: int, max_evals: int, teacher_steps: int
) -> list[dict]:
    """Tunes and judges every (mixture, sampler, NFE); one row each."""
    rows = []
    schedule = Schedule.vp_discrete()
    teacher = Teacher(steps=teacher_steps)
    for name, gmm in (("2d", default_mixture()), ("16d", mixture16())):
        pipe = Pipeline(gmm.as_model(schedule), schedule, device="cpu")
        exact = gmm.sample(n, seed=12345)
        floor = _mean([sliced_wasserstein(gmm.sample(n, seed=777 + d), exact) for d in range(draws)])
        refs = (
            reference(pipe, range(512), 1.0, teacher, (gmm.dim,)),
            reference(pipe, range(EVAL_SEED_BASE, EVAL_SEED_BASE + 1024), 1.0, teacher, (gmm.dim,)),
        )

        def sw2(x: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return sliced_wasserstein(x, exact)

        for sampler in samplers:
            for nfe in nfes:
                res = tune(pipe, sampler, nfe, teacher=teacher, shifts=True, max_evals=max_evals, progress=False,
                           sample_shape=(gmm.dim,), references=refs)  # fmt: skip
                grid = res.tuned.grid(schedule)
                rows.append(
                    dict(
                        judge=f"mixture {name}",
                        metric="sliced W2",
                        sampler=sampler,
                        nfe=nfe,
                        default=_draws(pipe, sampler, nfe, (n, gmm.dim), draws, sw2),
                        tuned=_draws(pipe, sampler, nfe, (n, gmm.dim), draws, sw2, grid=grid),
                        floor=floor,
                        held_out_mse=dict(res.tuned.loss),
                        tune_minutes=res.seconds / 60,
                    )
                )
                print(_row_line(rows[-1]), flush=True)
    return rows


def bench_digits(n: int, draws: int) -> list[dict]:
    """Judges the digits network's shipped tuned grids against the default grids; one row per shipped grid."""
    from fastdiff.eval.quality import DigitsJudge
    from fastdiff.pretrained import digits

    pipe = digits(device="cpu")
    judge = DigitsJudge()
    floor = judge.real_floor(n)
    shape = (n, *pipe.sample_shape)
    rows = []
    for tuned in pipe.tuned:
        if tuned.guidance_scale != 1.0:
            continue

        def fd(x: torch.Tensor) -> float:
            return judge.score(x).fd

        rows.append(
            dict(
                judge="digits",
                metric="Frechet distance",
                sampler=tuned.sampler,
                nfe=tuned.steps,
                default=_draws(pipe, tuned.sampler, tuned.steps, shape, draws, fd),
                tuned=_draws(pipe, tuned.sampler, tuned.steps, shape, draws, fd, spacing="tuned"),
                floor=floor,
                held_out_mse=dict(tuned.loss),
                tune_minutes=tuned.teacher.get("search_seconds", float("nan")) / 60,
            )
        )
        print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(row: dict) -> str:
    return (
        f"{row['judge']:<12} {row['sampler']:<9} NFE {row['nfe']:>2}: default {row['default']:.4g}, "
        f"tuned {row['tuned']:.4g} (floor {row['floor']:.3g}; {row['tune_minutes']:.1f} min)"
    )


def goals(rows: list[dict]) -> list[dict]:
    """Per (judge, sampler): tuned NFE 5 against default NFE 10, and tuned NFE 4 against 1.5x default NFE 10."""
    out = []
    for judge, sampler in dict.fromkeys((r["judge"], r["sampler"]) for r in rows):
        cells = {r["nfe"]: r for r in rows if r["judge"] == judge and r["sampler"] == sampler}
        if not {4, 5, 10} <= set(cells):
            continue
        ref = cells[10]["default"]
        out.append(
            dict(
                judge=judge,
                sampler=sampler,
                default10=ref,
                tuned5=cells[5]["tuned"],
                tuned4=cells[4]["tuned"],
                nfe5_reached=cells[5]["tuned"] <= ref,
                nfe4_reached=cells[4]["tuned"] <= 1.5 * ref,
            )
        )
    return out


def format_table(rows: list[dict], nfes: Sequence[int]) -> str:
    """Markdown: one line per (judge, sampler), ``default / tuned`` per NFE."""
    lines = [
        "| judge | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " | floor | tuning min/setting |",
        "|---|---|" + "---|" * len(nfes) + "---|---|",
    ]
    for judge, sampler in dict.fromkeys((r["judge"], r["sampler"]) for r in rows):
        cells = {r["nfe"]: r for r in rows if r["judge"] == judge and r["sampler"] == sampler}
        text = [f"{cells[k]['default']:.3g} / **{cells[k]['tuned']:.3g}**" if k in cells else "" for k in nfes]
        some = next(iter(cells.values()))
        minutes = _mean([c["tune_minutes"] for c in cells.values()])
        lines.append(f"| {judge} | {sampler} | " + " | ".join(text) + f" | {some['floor']:.3g} | {minutes:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: runs the benchmark, prints the table and the goals, writes JSON."""
    ap = argparse.ArgumentParser(prog="python -m fastdiff.bench tune", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one sampler, NFE 4, 5 and 10, fewer samples")
    ap.add_argument("--no-digits", action="store_true", help="leave the digits network out")
    ap.add_argument("--no-mixtures", action="store_true", help="leave the exact mixtures out")
    ap.add_argument("--draws", type=int, default=None, help="initial-noise draws per cell (default 4, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=default_results_path("tune.json"), help="'' writes none")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    samplers, nfes = (SAMPLERS[:1], (4, 5, 10)) if quick else (SAMPLERS, NFES)
    draws = args.draws or (1 if quick else 4)
    start = time.time()
    rows: list[dict] = []
    if not args.no_mixtures:
        rows += bench_mixtures(samplers, nfes, n=500 if quick else 2000, draws=draws,
                               max_evals=40 if quick else 300, teacher_steps=50 if quick else 200)  # fmt: skip
    if not args.no_digits:
        rows += bench_digits(n=128 if quick else 512, draws=draws)
    result = dict(
        benchmark="tune",
        draws=draws,
        device="cpu",
        threads=torch.get_num_threads(),
        seconds=round(time.time() - start, 1),
        rows=rows,
        goals=goals(rows),
    )
    print("\n" + format_table(rows, nfes))
    for g in result["goals"]:
        print(
            f"{g['judge']} {g['sampler']}: tuned NFE 5 {g['tuned5']:.3g} vs default NFE 10 {g['default10']:.3g} "
            f"({'reached' if g['nfe5_reached'] else 'NOT reached'}); tuned NFE 4 {g['tuned4']:.3g} vs 1.5x "
            f"({'reached' if g['nfe4_reached'] else 'NOT reached'})"
        )
    if args.json:
        write_results(args.json, result)
    return result
