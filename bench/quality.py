"""Sample quality against NFE: sliced W2 to exact samples for every registered sampler and diffusers' peers.

For a 2-D and a 16-D Gaussian mixture (exact network: GaussianMixture.as_model), every sampler in
``fastdiff.samplers.SAMPLERS`` (whatever is registered when this runs) and diffusers' DDIM, DDPM,
Euler, EulerAncestral, Heun, DPMSolverMultistep, UniPC and DEIS schedulers draw samples at a budget of
5, 10, 20 and 50 network evaluations (steps = NFE / nfe_per_step; the NFE actually spent is counted
and reported). The distance is the sliced 2-Wasserstein distance (fastdiff.eval.metrics.sliced_wasserstein)
to an independent set of exact samples. All runs start from the same initial noise, so two
implementations of the same deterministic algorithm give the same number; the "exact" row is exact-vs-exact
(the noise floor).

Schedules: the discrete VP schedule (1000 steps, linear betas) with an eps network and "trailing"
timesteps (999, ..., the same grid in fastdiff and diffusers; diffusers' DDIM/DDPM with clip_sample off),
except ``flow_*`` samplers (Schedule.flow, flow network) and ``rk45`` (adaptive, needs a continuous
schedule: Schedule.vp_linear; one row per tolerance, NFE is what it spent). ``pc`` uses 1 corrector
step (2 NFE per step); ``consistency`` runs the exact x0 = E[x0 | x_t] network through the grid's times.

    python bench/quality.py [--quick] [--out bench/results/quality.json]

Writes JSON and a PNG plot (quality against NFE, one panel per mixture) next to it and prints a table.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from fastdiff import Pipeline, Schedule
from fastdiff.bench.timing import default_results_path, write_results
from fastdiff.bench.tune import mixture16
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.exact import GaussianMixture
from fastdiff.eval.metrics import sliced_wasserstein
from fastdiff.samplers import SAMPLERS

NFES = (5, 10, 20, 50)
RK45_TOLS = (1e-1, 1e-2, 1e-3, 1e-4)
DIFFUSERS = {  # name -> (class name, extra config, NFE per step)
    "DDIM": ("DDIMScheduler", {"clip_sample": False}, 1),
    "DDPM": ("DDPMScheduler", {"clip_sample": False}, 1),
    "Euler": ("EulerDiscreteScheduler", {}, 1),
    "EulerAncestral": ("EulerAncestralDiscreteScheduler", {}, 1),
    "Heun": ("HeunDiscreteScheduler", {}, 2),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}, 1),
    "UniPC": ("UniPCMultistepScheduler", {}, 1),
    "DEIS": ("DEISMultistepScheduler", {}, 1),
}


def _initial(n: int, dim: int, seed: int) -> torch.Tensor:
    """The initial noise every run starts from (the same for fastdiff and diffusers)."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _sw(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float(sliced_wasserstein(x, ref.double(), n_projections=256, seed=0))


def run_fastdiff(name: str, gmm: GaussianMixture, n: int, nfe: int, seed: int) -> tuple[float, int, torch.Tensor]:
    """Samples with fastdiff's ``name`` at about ``nfe`` evaluations; returns (SW2 placeholder, NFE, samples)."""
    info = SAMPLERS[name]
    options: dict[str, Any] = {}
    if name.startswith("flow_"):
        sch, pred, spacing = Schedule.flow(), "flow", None
    else:
        sch, pred, spacing = Schedule.vp_discrete(), "eps", "trailing"
    per = info.nfe_per_step
    if name == "pc":
        options["n_corrector"] = 1
        per = 2
    steps = max(1, round(nfe / per)) if per else 1
    if name in ("heun", "flow_heun"):  # Euler into the clean end: 2 steps - 1 evaluations
        steps = max(1, (nfe + 1) // 2)
    model = gmm.as_model(sch, pred)
    pipe = Pipeline(model, sch, pred, device="cpu")
    x = pipe.sample(
        (n, gmm.dim),
        sampler=name,
        steps=steps,
        seed=seed,
        spacing=spacing,
        progress=False,
        x_T=_initial(n, gmm.dim, seed),
        **options,
    )
    return math.nan, int(model.nfe), x


def run_rk45(gmm: GaussianMixture, n: int, tol: float, seed: int) -> tuple[int, torch.Tensor]:
    sch = Schedule.vp_linear()
    model = gmm.as_model(sch, "eps")
    pipe = Pipeline(model, sch, "eps", device="cpu")
    x = pipe.sample(
        (n, gmm.dim), sampler="rk45", seed=seed, progress=False, rtol=tol, atol=tol, x_T=_initial(n, gmm.dim, seed)
    )
    return int(pipe.last_nfe), x


def run_diffusers(label: str, gmm: GaussianMixture, n: int, nfe: int, seed: int) -> tuple[int, torch.Tensor]:
    import diffusers

    cls_name, extra, per = DIFFUSERS[label]
    sch = Schedule.vp_discrete()
    model = gmm.as_model(sch, "eps")
    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        timestep_spacing="trailing",
        **extra,
    )
    steps = max(1, (nfe + 1) // 2) if per == 2 else nfe
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed + 1)  # step noise
    x = _initial(n, gmm.dim, seed) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(x, t)
        m = model(xin, t.float().expand(n))  # scale_model_input turns Euler-style states back into native x_t
        kw = {"generator": gen} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(m, t, x, **kw).prev_sample
    return int(model.nfe), x


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (500) and only NFE 5 and 20")
    ap.add_argument("--n", type=int, default=None, help="samples per run (default 2000, quick 500)")
    ap.add_argument(
        "--out",
        default=default_results_path("quality.json"),
        help="output path (the committed table: bench/results/quality.json)",
    )
    args = ap.parse_args(argv)
    n = args.n or (500 if args.quick else 2000)
    nfes = (5, 20) if args.quick else NFES
    mixtures = {"2d": default_mixture(), "16d": mixture16()}
    rows: list[dict] = []
    t_start = time.time()
    for mix_name, gmm in mixtures.items():
        ref = gmm.sample(n, seed=12345)
        floor = _sw(gmm.sample(n, seed=777), ref)
        rows.append(dict(mixture=mix_name, library="exact", sampler="exact", nfe_target=0, nfe=0, sw2=floor))
        jobs: list[tuple[str, str, Any, Callable[[], tuple[int, torch.Tensor]]]] = []
        for name in sorted(SAMPLERS):
            if name == "rk45":
                for tol in RK45_TOLS:
                    jobs.append(("fastdiff", "rk45", f"tol={tol:g}", lambda gmm=gmm, tol=tol: run_rk45(gmm, n, tol, 1)))
                continue
            for nfe in nfes:
                run = lambda gmm=gmm, name=name, nfe=nfe: run_fastdiff(name, gmm, n, nfe, 1)[1:]
                jobs.append(("fastdiff", name, nfe, run))
        for label in DIFFUSERS:
            for nfe in nfes:
                jobs.append(("diffusers", label, nfe, lambda g=gmm, lb=label, k=nfe: run_diffusers(lb, g, n, k, 1)))
        for lib, name, target, fn in jobs:
            try:
                used, x = fn()
                sw, err = _sw(x, ref), None
            except Exception as e:  # a sampler that cannot run this budget is reported, not fatal
                used, sw, err = 0, math.nan, f"{type(e).__name__}: {e}"[:200]
            row = dict(mixture=mix_name, library=lib, sampler=name, nfe_target=target, nfe=used, sw2=sw)
            if err:
                row["error"] = err
            rows.append(row)
    result = dict(
        benchmark="quality",
        metric="sliced W2 to exact samples (256 projections)",
        n=n,
        nfe_targets=list(nfes),
        device="cpu",
        seconds=round(time.time() - t_start, 1),
        rows=rows,
    )
    args.out = write_results(args.out, result)
    print_table(result)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    return result


