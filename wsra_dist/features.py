"""Feature extraction entry point: `python -m wsra_dist.features [features options]` and
`accelerate launch [--multi_gpu --num_processes N] -m wsra_dist.features [features options]`.

The same options as `wsra-dist features`, through the one error path (one line, exit 2; a video that could
not be used: exit 1).  Process r of N takes videos r::N; see wsra_dist/video/run.py.
"""

import sys

from .cli import app
from .errors import run_typer


def main() -> None:
    run_typer(app, ["features", *sys.argv[1:]])


if __name__ == "__main__":
    main()
