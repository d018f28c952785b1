"""`python -m storage_node`: start a storage node (see --help)."""

from __future__ import annotations

import sys

from .config import configure_logging, from_args
from .node import run


def main(argv: list[str] | None = None) -> int:
    config = from_args(argv)
    configure_logging(config.log_level, "storage-node")
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
