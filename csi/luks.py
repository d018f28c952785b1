"""Encrypted volumes on the node: LUKS2 between the NBD device and whoever uses the volume.

Owns what an encrypted volume needs of the node plugin (design and reasons in
docs/csi-node.md, "Encrypted volumes", and docs/security.md): whether the volume context asks
for encryption (`volume_encrypted`), the master keys from the NodeStage secrets (`Keys`), the
per-volume key (HKDF-SHA256, RFC 5869, of the master key and the volume's key id, which is
the LUKS2 header's label), the device-mapper name of a volume, whether the first and last MiB
of a device are blank, and `Crypt`: cryptsetup's luksFormat, open, close, resize, and the
re-keying of a rotation, with every key handed over on a pipe (stdin, or a pipe on fd 3),
never in an argument, a file, a log line or an error message.

The storage node only ever holds the ciphertext and the LUKS2 header; keys exist on the node
that stages the volume, in the plugin's memory and in the kernel's dm-crypt table.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .mounts import CommandError, Runner

log = logging.getLogger("csi.luks")

# volume_context key the controller sets from the StorageClass's `encrypted` parameter.
CTX_ENCRYPTED = "nbd.csi.dev/encrypted"
# Keys of the node-stage Secret (csi.storage.k8s.io/node-stage-secret-name/namespace).
SECRET_KEY = "encryption-key"
SECRET_PREVIOUS = "encryption-key-previous"
MIN_MASTER_BYTES = 32
MAX_MASTER_CHARS = 1024
KEY_BYTES = 32  # the keyslot key: 256 bits of HKDF output
# Every key id (the LUKS2 label) this driver writes starts with it; v1: the derivation below.
LABEL_PREFIX = "nbd-csi:v1:"
HKDF_SALT = b"nbd.csi.dev luks2 keyslot key"
MAPPER_PREFIX = "nbdcsi-"
BLANK_PROBE = 1 << 20  # bytes at each end of a device that must be zero before a luksFormat

# cryptsetup's exit codes (cryptsetup(8), "RETURN CODES").
CRYPTSETUP_BAD_KEY = 2  # "no permission (bad passphrase)"
CRYPTSETUP_BAD_DEVICE = 4  # "wrong device specified": not LUKS, not active

# luksFormat: LUKS2, AES-XTS with two 256-bit keys, 512-byte sectors (what a VM's disk
# presents; 4096 would be faster but a guest's 512-byte I/O would then fail), a 2 MiB header
# (16 KiB metadata twice, room for eight keyslots) instead of the default 16 MiB, and PBKDF2
# with the minimum 1000 iterations: the keyslot key is 256 bits of HKDF output, not a
# passphrase, so a slow KDF would add nothing but latency (docs/security.md).
FORMAT_OPTIONS = (
    "--type=luks2",
    "--cipher=aes-xts-plain64",
    "--key-size=512",
    "--hash=sha256",
    "--sector-size=512",
    "--luks2-metadata-size=16k",
    "--luks2-keyslots-size=2016k",
    "--offset=4096",
)
SLOT_OPTIONS = ("--pbkdf=pbkdf2", "--pbkdf-force-iterations=1000", "--hash=sha256")
HEADER_BYTES = 4096 * 512  # what the header takes from the volume's capacity


class SecretError(ValueError):
    """The node-stage secrets lack a usable key (the message names the key, never a value)."""


def volume_encrypted(context: Mapping[str, str]) -> bool:
    """Whether the volume_context asks for LUKS2; ValueError for a value not true/false."""
    value = context.get(CTX_ENCRYPTED, "false")
    if value not in ("true", "false"):
        raise ValueError(f"volume_context {CTX_ENCRYPTED} {value!r} is not true or false")
    return value == "true"


def _master(secrets: Mapping[str, str], name: str) -> bytes:
    text = secrets[name].strip()
    if len(text) > MAX_MASTER_CHARS:
        raise SecretError(f"node-stage secret {name!r} is over {MAX_MASTER_CHARS} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"node-stage secret {name!r} is not base64") from None
    if len(raw) < MIN_MASTER_BYTES:
        raise SecretError(
            f"node-stage secret {name!r} decodes to {len(raw)} bytes, fewer than "
            f"{MIN_MASTER_BYTES} (make it with: openssl rand -base64 32)"
        )
    return raw


@dataclass(frozen=True)
class Keys:
    """The master keys of one NodeStage call; kept out of repr() so no log line shows them."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, str]) -> Keys:
        if SECRET_KEY not in secrets:
            raise SecretError(
                f"the volume is encrypted but the node-stage secrets have no {SECRET_KEY!r} "
                "(set csi.storage.k8s.io/node-stage-secret-name and -namespace on the "
                "StorageClass)"
            )
        current = _master(secrets, SECRET_KEY)
        previous = _master(secrets, SECRET_PREVIOUS) if secrets.get(SECRET_PREVIOUS) else None
        if previous is not None and hmac.compare_digest(previous, current):
            previous = None
        return cls(current, previous)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with HMAC-SHA256: extract, then expand to `length` bytes."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 gives at most 8160 bytes")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def key_id(volume_id: str) -> str:
    """The key id a new volume gets, written as its LUKS2 label (47 bytes at most): a hash of
    the volume id, so the label tells the storage node nothing it does not know."""
    return LABEL_PREFIX + hashlib.sha256(volume_id.encode()).hexdigest()[:32]


