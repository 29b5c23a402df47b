"""Throughput benchmark: fastdiff eager (and CUDA graph on a GPU) vs diffusers' scheduler loop.

Same options as ``python -m fastdiff.bench`` (see fastdiff/bench.py); writes bench/results/throughput.json
(one entry per configuration) and prints a table. Example:

    .venv/bin/python bench/throughput.py --sampler ddim --steps 50 --batch 64 --shape 4,16,16
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastdiff.bench import main  # noqa: E402

if __name__ == "__main__":
    main(default_json=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.json"))