def print_table(result: dict) -> None:
    """One line per (library, sampler), SW2 per mixture and NFE; rk45 lists tolerance:NFE."""
    rows = result["rows"]
    nfes = result["nfe_targets"]
    mixes = list(dict.fromkeys(r["mixture"] for r in rows))
    head = "| library | sampler | " + " | ".join(f"{m} NFE {k}" for m in mixes for k in nfes) + " |"
    print(f"sliced W2 to exact samples, n = {result['n']} (lower is better; 'exact' row = noise floor)\n")
    print(head)
    print("|" + "---|" * (2 + len(mixes) * len(nfes)))
    keys = list(dict.fromkeys((r["library"], r["sampler"]) for r in rows))
    for lib, name in keys:
        cells = []
        if name == "rk45":
            for m in mixes:
                rr = [r for r in rows if r["mixture"] == m and r["sampler"] == "rk45"]
                txt = ", ".join(f"{r['sw2']:.3f}@{r['nfe']}" for r in rr)
                cells += [txt] + [""] * (len(nfes) - 1)
        else:
            for m in mixes:
                for k in nfes:
                    rr = [
                        r
                        for r in rows
                        if r["mixture"] == m
                        and r["library"] == lib
                        and r["sampler"] == name
                        and (r["nfe_target"] == k or name == "exact")
                    ]
                    if not rr:
                        cells.append("")
                        continue
                    r = rr[0]
                    s = "err" if "error" in r else ("nan" if math.isnan(r["sw2"]) else f"{r['sw2']:.3f}")
                    if r["nfe"] not in (k, 0) and "error" not in r:
                        s += f" ({r['nfe']})"
                    cells.append(s)
        print(f"| {lib} | {name} | " + " | ".join(cells) + " |")
    print(
        "\n(n) = NFE actually spent where it differs from the target; rk45: SW2@NFE for tol "
        + ", ".join(f"{t:g}" for t in RK45_TOLS)
    )


def plot(result: dict, path: str) -> None:
    """Quality against NFE, one panel per mixture, log-log; fastdiff solid, diffusers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r and not math.isnan(r["sw2"])]
    mixes = list(dict.fromkeys(r["mixture"] for r in rows))
    fig, axes = plt.subplots(1, len(mixes), figsize=(7 * len(mixes), 5.5))
    for ax, m in zip(axes, mixes):
        keys = list(dict.fromkeys((r["library"], r["sampler"]) for r in rows if r["mixture"] == m))
        for lib, name in keys:
            rr = sorted(
                (r for r in rows if r["mixture"] == m and r["library"] == lib and r["sampler"] == name),
                key=lambda r: r["nfe"],
            )
            if name == "exact":
                ax.axhline(rr[0]["sw2"], color="k", lw=1, ls=":", label="exact (noise floor)")
                continue
            ax.plot(
                [r["nfe"] for r in rr],
                [r["sw2"] for r in rr],
                "-" if lib == "fastdiff" else "--",
                marker="o",
                ms=3,
                label=f"{lib}:{name}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced W2 to exact samples")
        ax.set_title(f"{m} mixture")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