def derive_key(master: bytes, kid: str) -> bytes:
    """The keyslot key of the volume whose LUKS2 label is `kid`."""
    return hkdf_sha256(master, HKDF_SALT, kid.encode(), KEY_BYTES)


def mapper_name(volume_id: str) -> str:
    """The device-mapper name of a volume's plaintext device."""
    return MAPPER_PREFIX + hashlib.sha256(volume_id.encode()).hexdigest()[:32]


def is_blank(device: str, probe: int = BLANK_PROBE) -> bool:
    """The first and last `probe` bytes of the device are all zero (a never-written volume).
    Blocking: call it from a thread."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for offset in sorted({0, max(0, size - probe)}):
            want = min(probe, size - offset)
            got = 0
            while got < want:
                chunk = os.pread(fd, min(want - got, 1 << 20), offset + got)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return False
                got += len(chunk)
    finally:
        os.close(fd)
    return True


@dataclass(frozen=True)
class Mapped:
    """An active dm-crypt mapping: its device node and the devices under it (sysfs names)."""

    name: str
    dm: str  # dm-N
    slaves: tuple[str, ...]

    @property
    def path(self) -> str:
        """The node devtmpfs makes as the kernel adds the device: no udev, no libdevmapper
        node-making, nothing to wait for."""
        return f"/dev/{self.dm}"


def find_mapping(name: str, sysfs: Path = Path("/sys/block")) -> Mapped | None:
    """The active mapping called `name`, from sysfs (no udev needed). Blocking."""
    for dm in sorted(sysfs.glob("dm-*")):
        try:
            if (dm / "dm" / "name").read_text().strip() != name:
                continue
            slaves = tuple(sorted(p.name for p in (dm / "slaves").iterdir()))
        except FileNotFoundError:
            continue
        return Mapped(name, dm.name, slaves)
    return None


class Crypt:
    """cryptsetup, through the Node service's Runner (posix_spawn; keys on pipes)."""

    def __init__(self, runner: Runner, sysfs: Path = Path("/sys/block")) -> None:
        self.runner = runner
        self.sysfs = sysfs

    async def is_luks(self, device: str) -> bool:
        code, _ = await self.runner.run("cryptsetup", "isLuks", "--type=luks2", device, ok=(0, 1))
        return code == 0

    async def label(self, device: str) -> str:
        """The LUKS2 label (this driver's key id), "" without one."""
        _, out = await self.runner.run("cryptsetup", "luksDump", device)
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Label":
                value = value.strip()
                return "" if value == "(no label)" else value
        return ""

    async def format(self, device: str, key: bytes, kid: str) -> None:
        await self.runner.run(
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            *FORMAT_OPTIONS,
            *SLOT_OPTIONS,
            f"--label={kid}",
            "--key-file=-",
            device,
            stdin=key,
        )
        log.info("made a LUKS2 header on %s", device)

    async def open(self, device: str, name: str, key: bytes, readonly: bool) -> bool:
        """Open the mapping; False if the key opens no keyslot. `--disable-keyring`: the volume
        key goes into the dm-crypt table, so `resize` needs no key (NodeExpandVolume has no
        secrets) and no keyctl(2) is needed in a container."""
        argv = ["cryptsetup", "open", "--type=luks2", "--disable-keyring", "--key-file=-"]
        if readonly:
            argv.append("--readonly")
        code, _ = await self.runner.run(*argv, device, name, stdin=key, ok=(0, CRYPTSETUP_BAD_KEY))
        return code == 0

    async def add_key(self, device: str, existing: bytes, new: bytes) -> None:
        """A keyslot for `new`, unlocked by `existing` (stdin; the new key on fd 3)."""
        await self.runner.run(
            "cryptsetup",
            "luksAddKey",
            "--batch-mode",
            *SLOT_OPTIONS,
            "--key-file=-",
            device,
            "/proc/self/fd/3",
            stdin=existing,
            fd3=new,
        )

    async def remove_key(self, device: str, key: bytes) -> bool:
        """Remove the keyslot `key` opens; False if none does."""
        code, _ = await self.runner.run(
            "cryptsetup",
            "luksRemoveKey",
            "--batch-mode",
            "--key-file=-",
            device,
            stdin=key,
            ok=(0, CRYPTSETUP_BAD_KEY),
        )
        return code == 0

    async def mapping(self, name: str) -> Mapped | None:
        return await asyncio.get_running_loop().run_in_executor(
            None, find_mapping, name, self.sysfs
        )

    async def close(self, name: str) -> None:
        """Close the mapping; closed already is fine."""
        try:
            await self.runner.run("cryptsetup", "close", name)
        except CommandError as exc:
            if exc.code != CRYPTSETUP_BAD_DEVICE or await self.mapping(name) is not None:
                raise

    async def resize(self, name: str) -> None:
        """Grow the mapping to its device's size (no key: see `open`)."""
        await self.runner.run("cryptsetup", "resize", name)
