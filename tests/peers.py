"""Loading the peer libraries the tests compare against.

k-diffusion's package ``__init__`` imports every submodule (models, evaluation, the CLIP and clean-fid
based metrics, ...), and through ``k_diffusion.utils`` it imports torchvision. On machines where the
installed torchvision wheel is a CUDA build that does not load against the CPU torch, ``import
k_diffusion`` fails although the code we compare against (``k_diffusion.sampling``) needs neither
torchvision nor any of those submodules: ``k_diffusion.utils`` uses torchvision only to convert
between tensors and PIL images, which sampling never does.

:func:`k_diffusion_sampling` therefore imports ``k_diffusion.sampling`` without running
``k_diffusion/__init__.py``: it registers a bare package module for ``k_diffusion`` whose ``__path__``
points at the installed package directory, so ``import k_diffusion.utils`` and ``import
k_diffusion.sampling`` load the real, unmodified files. Only when ``import torchvision`` fails does it
put placeholder modules for ``torchvision``, ``torchvision.transforms`` and
``torchvision.transforms.functional`` into ``sys.modules``; any attribute used from them raises
:class:`PeerUnavailable` with the reason, so a test that did need torchvision would fail loudly
instead of silently using a stub.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

# float32 unit roundoff: the peers (diffusers' betas and alphas_cumprod, k-diffusion's Karras ramp)
# compute in float32, so tolerances against them are stated in multiples of it.
U32 = 2.0**-24


class PeerUnavailable(AttributeError):
    """Raised when a placeholder stands in for a module that could not be imported.

    An AttributeError subclass, so ``hasattr`` probes answer False rather than crash, while any real
    use reads the reason.
    """


class _Placeholder(types.ModuleType):
    """A module standing in for one that failed to import; every public attribute raises."""

    def __init__(self, name: str, reason: str):
        super().__init__(name)
        self.__dict__["_reason"] = reason

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # import machinery probes (__path__, __file__, ...): plain absence
            raise AttributeError(attr)
        raise PeerUnavailable(
            f"{self.__name__}.{attr} is unavailable: tests/peers.py put a placeholder for "
            f"{self.__name__} in sys.modules because importing torchvision failed ({self._reason}). "
            "k-diffusion only uses torchvision for PIL conversions, which its sampling code never calls."
        )


def _k_diffusion_dir() -> list[str]:
    """Directory (as a package __path__) of the installed k_diffusion, without importing it."""
    spec = importlib.util.find_spec("k_diffusion")  # a top-level find_spec does not execute __init__
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    # Fall back to the distribution's file list.
    dist = importlib.metadata.distribution("k-diffusion")
    for f in dist.files or ():
        if f.parts[:1] == ("k_diffusion",) and f.name == "__init__.py":
            return [os.path.dirname(str(dist.locate_file(f)))]
    raise ImportError("k-diffusion is not installed (pip install -e '.[dev]')")


_TORCHVISION = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _ensure_torchvision() -> bool:
    """Imports torchvision, or puts placeholders for it in sys.modules; returns True for placeholders."""
    try:
        import torchvision.transforms.functional  # noqa: F401

        return False
    except Exception as exc:  # ImportError (not installed: the Makefile's set-up), or a mismatched binary wheel
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop half-imported pieces of the failed import
        tv = _Placeholder("torchvision", reason)
        tr = _Placeholder("torchvision.transforms", reason)
        fn = _Placeholder("torchvision.transforms.functional", reason)
        tv.__dict__["transforms"] = tr
        tr.__dict__["functional"] = fn
        sys.modules.update(dict(zip(_TORCHVISION, (tv, tr, fn))))
        return True


@functools.cache
def k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's real ``k_diffusion.sampling`` module, imported without its package ``__init__``."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    if "k_diffusion" not in sys.modules:
        path = _k_diffusion_dir()
        pkg = types.ModuleType("k_diffusion")
        spec = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
        spec.submodule_search_locations = path
        pkg.__spec__ = spec
        pkg.__path__ = path
        pkg.__package__ = "k_diffusion"
        sys.modules["k_diffusion"] = pkg
    placeholders = _ensure_torchvision()
    try:
        importlib.import_module("k_diffusion.utils")
        return importlib.import_module("k_diffusion.sampling")
    finally:
        # k_diffusion.utils keeps its own reference; other code (diffusers probes importlib.util.find_spec
        # ("torchvision")) must not find a module that is not there.
        if placeholders:
            for name in _TORCHVISION:
                sys.modules.pop(name, None)
