"""Throughput benchmark: fastdiff eager (and CUDA graph on a GPU) vs diffusers' scheduler loop.

Same options as ``python -m fastdiff.bench`` (see fastdiff/bench/throughput.py): prints a table and writes JSON
(one entry per configuration) to a temporary path, or to ``--json bench/results/throughput.json`` when asked. Example:

    .venv/bin/python bench/throughput.py --sampler ddim --steps 50 --batch 64 --shape 4,16,16
"""

from __future__ import annotations

from fastdiff.bench.throughput import main

if __name__ == "__main__":
    main()
