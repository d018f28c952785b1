"""`python -m storage_node`: start a storage node (see --help); `python -m storage_node
quarantine ...` lists or removes quarantined image files (storage_node.quarantine)."""

from __future__ import annotations

import sys

from .config import configure_logging, from_args
from .node import run
from .quarantine import main as quarantine_main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["quarantine"]:
        return quarantine_main(args[1:])
    config = from_args(argv)
    configure_logging(config.log_level, "storage-node")
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
