"""`python -m csi`: start the CSI plugin (see --help)."""

from __future__ import annotations

import sys

from .config import configure_logging, from_args


def main(argv: list[str] | None = None) -> int:
    config = from_args(argv)
    configure_logging(config.log_level, f"csi-{config.mode.value}")
    # Imported after parsing, so --help and argument errors answer without loading grpc.
    from .server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
