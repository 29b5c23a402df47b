"""Moved to :mod:`fastdiff.runtime.x0_clip`; this import path works for one more release."""

from fastdiff._moved import alias

alias(__name__, "fastdiff.runtime.x0_clip")
