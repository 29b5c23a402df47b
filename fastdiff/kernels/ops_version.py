"""The torch version a built ``fastdiff._ops`` was compiled against, read from the library's bytes without loading
it (setup.py writes it in; fastdiff/kernels/op.py checks it before loading). Standard library only: setup.py
imports this file by path, before fastdiff is built."""
from __future__ import annotations

from typing import Optional

TORCH_VERSION_MARKER = b"fastdiff-ops-built-with-torch:"
"""The bytes before the version in the library (the version ends at a NUL)."""


def built_torch_version(library: str) -> Optional[str]:
    """The torch version the library at ``library`` names, or None (no such file, or no marker in it)."""
    try:
        with open(library, "rb") as f:
            data = f.read()
    except OSError:
        return None
    start = data.find(TORCH_VERSION_MARKER)
    if start < 0:
        return None
    end = data.find(b"\0", start)
    return data[start + len(TORCH_VERSION_MARKER):end if end >= 0 else None].decode(errors="replace")


__all__ = ["TORCH_VERSION_MARKER", "built_torch_version"]
