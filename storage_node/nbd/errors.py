"""The one table from backend failures to NBD error values ("Error values" of the spec).

The server logs the real error first, then sends only what this table allows on the wire:
the error value and a fixed message per value (`nbd_message`). The exception's own text
(paths, errno strings, whatever a backend put in it) stays in the log.
"""

from __future__ import annotations

import errno

from ..backend import NotFast
from .constants import Errno

_FROM_ERRNO: dict[int, Errno] = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    # "SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC"
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    if isinstance(exc, NotFast):
        return Errno.ENOTSUP
    if isinstance(exc, OSError) and exc.errno is not None:
        return _FROM_ERRNO.get(exc.errno, Errno.EIO)
    return Errno.EIO


_MESSAGES: dict[Errno, str] = {
    Errno.EPERM: "operation not permitted",
    Errno.EIO: "input/output error",
    Errno.ENOMEM: "out of memory",
    Errno.EINVAL: "invalid request",
    Errno.ENOSPC: "no space left on the volume",
    Errno.EOVERFLOW: "value too large",
    Errno.ENOTSUP: "operation not supported",
    Errno.ESHUTDOWN: "server is shutting down",
}


def nbd_message(err: Errno) -> str:
    """The text an error reply carries for `err`: fixed, so no detail of the failure leaks."""
    return _MESSAGES.get(err, "request failed")
