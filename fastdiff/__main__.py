"""``python -m fastdiff``: see fastdiff.cli."""

from fastdiff.cli import main

main()
