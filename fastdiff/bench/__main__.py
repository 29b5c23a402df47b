"""``python -m fastdiff.bench [step|serve] ...``."""

from fastdiff.bench.throughput import command_line

command_line()
