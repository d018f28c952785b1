"""`python -m csi`: start the CSI plugin (see --help)."""

from __future__ import annotations

import os
import sys

from .config import configure_logging, from_args


def disable_grpc_fork_handlers() -> None:
    """gRPC reads this when it is first imported: off, a fork() in this process runs none of
    gRPC's at-fork handlers (which crash the child with SIGSEGV while other threads are inside
    gRPC). The plugin never needs gRPC in a child: its children exec at once. Forced, not a
    default, because a value inherited from the environment must not turn the crash back on."""
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"


def main(argv: list[str] | None = None) -> int:
    disable_grpc_fork_handlers()
    config = from_args(argv)
    configure_logging(config.log_level, f"csi-{config.mode.value}")
    # Imported after parsing, so --help and argument errors answer without loading grpc.
    from .server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
