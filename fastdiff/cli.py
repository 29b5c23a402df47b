"""Command line: ``python -m fastdiff demo`` (the main job, on the embedded digits network; ``--mixture`` for
the 2-D Gaussian mixture), ``python -m fastdiff serve`` (the HTTP server), ``python -m fastdiff tune`` (time grids
fitted to a network) and ``python -m fastdiff schedules``."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastdiff.extras import MissingExtra
from fastdiff.schedule import Schedule
from fastdiff.serving.runner import BATCHING_POLICIES
from fastdiff.serving.settings import ServeSettings


def print_schedules(steps: int = 10) -> None:
    """Prints a few schedules on a ``steps``-step grid: t, alpha, sigma, log-SNR, model time."""
    cases = [
        ("vp_discrete linear, leading", Schedule.vp_discrete(), None),
        ("vp_linear, uniform", Schedule.vp_linear(), None),
        ("ve, uniform", Schedule.ve(), None),
        ("edm, karras", Schedule.edm(), None),
    ]
    for title, sch, spacing in cases:
        g = sch.grid(steps, spacing=spacing)
        print(f"\n{title}: {sch!r}")
        print(f"{'t':>12} {'alpha':>12} {'sigma':>12} {'log-SNR':>12} {'model time':>12}")
        for row in zip(g.t, g.alpha, g.sigma, g.log_snr, g.model_time):
            print(" ".join(f"{v:>12.6g}" if np.isfinite(v) else f"{v:>12}" for v in row))


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="sample the embedded digits network; score samplers against diffusers'")
    demo.add_argument("--n", type=int, default=None, help="samples per table cell (default 128; mixture: 2000)")
    demo.add_argument("--out", default="out", help="folder for the PNGs")
    demo.add_argument("--no-diffusers", action="store_true", help="leave diffusers' schedulers out of the table")
    demo.add_argument(
        "--mixture",
        action="store_true",
        help="the earlier demo instead: every sampler on the exact network of a 2-D Gaussian mixture",
    )
    demo.add_argument("--no-plot", action="store_true", help="(--mixture) skip the PNG")


def _add_serve(sub: Any) -> argparse.ArgumentParser:
    """``fastdiff serve``'s flags; the engine's defaults are :class:`ServeSettings`'s."""
    d = ServeSettings()
    serve = sub.add_parser("serve", help="the HTTP server with step-level continuous batching (fastdiff[serve])")
    serve.add_argument(
        "--model",
        default="digits",
        help="'digits' (the embedded network), a .safetensors checkpoint or 'package.module:factory'",
    )
    serve.add_argument(
        "--diffusers",
        default=None,
        metavar="PATH",
        help="serve a diffusers text-to-image pipeline (a save_pretrained folder or a hub id): SD, SDXL or SD3",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    serve.add_argument("--max-batch", type=int, default=d.max_batch, help="the most rows one tick runs")
    serve.add_argument("--max-queue", type=int, default=d.max_queue, help="the most requests waiting; beyond: 429")
    serve.add_argument("--max-n", type=int, default=d.max_n, help="the most samples one request asks for")
    serve.add_argument("--max-pixels", type=int, default=d.max_pixels, help="(--diffusers) the most pixels per image")
    serve.add_argument(
        "--batching",
        choices=BATCHING_POLICIES,
        default=d.batching,
        help="step-level (default), request-level, or one request at a time",
    )
    serve.add_argument(
        "--batch-wait-ms", type=float, default=d.batch_wait_s * 1e3, help="(request batching) wait for a batch"
    )
    serve.add_argument("--timeout", type=float, default=d.request_timeout_s, help="default per-request deadline, s")
    serve.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: the model's)")
    serve.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="the largest request body read; beyond: 413"
    )
    serve.add_argument(
        "--header-timeout", type=float, default=d.header_timeout_s, help="s to send a request's headers; then closed"
    )
    serve.add_argument(
        "--body-timeout", type=float, default=d.body_timeout_s, help="s to send a request's body; beyond: 408"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("FASTDIFF_API_KEY") or d.api_key,
        help="require 'Authorization: Bearer <key>' on all but /healthz and /readyz (default: $FASTDIFF_API_KEY)",
    )
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas (fastdiff[ray])")
    serve.add_argument("--replicas", type=int, default=1, help="(--ray) replicas, each running its own engine")
    serve.add_argument("--address", default=None, help="(--ray) join this Ray cluster instead of starting one")
    return serve


def _add_tune(sub: Any) -> argparse.ArgumentParser:
    """``fastdiff tune``'s flags (docs/tune.md)."""
    tune = sub.add_parser("tune", help="fit time grids to a network (spacing='tuned'); write them into a checkpoint")
    tune.add_argument("--model", default="digits", help="'digits' (the embedded network) or a .safetensors checkpoint")
    tune.add_argument("--sampler", nargs="+", required=True, help="one or more coefficient-program samplers")
    tune.add_argument("--steps", nargs="+", type=int, required=True, help="one or more step counts (>= 2)")
    tune.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    tune.add_argument("--out", default=None, help="write the checkpoint with the grids added here (may be --model)")
    tune.add_argument("--n-tune", type=int, default=128, help="samples (seeds) the grid is fitted to")
    tune.add_argument("--n-eval", type=int, default=256, help="held-out samples (other seeds) that judge it")
    tune.add_argument("--max-evals", type=int, default=300, help="the most sampling runs of the search per setting")
    tune.add_argument("--teacher-sampler", default="unipc")
    tune.add_argument("--teacher-steps", type=int, default=200)
    tune.add_argument("--shifts", action="store_true", help="also fit a per-step shift of the network's time")
    tune.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    return tune


