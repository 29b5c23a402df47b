"""Old import paths of modules that moved into subpackages: each old module is a shim that makes its name an alias
of the new module (the same module object, so every name and ``isinstance`` check agrees). Kept for one release."""

from __future__ import annotations

import importlib
import sys


def alias(old: str, new: str) -> None:
    """Makes ``import old`` give the module ``new`` (call it from the shim module ``old`` itself)."""
    module = importlib.import_module(new)
    sys.modules[old] = module
    parent, _, child = old.rpartition(".")
    setattr(sys.modules[parent], child, module)
