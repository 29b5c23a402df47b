"""Writes requirements/lock.txt: the newest release of every package the ``dev`` extra needs (so the test peers and
every optional feature), as pip resolves them now, pinned with ``==``. ``make lock`` runs it; ``make test`` and CI
install from the lock with ``pip install -c``, so a new release of a dependency changes nothing until the lock is
refreshed on purpose (try the newest first with ``make test-latest``).

    python tools/lock.py TORCH_SPEC K_DIFFUSION_SPEC   # e.g. torch==2.13.0 k-diffusion
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "lock.txt")


def resolve(requirements: List[str], deps: bool = True) -> Dict[str, str]:
    """{name: version} of what ``pip install requirements`` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", report, *([] if deps else ["--no-deps"]), *requirements], check=True, cwd=ROOT)
        with open(report) as f:
            items = json.load(f)["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def main(argv: List[str]) -> None:
    """Resolves ``.[dev]`` with ``argv[0]`` (the torch to test with) and ``argv[1]`` (k-diffusion, without its
    dependencies: see the Makefile) and writes the lock."""
    if len(argv) != 2:
        raise SystemExit(__doc__)
    torch_spec, kdiff_spec = argv
    pins = resolve([".[dev]", torch_spec])
    pins.update(resolve([kdiff_spec], deps=False))
    pins.pop("fastdiff", None)
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    header = ["# The versions `make test` and CI install (pip install -c). Written by `make lock` "
              "(tools/lock.py); edit pyproject.toml, not this file."]
    with open(LOCK, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"{len(lines)} pins written to {LOCK}")


if __name__ == "__main__":
    main(sys.argv[1:])
