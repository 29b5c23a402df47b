"""Benchmarks, each against its peer in the same run: the whole sampling loop (``throughput``; ``python -m
fastdiff.bench``), one sampler step (``step``; ``python -m fastdiff.bench step``), the server under load (``serve``;
``python -m fastdiff.bench serve``), and the timing helpers they share (``timing``). Results go to a temporary
path unless ``--json`` names one."""
