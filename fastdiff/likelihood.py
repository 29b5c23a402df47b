"""Moved to :mod:`fastdiff.solvers.likelihood`; this import path works for one more release."""

from fastdiff._moved import alias

alias(__name__, "fastdiff.solvers.likelihood")
