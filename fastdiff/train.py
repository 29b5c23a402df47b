"""Moved to :mod:`fastdiff.pretrained.train`; this import path (and ``python -m fastdiff.train``) works for one more
release."""

import runpy

from fastdiff._moved import alias

if __name__ == "__main__":
    runpy.run_module("fastdiff.pretrained.train", run_name="__main__")
else:
    alias(__name__, "fastdiff.pretrained.train")
