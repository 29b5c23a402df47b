"""Runs diffusers' own scheduler test suites with each test class's scheduler replaced by FastdiffScheduler.

Usage (by hand, not part of ``make test``; it needs a diffusers checkout at the installed version, e.g.
``git --git-dir=<diffusers.git> archive <ref> tests | tar -x -C /tmp/diffusers-src``)::

    .venv/bin/python tools/diffusers_scheduler_suite.py /tmp/diffusers-src [--native] [--only DDIM,PNDM] [-v]

For every test class of the ten suites, each diffusers scheduler class the class tests (its ``scheduler_classes``)
is replaced, for the duration of each of its tests, by ``FastdiffScheduler.for_class(name)``: in the class's
``scheduler_classes``, and wherever the test module or the shared ``test_schedulers`` module names that class
(so ``DDIMScheduler(**config)`` in a test body, and the shared checks that compare the class under test with
``EulerDiscreteScheduler`` and the like, see the replacement). Other diffusers classes a test names (for example
the classes ``test_switch`` converts through) stay diffusers'. ``--native`` runs the same tests unchanged (the
control). Prints passed / failed / skipped per scheduler class and, with ``-v``, each failing test.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

SUITES: dict[str, str] = {
    "DDIMScheduler": "test_scheduler_ddim.py",
    "DDPMScheduler": "test_scheduler_ddpm.py",
    "PNDMScheduler": "test_scheduler_pndm.py",
    "LMSDiscreteScheduler": "test_scheduler_lms.py",
    "EulerDiscreteScheduler": "test_scheduler_euler.py",
    "EulerAncestralDiscreteScheduler": "test_scheduler_euler_ancestral.py",
    "HeunDiscreteScheduler": "test_scheduler_heun.py",
    "DPMSolverMultistepScheduler": "test_scheduler_dpm_multi.py",
    "UniPCMultistepScheduler": "test_scheduler_unipc.py",
    "DEISMultistepScheduler": "test_scheduler_deis.py",
}
COMMON_MODULE = "tests.schedulers.test_schedulers"


class SwapPlugin:
    """A pytest plugin: swaps each test's scheduler classes for FastdiffScheduler's (unless ``native``) and
    tallies the outcomes per diffusers class."""

    def __init__(self, native: bool):
        self.native = native
        self.outcomes: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self._source: dict[str, str] = {}

    def _classes(self, item: Any) -> tuple[type, ...]:
        cls = getattr(item, "cls", None)
        return tuple(getattr(cls, "scheduler_classes", ()) or ())

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        # The shared base class, imported into every test module, tests no scheduler: not counted.
        kept = [i for i in items if any(c.__name__ in SUITES for c in self._classes(i))]
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Any:
        originals = self._classes(item)
        names = [c.__name__ for c in originals if c.__name__ in SUITES]
        self._source[item.nodeid] = names[0]
        if self.native:
            yield
            return
        from fastdiff.diffusers import FastdiffScheduler

        patch = pytest.MonkeyPatch()
        swapped = tuple(FastdiffScheduler.for_class(c.__name__) if c.__name__ in SUITES else c for c in originals)
        patch.setattr(item.cls, "scheduler_classes", swapped)
        for module in (item.module, sys.modules.get(COMMON_MODULE)):
            for original, replacement in zip(originals, swapped):
                if module is not None and getattr(module, original.__name__, None) is original:
                    patch.setattr(module, original.__name__, replacement)
        try:
            yield
        finally:
            patch.undo()

    def pytest_runtest_logreport(self, report: Any) -> None:
        source = self._source[report.nodeid]
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
            self.outcomes[source][outcome].append(report.nodeid)

    def summary(self, verbose: bool) -> str:
        lines = [f"{'class':34s} {'passed':>6s} {'failed':>6s} {'skipped':>7s} {'pass %':>7s}"]
        totals = defaultdict(int)
        for name in SUITES:
            counts = self.outcomes.get(name)
            if not counts:
                continue
            p, f, s = (len(counts[k]) for k in ("passed", "failed", "skipped"))
            for k, v in (("passed", p), ("failed", f), ("skipped", s)):
                totals[k] += v
            lines.append(f"{name:34s} {p:6d} {f:6d} {s:7d} {100.0 * p / max(p + f, 1):6.1f}%")
            if verbose:
                lines += [f"    FAILED {nodeid.split('::', 1)[1]}" for nodeid in counts["failed"]]
        p, f, s = totals["passed"], totals["failed"], totals["skipped"]
        lines.append(f"{'total':34s} {p:6d} {f:6d} {s:7d} {100.0 * p / max(p + f, 1):6.1f}%")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the suites; returns 0 when every class passes at least ``--min-pass`` percent with no full-loop
    failure, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a diffusers checkout (its tests/ folder is used)")
    parser.add_argument("--native", action="store_true", help="run diffusers' own classes (the control)")
    parser.add_argument("--only", default="", help="comma-separated class names (prefixes) to run")
    parser.add_argument("-k", default="", help="pytest -k expression")
    parser.add_argument("-v", "--verbose", action="store_true", help="list each failing test")
    parser.add_argument("--tb", default="no", help="pytest's --tb style for failures (no, line, short, long)")
    parser.add_argument("--min-pass", type=float, default=95.0, help="the pass percentage each class must reach")
    args = parser.parse_args(argv)
    folder = args.checkout / "tests" / "schedulers"
    if not (folder / "test_schedulers.py").is_file():
        parser.error(f"{folder} has no test_schedulers.py: pass the root of a diffusers checkout")
    wanted = [n for n in SUITES if not args.only or any(n.startswith(p) for p in args.only.split(","))]
    files = [str(folder / SUITES[n]) for n in wanted]
    plugin = SwapPlugin(args.native)
    os.chdir(args.checkout)
    pytest_args = [
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:warnings",
        "--no-header",
        "-rN",
        f"--tb={args.tb}",
        *files,
    ]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest.main(pytest_args, plugins=[plugin])
    print(plugin.summary(args.verbose))
    ok = True
    for name in wanted:
        counts = plugin.outcomes.get(name, {})
        passed, failed = len(counts.get("passed", [])), counts.get("failed", [])
        loops = [n for n in failed if "full_loop" in n]
        if loops or 100.0 * passed / max(passed + len(failed), 1) < args.min_pass:
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