def run_tune(args: argparse.Namespace) -> list:
    """Tunes every (sampler, steps) of ``args`` on one set of teacher samples, printing the held-out losses and
    writing each grid to ``--out`` as soon as it is fitted; returns the :class:`TuneResult` list."""
    from fastdiff.checkpoint import load, save_tuned
    from fastdiff.pretrained import DIGITS_PATH
    from fastdiff.solvers.tune import EVAL_SEED_BASE, Teacher, reference, tune

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = DIGITS_PATH if args.model == "digits" else args.model
    if not str(path).endswith(".safetensors") or not os.path.exists(path):
        raise ValueError(f"--model must be 'digits' or an existing .safetensors checkpoint, got {args.model!r}")
    pipe = load(path, device="cpu")
    teacher = Teacher(args.teacher_sampler, args.teacher_steps)
    progress = not args.no_progress
    start = time.perf_counter()
    refs = tuple(
        reference(pipe, seeds, args.guidance, teacher, pipe.sample_shape, progress)
        for seeds in (range(args.n_tune), range(EVAL_SEED_BASE, EVAL_SEED_BASE + args.n_eval))
    )
    print(
        f"teacher ({teacher.sampler}, {teacher.steps} steps): {args.n_tune} tuning and {args.n_eval} held-out samples "
        f"in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    results = []
    for sampler in args.sampler:
        for steps in args.steps:
            res = tune(
                pipe,
                sampler,
                steps,
                args.guidance,
                teacher=teacher,
                shifts=args.shifts,
                max_evals=args.max_evals,
                progress=progress,
                references=refs,
            )
            loss = res.tuned.loss
            print(
                f"{sampler} steps={steps} guidance={args.guidance:g}: held-out loss {loss['tuned']:.4g} "
                f"(default grid {loss['default']:.4g}), {res.evals} runs, {res.seconds:.0f} s",
                flush=True,
            )
            if args.out:
                save_tuned(path, res.tuned, out=args.out)
                path = args.out  # the next grid joins the ones written
            results.append(res)
    return results


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    """``fastdiff serve``'s flags as settings (ValueError for a bad one)."""
    return ServeSettings(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batching=args.batching,
        batch_wait_s=args.batch_wait_ms / 1e3,
        max_n=args.max_n,
        max_pixels=args.max_pixels,
        request_timeout_s=args.timeout,
        threads=args.threads,
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        api_key=args.api_key,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m fastdiff`` and the ``fastdiff`` script."""
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    serve_parser = _add_serve(sub)
    tune_parser = _add_tune(sub)
    sched = sub.add_parser("schedules", help="print a few schedules on a grid")
    sched.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        if args.command == "tune":
            try:
                run_tune(args)
            except (ValueError, TypeError) as exc:
                tune_parser.error(str(exc))
        else:
            _run(args, parser, serve_parser)
    except MissingExtra as exc:  # an optional feature without its extra: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, serve_parser: argparse.ArgumentParser) -> None:
    """Runs the parsed command."""
    if args.command == "demo" and args.mixture:
        from fastdiff.demos.mixture import run_demo

        print("fastdiff demo: every sampler on the exact network of a 2-D, 3-component Gaussian mixture")
        run_demo(n=args.n or 2000, out_dir=args.out, plot=not args.no_plot)
    elif args.command == "demo":
        from fastdiff.demos.digits import run_digits_demo

        print("fastdiff demo: the embedded digits network (fastdiff.pretrained.digits), 8x8 images")
        run_digits_demo(out_dir=args.out, n=args.n or 128, with_diffusers=not args.no_diffusers, threads=2)
    elif args.command == "serve":
        from fastdiff.serving.server import load_pipeline, load_text_to_image_pipeline, serve

        try:  # bad flags or a bad model spec are usage errors, not tracebacks
            settings = _serve_settings(args)
            if args.diffusers is not None and (args.ray or args.model != "digits"):
                raise ValueError("--diffusers serves one pipeline in this process: not with --model or --ray")
            if args.diffusers is not None:
                pipe = load_text_to_image_pipeline(args.diffusers, args.device)
            else:
                pipe = None if args.ray else load_pipeline(args.model, args.device)
            if args.replicas < 1:
                raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        except MissingExtra:
            raise
        except (ValueError, TypeError, FileNotFoundError, ImportError, AttributeError) as exc:
            serve_parser.error(str(exc))
        if args.ray:
            from fastdiff.serving.ray import serve_ray

            serve_ray(
                args.model,
                host=args.host,
                port=args.port,
                settings=settings,
                num_replicas=args.replicas,
                address=args.address,
                device=args.device,
            )
        else:
            serve(pipe, host=args.host, port=args.port, settings=settings, log_level=args.log_level)
    else:
        print_schedules(args.steps)
