"""The host's side of the VM tests that run the real node plugin in a guest (and of
bench/luks_bench.py): volumes published for the guest, the command that runs a guest script
under the host's Python, and the guest's RESULT lines.

Attachments are made the way the controller makes them: CreateVolume then Publish to
127.0.0.1 (the guest's connections reach the storage node through QEMU's guestfwd, from
127.0.0.1); the guest finds them in a publish_context naming the forwarded address.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from csi.attach import CTX_EXPORT, CTX_HOST, CTX_PORT, CTX_READONLY
from tests.support.api import ApiNode
from tests.vm.guest import GUEST_NBD_ADDR, GUEST_NBD_PORT, GuestResult

REPO = Path(__file__).resolve().parents[2]
# Requests in flight when a connection breaks are sent again after this many seconds: it
# bounds the longest I/O the VM sees across a storage node restart (docs/csi-node.md).
IO_TIMEOUT = 4


def attachment(storage: ApiNode, name: str, size: int) -> dict[str, object]:
    """What ControllerPublishVolume will put in publish_context, seen from the guest."""
    api = storage.api
    volume = api.wait_volume(api.create_volume(name, size).id)
    att = api.publish(volume.id, "vm-node", "127.0.0.1")
    assert att.nbd_port == storage.nbd_port
    return {
        "id": f"storage-vm:{volume.id}",
        "backend": volume.id,
        "size": size,
        "uri": att.uri,
        "context": {
            CTX_HOST: GUEST_NBD_ADDR,
            CTX_PORT: str(GUEST_NBD_PORT),
            CTX_EXPORT: att.export_name,
            CTX_READONLY: "false",
        },
    }


def guest_python(script: str, spec: object) -> str:
    """The shell a host-root guest runs: `script` (a path in the repository) under the host's
    Python, with the repository on PYTHONPATH and `spec` as its one JSON argument."""
    return (
        f"cd {shlex.quote(str(REPO))}\n"
        f"export PYTHONPATH={shlex.quote(str(REPO))} PYTHONDONTWRITEBYTECODE=1\n"
        f"exec {shlex.quote(sys.executable)} -u {script} {shlex.quote(json.dumps(spec))}\n"
    )


def results(result: GuestResult) -> dict[str, str]:
    """The guest's `RESULT KEY [VALUE]` lines as {KEY: VALUE} (VALUE may be empty)."""
    found: dict[str, str] = {}
    for m in re.finditer(r"^RESULT (\S+) ?(.*?)\s*$", result.output, re.MULTILINE):
        found[m.group(1)] = m.group(2)
    return found
