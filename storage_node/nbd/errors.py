"""The one table from backend failures to NBD error values ("Error values" of the spec).

The server logs the real error first, then sends only what this table allows on the wire.
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
