"""nbdsh (libnbd's Python shell) against the server: option phase, errors, edge requests.

Owns: cases that need a scriptable client: NBD_OPT_LIST / INFO / GO, meta contexts, structured
replies on and off, the error each out-of-range or forbidden request gets (per "Error values"
and "Size constraints" in the spec), and that the connection stays usable after an error.
`set_strict_mode(0)` lets libnbd send requests it would otherwise refuse client-side.

Each case is a script for Debian's nbdsh. It fills the dict `out`, which is printed as JSON
and compared whole with the case's expected dict.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.clients.targets import RO_SEED_BYTE, RO_SEED_LEN, MiB, NbdTarget, debian_python_env, run

# Runs before every case: helpers shared by the scripts below.
PRELUDE = r'''
import json, os
import nbd

URIS = json.loads(os.environ["NBD_TEST_URIS"])
NAMES = json.loads(os.environ["NBD_TEST_NAMES"])  # export -> the name a client sends for it
SERVER = os.environ["NBD_TEST_SERVER_URI"]
KiB, MiB = 1 << 10, 1 << 20
NO_DOS_LIMIT = 1 << 25  # payloads up to 2^25 must not be treated as a denial of service
out = {}

def connect(export, *, structured=True, strict=True, meta=()):
    c = nbd.NBD()
    c.set_request_structured_replies(structured)
    for m in meta:
        c.add_meta_context(m)
    c.connect_uri(URIS[export])
    if not strict:
        c.set_strict_mode(0)
    return c

def negotiating(export=""):
    c = nbd.NBD()
    c.set_opt_mode(True)
    c.connect_uri(SERVER if not export else URIS[export])
    return c

def outcome(c, fn, *args):
    """'OK', the errno name the server sent back, or 'DEAD' if the connection is gone."""
    try:
        fn(*args)
        return "OK"
    except nbd.Error as e:
        return "DEAD" if c.aio_is_dead() else (e.errno or "no errno: " + e.string)

def usable(c):
    """The connection still carries a request after whatever happened on it."""
    if c.aio_is_dead():
        return False
    c.pread(512, 0)
    return True

def extents(c, length, offset=0, flags=0):
    """base:allocation as merged [offset, length, flags] runs covering the whole range."""
    runs, pos, end = [], offset, offset + length
    while pos < end:
        got = []
        def cb(ctx, off, entries, err):
            if ctx == "base:allocation":
                got.extend(entries)
            return 0
        c.block_status(end - pos, pos, cb, flags)
        assert got, "no base:allocation extent in the reply"
        for i in range(0, len(got), 2):
            n, f = min(got[i], end - pos), got[i + 1]
            if runs and runs[-1][2] == f:
                runs[-1][1] += n
            else:
                runs.append([pos, n, f])
            pos += n
            if pos >= end:
                break
    return runs
'''

EPILOGUE = "\nprint(json.dumps(out))\n"

# Stands for what NBD_OPT_LIST must show of the target, [[name, description], ...].
LISTED = "<the target's listed exports>"

HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
DATA = 0

# (id, script, expected out). Sizes: disk 64M, ro 16M (seeded), small 1M.
CASES: list[Any] = [
    pytest.param(
        """
c = negotiating()
listed = []
c.opt_list(lambda name, description: listed.append([name, description]) or 0)
out["exports"] = sorted(listed)
out["negotiating"] = c.aio_is_negotiating()
c.opt_abort()
""",
        # Every command-line export with its description; a volume's attachment never.
        {"exports": LISTED, "negotiating": True},
        id="opt-list-all-exports",
        marks=pytest.mark.peer_differs("qemu-nbd serves one export per process"),
    ),
    pytest.param(
        """
c = negotiating()
c.set_export_name("no-such-export")
out["info-missing"] = outcome(c, c.opt_info)
out["negotiating"] = c.aio_is_negotiating()
c.set_export_name(NAMES["disk"])
c.opt_info()
out["size"] = c.get_size()
out["read-only"] = c.is_read_only()
c.opt_go()
out["ready"] = c.aio_is_ready()
out["first-bytes"] = c.pread(4, 0).hex()
""",
        {
            "info-missing": "ENOENT",
            "negotiating": True,
            "size": 64 * MiB,
            "read-only": False,
            "ready": True,
            "first-bytes": "00000000",
        },
        id="opt-info-missing-export-then-go",
    ),
    pytest.param(
        """
