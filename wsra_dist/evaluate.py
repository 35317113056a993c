"""Distributed evaluation entry point: `accelerate launch -m wsra_dist.evaluate [evaluate options]`.

Queries are split across processes by shard, predictions are gathered and de-duplicated by id, and
rank 0 writes the outputs; the metrics equal the single-process ones.
"""

import sys

from .cli import app


def main() -> None:
    app(["evaluate", *sys.argv[1:]], prog_name="wsra_dist.evaluate")


if __name__ == "__main__":
    main()
