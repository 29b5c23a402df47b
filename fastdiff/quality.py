"""Moved to :mod:`fastdiff.eval.quality`; this import path works for one more release."""

from fastdiff._moved import alias

alias(__name__, "fastdiff.eval.quality")