c = negotiating("ro")
c.opt_info()
out["size"] = c.get_size()
out["read-only"] = c.is_read_only()
c.set_export_name("no-such-export")
out["go-missing"] = outcome(c, c.opt_go)
out["negotiating"] = c.aio_is_negotiating()
c.set_export_name(NAMES["ro"])
c.opt_go()
out["go-read"] = c.pread(2, RO_SEED_LEN - 1).hex()
""",
        {
            "size": 16 * MiB,
            "read-only": True,
            "go-missing": "ENOENT",
            "negotiating": True,
            "go-read": f"{RO_SEED_BYTE:02x}00",
        },
        id="opt-info-readonly-opt-go-missing",
    ),
    pytest.param(
        """
c = negotiating("disk")
c.add_meta_context("base:allocation")
listed = []
c.opt_list_meta_context(lambda name: listed.append(name) or 0)
out["listed"] = listed
c.opt_go()
out["negotiated"] = c.can_meta_context("base:allocation")
c.pwrite(b"\\xab" * (64 * KiB), 1 * MiB)
out["map"] = extents(c, 4 * MiB)
""",
        {
            "listed": ["base:allocation"],
            "negotiated": True,
            "map": [
                [0, 1 * MiB, HOLE],
                [1 * MiB, 64 * 1024, DATA],
                [1 * MiB + 64 * 1024, 3 * MiB - 64 * 1024, HOLE],
            ],
        },
        id="meta-context-base-allocation",
    ),
    pytest.param(
        """
