"""Encrypted volumes on the node, the parts this host can run (its kernel has no dm-crypt):
key derivation (RFC 5869 vectors), the node-stage secret's validation, keys on pipes, the
blank-device check, cryptsetup's header work on an image file (format, label, rotation's
add-key and remove-key, checked with `cryptsetup open --test-passphrase`), and NodeStage's
refusals through the real Node service: no key, a bad key, a volume that holds data.

Opening the mapping, writing through it, the ciphertext on the storage node, restarts,
expansion and unstage run in the qemu-system guest: tests/vm/test_node_plugin_luks.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from csi import luks
from csi.mounts import Runner, spawn_and_wait
from csi.v1 import csi_pb2 as pb
from tests.support.api import ApiNode

from .node_harness import NodeHarness, attach_volume
from .test_node_service import (  # noqa: F401
    _missing,
    block_cap,
    export_bytes,
    harness,
    mount_cap,
    unstage,
)

MiB = 1024 * 1024
MASTER = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(100, 140))).decode()


def _cryptsetup() -> str | None:
    return shutil.which("cryptsetup") or shutil.which("cryptsetup", path="/usr/sbin:/sbin")


needs_cryptsetup = pytest.mark.skipif(_cryptsetup() is None, reason="cryptsetup-bin missing")
needs_node = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# -- key derivation ---------------------------------------------------------------------------


def test_hkdf_sha256_matches_rfc5869_test_vectors() -> None:
    # RFC 5869, appendix A.1 (basic) and A.3 (no salt, no info).
    okm = luks.hkdf_sha256(bytes([0x0B] * 22), bytes(range(0x0D)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    okm = luks.hkdf_sha256(bytes([0x0B] * 22), b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_each_volume_gets_its_own_key_and_name() -> None:
    master = base64.b64decode(MASTER)
    ids = [luks.key_id(f"storage-a:{n}") for n in ("v1", "v2")]
    assert ids[0] != ids[1]
    assert all(i.startswith(luks.LABEL_PREFIX) and len(i.encode()) <= 47 for i in ids)
    assert "storage-a" not in ids[0], "the label carries a hash, not the volume id"
    keys = [luks.derive_key(master, i) for i in ids]
    assert keys[0] != keys[1] and all(len(k) == 32 for k in keys)
    assert luks.derive_key(master, ids[0]) == keys[0], "the same inputs, the same key"
    assert luks.derive_key(base64.b64decode(OTHER), ids[0]) != keys[0]
    names = {luks.mapper_name("storage-a:v1"), luks.mapper_name("storage-a:v2")}
    assert len(names) == 2 and all(n.startswith("nbdcsi-") and len(n) < 128 for n in names)


@pytest.mark.parametrize(
    ("secrets", "fragment"),
    [
        pytest.param({}, "no 'encryption-key'", id="missing"),
        pytest.param({"encryption-key": "not base64!"}, "is not base64", id="not-base64"),
        pytest.param(
            {"encryption-key": base64.b64encode(b"short" * 3).decode()}, "15 bytes", id="short"
        ),
        pytest.param(
            {"encryption-key": MASTER, "encryption-key-previous": "%%%"},
            "'encryption-key-previous' is not base64",
            id="bad-previous",
        ),
        pytest.param({"encryption-key": "A" * 2000}, "over 1024", id="huge"),
    ],
)
def test_bad_secrets_are_named_never_shown(secrets: dict[str, str], fragment: str) -> None:
    with pytest.raises(luks.SecretError) as info:
        luks.Keys.from_secrets(secrets)
    assert fragment in str(info.value)
    for value in secrets.values():
        assert value not in str(info.value)


def test_keys_stay_out_of_repr_and_a_repeated_previous_is_dropped() -> None:
    keys = luks.Keys.from_secrets({"encryption-key": MASTER, "encryption-key-previous": OTHER})
    assert keys.previous == base64.b64decode(OTHER)
    assert base64.b64decode(MASTER).hex() not in repr(keys) and "current" not in repr(keys)
    same = luks.Keys.from_secrets({"encryption-key": MASTER, "encryption-key-previous": MASTER})
    assert same.previous is None


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), (None, False)])
def test_volume_context_flag(value: str | None, expected: bool) -> None:
    context = {} if value is None else {luks.CTX_ENCRYPTED: value}
    assert luks.volume_encrypted(context) is expected
    with pytest.raises(ValueError):
        luks.volume_encrypted({luks.CTX_ENCRYPTED: "yes"})


# -- pipes and blank devices ------------------------------------------------------------------


def test_keys_reach_the_child_on_pipes_only(tmp_path: Path) -> None:
    script = (
        'printf "%s|" "$@"; cat; printf "|"; cat <&3; '
        'printf "|%s" "$(tr "\\0" " " < /proc/$$/environ)"'
    )
    code, out = spawn_and_wait(["sh", "-c", script, "sh", "arg"], b"KEY-ON-STDIN", b"KEY-ON-FD3")
    assert code == 0
    argv, stdin, fd3, environ = out.split("|", 3)
    assert (argv, stdin, fd3) == ("arg", "KEY-ON-STDIN", "KEY-ON-FD3")
    assert "KEY-ON" not in environ
    # A child that never reads its key still ends and reports its exit code.
    assert spawn_and_wait(["sh", "-c", "exit 7"], b"x" * 64, b"y" * 64) == (7, "")


def test_blank_means_both_ends_zero(tmp_path: Path) -> None:
    image = tmp_path / "disk"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    assert luks.is_blank(str(image))
    for offset in (0, MiB - 1, 8 * MiB - 1, 7 * MiB):
        with open(image, "r+b") as f:
            f.truncate(0)
            f.truncate(8 * MiB)
            f.seek(offset)
            f.write(b"\x01")
        assert not luks.is_blank(str(image)), offset
    small = tmp_path / "small"
    small.write_bytes(bytes(4096))
    assert luks.is_blank(str(small))


# -- cryptsetup on an image file ---------------------------------------------------------------


class RecordingRunner(Runner):
    """The real Runner, also keeping every argv (to show no key is ever in one)."""

    def __init__(self) -> None:
        super().__init__(workers=2)
        self.argvs: list[Sequence[str]] = []

    async def run(self, *argv: str, **kw):
        self.argvs.append(argv)
        return await super().run(*argv, **kw)


def _opens(image: Path, key: bytes) -> bool:
    code, _ = spawn_and_wait(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(image)], key
    )
    assert code in (0, 2)
    return code == 0


@pytest.fixture
def runner() -> Iterator[RecordingRunner]:
    r = RecordingRunner()
    yield r
    r.close()


@needs_cryptsetup
def test_format_label_and_rotation_on_an_image(tmp_path: Path, runner: RecordingRunner) -> None:
    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    crypt = luks.Crypt(runner)
    old_master, new_master = base64.b64decode(MASTER), base64.b64decode(OTHER)
    kid = luks.key_id("storage-a:vol")
    old, new = luks.derive_key(old_master, kid), luks.derive_key(new_master, kid)

    async def scenario() -> None:
        assert not await crypt.is_luks(str(image))
        await crypt.format(str(image), old, kid)
        assert await crypt.is_luks(str(image))
        assert await crypt.label(str(image)) == kid
        await crypt.add_key(str(image), old, new)
        assert await crypt.remove_key(str(image), old)
        assert not await crypt.remove_key(str(image), old), "no slot left for the old key"

    asyncio.run(scenario())
    assert _opens(image, new) and not _opens(image, old)
    header = image.read_bytes()[: luks.HEADER_BYTES]
    assert kid.encode() in header, "the label is the key id, in the clear"
    assert header[:6] == b"LUKS\xba\xbe"
    data = image.read_bytes()[luks.HEADER_BYTES :]
    assert data.count(0) == len(data), "luksFormat leaves the data area alone"
    secrets = [k.hex() for k in (old, new, old_master, new_master)] + [MASTER, OTHER]
    for argv in runner.argvs:
        joined = " ".join(argv)
        assert not any(s in joined for s in secrets)
        assert all(o not in joined for o in (old.decode(errors="replace"),))


# -- NodeStage's refusals, through the Node service ----------------------------------------------


def _stage(
    h: NodeHarness, vol, path: Path, cap: pb.VolumeCapability, secrets: dict[str, str], ctx=None
) -> None:
    h.stub.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            publish_context=vol.context,
            staging_target_path=str(path),
            volume_capability=cap,
            volume_context=ctx if ctx is not None else {luks.CTX_ENCRYPTED: "true"},
            secrets=secrets,
        )
    )


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@needs_node
def test_encrypted_stage_without_a_usable_key_is_invalid(
    harness: NodeHarness,  # noqa: F811
    storage_node: ApiNode,
    tmp_path: Path,
) -> None:
    vol = attach_volume(storage_node, "luks-no-key", 16 * MiB)
    bad = "x" * 40
    for secrets in ({}, {"encryption-key": bad}):
        err = _error(lambda s=secrets: _stage(harness, vol, tmp_path / "s", block_cap(), s))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert bad not in (err.details() or "")
    err = _error(
        lambda: _stage(harness, vol, tmp_path / "s", block_cap(), {}, {luks.CTX_ENCRYPTED: "maybe"})
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.metric("nbdcsi_node_attached_devices") in (None, 0), "refused before attach"


@needs_node
@needs_cryptsetup
def test_volume_with_data_is_never_formatted_for_encryption(
    harness: NodeHarness,  # noqa: F811
    storage_node: ApiNode,
    tmp_path: Path,
) -> None:
    vol = attach_volume(storage_node, "luks-has-data", 16 * MiB)
    # Plain first, as a VM would leave it: data in the last MiB only (nothing blkid knows).
    harness.stub.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            publish_context=vol.context,
            staging_target_path=str(tmp_path / "plain"),
            volume_capability=block_cap(),
        )
    )
    record = harness.service.store.get(vol.volume_id)
    assert record is not None
    fd = os.open(record.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"VM data" * 100, 16 * MiB - 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    unstage(harness, vol, tmp_path / "plain")
    before = export_bytes(vol, 0, 16 * MiB)
    for cap in (block_cap(), mount_cap("ext4")):
        err = _error(
            lambda c=cap: _stage(harness, vol, tmp_path / "enc", c, {"encryption-key": MASTER})
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "holds data" in (err.details() or "")
        unstage(harness, vol, tmp_path / "enc")
    assert export_bytes(vol, 0, 16 * MiB) == before, "nothing written"


# -- a device in use through another node of it -----------------------------------------------


@needs_node
def test_a_bind_of_another_node_of_the_device_counts_as_a_holder(tmp_path: Path) -> None:
    """/dev/mapper/NAME (made by libdevmapper) and /dev/dm-N are two nodes of one device: a
    bind mount of either holds the device, whichever name NodeUnstage asks about."""
    import subprocess

    from csi.mounts import Mounter

    backing = tmp_path / "backing"
    backing.write_bytes(bytes(MiB))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    alias = Path(f"/dev/nbdcsi-test-alias-{os.getpid()}")
    target = tmp_path / "target"
    target.touch()
    mounter = Mounter()
    try:
        rdev = os.stat(loop).st_rdev
        os.mknod(alias, 0o600 | 0o060000, rdev)  # S_IFBLK
        subprocess.run(["mount", "--bind", str(alias), str(target)], check=True)
        holders = asyncio.run(mounter.holders(loop))
        assert holders == [f"bound onto {target}"], holders
    finally:
        subprocess.run(["umount", str(target)], check=False)
        alias.unlink(missing_ok=True)
        subprocess.run(["losetup", "-d", loop], check=False)
        mounter.close()
