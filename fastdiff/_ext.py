"""Loads the compiled C++ core, with a message that says how to build it when it is missing."""

try:
    from fastdiff import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "fastdiff's C++ extension (fastdiff._C) is not built. Build it with `make install` "
        "(or `pip install -e .` from the repository root, which compiles csrc/ with pybind11). "
        f"Original error: {exc}"
    ) from exc

C = _C