c = connect("disk", meta=["base:allocation"])
c.pwrite(b"\\xab" * (64 * KiB), 0)
got = []
c.block_status(4 * MiB, 0, lambda ctx, off, e, err: got.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
out["extents-in-reply"] = len(got) // 2
out["first"] = got[:2]
""",
        {"extents-in-reply": 1, "first": [64 * 1024, DATA]},
        id="block-status-req-one",
    ),
    pytest.param(
        """
c = connect("disk", structured=False, meta=["base:allocation"])
out["structured"] = c.get_structured_replies_negotiated()
out["meta"] = c.can_meta_context("base:allocation")
c.pwrite(b"\\x5a" * 4096, 8192)
out["read-data"] = c.pread(4096, 8192) == b"\\x5a" * 4096
out["read-hole"] = c.pread(8192, 0) == bytes(8192)
""",
        {"structured": False, "meta": False, "read-data": True, "read-hole": True},
        id="structured-replies-off",
    ),
    pytest.param(
        """
c = connect("disk")
out["structured"] = c.get_structured_replies_negotiated()
c.pwrite(b"\\x33" * 4096, 1 * MiB + 4096)
want = bytes(MiB + 4096) + b"\\x33" * 4096 + bytes(3 * MiB - 8192)
out["read-matches"] = c.pread(4 * MiB, 0) == want
""",
        {"structured": True, "read-matches": True},
        id="structured-replies-on-hole-and-data",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
out["read-past-end"] = outcome(c, c.pread, 4096, 64 * MiB)
out["read-straddling-end"] = outcome(c, c.pread, 8192, 64 * MiB - 4096)
out["trim-past-end"] = outcome(c, c.trim, 4096, 64 * MiB)
out["usable"] = usable(c)
""",
        {
            "read-past-end": "EINVAL",
            "read-straddling-end": "EINVAL",
            "trim-past-end": "EINVAL",
            "usable": True,
        },
        id="read-and-trim-past-end-einval",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
out["write-past-end"] = outcome(c, c.pwrite, b"x" * 4096, 64 * MiB)
out["write-straddling-end"] = outcome(c, c.pwrite, b"x" * 8192, 64 * MiB - 4096)
out["zero-past-end"] = outcome(c, c.zero, 4096, 64 * MiB)
out["usable"] = usable(c)
""",
        {
            "write-past-end": "ENOSPC",
            "write-straddling-end": "ENOSPC",
            "zero-past-end": "ENOSPC",
            "usable": True,
        },
        id="write-and-zero-past-end-enospc",
        marks=pytest.mark.peer_differs("qemu-nbd answers EINVAL, the spec says ENOSPC"),
    ),
    pytest.param(
        """
c = connect("ro", strict=False)
out["write"] = outcome(c, c.pwrite, b"x" * 4096, 0)
out["write-fua"] = outcome(c, c.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
out["trim"] = outcome(c, c.trim, 4096, 0)
out["zero"] = outcome(c, c.zero, 4096, 0)
seed = bytes([RO_SEED_BYTE]) * RO_SEED_LEN
out["seed-intact"] = c.pread(RO_SEED_LEN + 4096, 0) == seed + bytes(4096)
out["usable"] = usable(c)
""",
        {
            "write": "EPERM",
            "write-fua": "EPERM",
            "trim": "EPERM",
            "zero": "EPERM",
            "seed-intact": True,
            "usable": True,
        },
        id="readonly-export-eperm",
        marks=pytest.mark.peer_differs("qemu-nbd answers EINVAL, the spec says EPERM"),
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
# The spec leaves a zero-length request's outcome unspecified, but the server SHOULD NOT
# disconnect: any reply will do, as long as the connection carries on.
for name, fn, args in [
    ("read", c.pread, (0, 4096)),
    ("write", c.pwrite, (b"", 4096)),
    ("trim", c.trim, (0, 4096)),
    ("zero", c.zero, (0, 4096)),
    ("cache", c.cache, (0, 4096)),
]:
    out[name] = outcome(c, fn, *args) != "DEAD"
out["usable"] = usable(c)
""",
        {"read": True, "write": True, "trim": True, "zero": True, "cache": True, "usable": True},
        id="zero-length-requests",
    ),
    pytest.param(
        """
c = connect("disk", structured=False, strict=False)
maximum = c.get_block_size(nbd.SIZE_MAXIMUM)
out["advertised"] = 0 < maximum and maximum + 4096 <= c.get_size()
# With simple replies a read longer than the maximum payload must fail, without payload.
out["read"] = outcome(c, c.pread, maximum + 4096, 0) if out["advertised"] else "n/a"
out["usable"] = usable(c)
""",
        {"advertised": True, "read": "EINVAL", "usable": True},
        id="oversize-read-simple-replies",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
maximum = c.get_block_size(nbd.SIZE_MAXIMUM) or NO_DOS_LIMIT
out["applies"] = maximum + 4096 <= c.get_size()
# With structured replies the server may split the reply or refuse it; either way, no hang-up.
r = outcome(c, c.pread, maximum + 4096, 0) if out["applies"] else "n/a"
out["read"] = r in ("OK", "EINVAL", "EOVERFLOW")
out["usable"] = usable(c)
""",
        {"applies": True, "read": True, "usable": True},
        id="oversize-read-structured",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
c.pwrite(b"\\x11" * 4096, 0)
maximum = c.get_block_size(nbd.SIZE_MAXIMUM) or NO_DOS_LIMIT
payload = maximum + 4096
out["applies"] = payload <= c.get_size()
r = outcome(c, c.pwrite, b"\\xee" * payload, 0) if out["applies"] else "n/a"
out["rejected"] = r != "OK"
if payload <= NO_DOS_LIMIT:
    # Not a denial of service: the server consumes the payload, errors, and carries on.
    out["rejected"] = r in ("EINVAL", "EOVERFLOW")
    out["carries-on"] = usable(c)
else:
    # Past 2^25 the server MAY hang up; it must still serve the next connection.
    out["carries-on"] = usable(c) or usable(connect("disk"))
out["unchanged"] = connect("disk").pread(4096, 0) == b"\\x11" * 4096
""",
        {"applies": True, "rejected": True, "carries-on": True, "unchanged": True},
        id="oversize-write-rejected",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
out["unknown-flag"] = outcome(c, c.pread, 512, 0, 1 << 7)
out["usable"] = usable(c)
""",
        {"unknown-flag": "EINVAL", "usable": True},
        id="unknown-command-flag-einval",
    ),
    pytest.param(
        """
c = connect("disk", strict=False)
# "Command flags": a flag not documented for the command SHOULD get EINVAL ...
out["no-hole-on-read"] = outcome(c, c.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)
out["req-one-on-read"] = outcome(c, c.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
out["fast-zero-on-write"] = outcome(c, c.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FAST_ZERO)
out["df-on-write"] = outcome(c, c.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_DF)
# ... but FUA is valid on every command once NBD_FLAG_SEND_FUA is negotiated.
out["fua-on-read"] = outcome(c, c.pread, 512, 0, nbd.CMD_FLAG_FUA)
out["usable"] = usable(c)
""",
        {
            "no-hole-on-read": "EINVAL",
            "req-one-on-read": "EINVAL",
            "fast-zero-on-write": "EINVAL",
            "df-on-write": "EINVAL",
            "fua-on-read": "OK",
            "usable": True,
        },
        id="flag-not-for-this-command",
    ),
    pytest.param(
        """
c = connect("disk")
out["can"] = [c.can_fua(), c.can_flush(), c.can_cache(), c.can_multi_conn()]
out["write-fua"] = outcome(c, c.pwrite, b"\\x66" * 8192, 3 * MiB, nbd.CMD_FLAG_FUA)
out["zero-fua"] = outcome(c, c.zero, 4096, 3 * MiB, nbd.CMD_FLAG_FUA)
out["flush"] = outcome(c, c.flush)
out["cache"] = outcome(c, c.cache, 1 * MiB, 3 * MiB)
out["read"] = c.pread(8192, 3 * MiB) == bytes(4096) + b"\\x66" * 4096
""",
        {
            "can": [True, True, True, True],
            "write-fua": "OK",
            "zero-fua": "OK",
            "flush": "OK",
            "cache": "OK",
            "read": True,
        },
        id="fua-flush-cache",
    ),
    pytest.param(
        """
c1, c2 = connect("disk"), connect("disk")
a, b = b"\\x42" * (64 * KiB), b"\\x43" * (64 * KiB)
c1.pwrite(a, 2 * MiB)
out["second-sees-first"] = c2.pread(64 * KiB, 2 * MiB) == a
c2.pwrite(b, 2 * MiB + 64 * KiB)
c2.flush()
out["first-sees-second"] = c1.pread(128 * KiB, 2 * MiB) == a + b
""",
        {"second-sees-first": True, "first-sees-second": True},
        id="multi-conn-sees-completed-writes",
    ),
    pytest.param(
        """
c = connect("disk")
blocks = {i: bytes([i + 1]) * 4096 for i in range(64)}
offsets = {i: (i * 7 % 64) * 65536 for i in range(64)}  # out of order on purpose
cookies = [c.aio_pwrite(blocks[i], offsets[i]) for i in range(64)]
while c.aio_in_flight() > 0:
    c.poll(-1)
out["writes-ok"] = all(c.aio_command_completed(k) for k in cookies)
bufs = {i: nbd.Buffer(4096) for i in range(64)}
cookies = [c.aio_pread(bufs[i], offsets[i]) for i in range(64)]
while c.aio_in_flight() > 0:
    c.poll(-1)
out["reads-ok"] = all(c.aio_command_completed(k) for k in cookies)
out["all-match"] = all(bufs[i].to_bytearray() == blocks[i] for i in range(64))
""",
        {"writes-ok": True, "reads-ok": True, "all-match": True},
        id="pipelined-64-in-flight",
    ),
    pytest.param(
        """
c = connect("small")
c.pwrite(b"\\x01" * 512, 0)
c.shutdown()
out["closed"] = c.aio_is_closed()
out["reconnect-reads"] = connect("small").pread(512, 0) == b"\\x01" * 512
""",
        {"closed": True, "reconnect-reads": True},
        id="clean-disconnect-then-reconnect",
    ),
]


def run_nbdsh(target: NbdTarget, script: str) -> dict[str, Any]:
    env = debian_python_env(
        {
            "NBD_TEST_URIS": json.dumps({name: target.uri(name) for name in target.exports}),
            "NBD_TEST_NAMES": json.dumps({n: target.export_name(n) for n in target.exports}),
            "NBD_TEST_SERVER_URI": target.server_uri(),
        }
    )
    body = (
        PRELUDE + f"RO_SEED_BYTE, RO_SEED_LEN = {RO_SEED_BYTE}, {RO_SEED_LEN}\n" + script + EPILOGUE
    )
    p = run(["nbdsh", "-n", "-c", body], env=env, timeout=120)
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("script", "expected"), CASES)
def test_nbdsh(target: NbdTarget, script: str, expected: dict[str, Any]) -> None:
    listed = sorted([name, spec.description] for name, spec in target.listed.items())
    expected = {k: listed if v == LISTED else v for k, v in expected.items()}
    assert run_nbdsh(target, script) == expected
