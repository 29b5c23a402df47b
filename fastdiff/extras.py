"""Optional features and the pip extra that installs each.

A feature whose dependency is missing raises :class:`MissingExtra`: one line naming the extra to install
(``pip install 'fastdiff[serve]'``), not a raw ``ModuleNotFoundError`` from deep inside an import.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "serve": "the HTTP server (fastdiff serve)",
    "ray": "Ray Serve replicas (fastdiff serve --ray)",
    "images": "text-to-image serving (fastdiff serve --diffusers)",
    "digits": "the digits data set (training, the demo's judge)",
    "demo": "the demo (fastdiff demo)",
    "diffusers": "the diffusers adapters (fastdiff.from_diffusers, FastdiffScheduler)",
    "bench": "the benchmarks (python -m fastdiff.bench)",
    "plot": "the plots (fastdiff demo --mixture, the serving benchmark's --plot)",
}
"""Each extra of ``pyproject.toml`` that gates a feature, and the feature it gates."""


class MissingExtra(ImportError):
    """An optional feature's dependency is not installed; the message names the extra that installs it."""


def missing_extra(extra: str, exc: ModuleNotFoundError) -> MissingExtra:
    """The error to raise (``from exc``) when importing ``extra``'s dependency failed with ``exc``."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return MissingExtra(
        f"the Python package {exc.name!r} is not installed, and {EXTRAS[extra]} needs it: "
        f"pip install 'fastdiff[{extra}]'",
        name=exc.name,
    )


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module``, or raises :class:`MissingExtra` naming ``extra`` when it (or what it needs) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise missing_extra(extra, exc) from exc


__all__ = ["EXTRAS", "MissingExtra", "missing_extra", "require"]
