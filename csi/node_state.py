"""What the node plugin has staged, kept on disk so a restarted plugin can take it back.

Owns one JSON file per staged volume under `STATE_DIR/volumes/`, named by a hash of the volume
id. A record holds the publish_context (with the export's credential: files are 0600 in a 0700
directory, and the credential never leaves them except towards the storage node), the staging
path, the volume's access type, filesystem and mount flags, the device once attached, and for
an encrypted volume its device-mapper device once opened (never a key: those come with each
NodeStage).
Writes are atomic (temporary file, fsync, rename, fsync of the directory): after a crash a
record is either the old one or the new one. Blocking: callers run it in an executor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("csi.node_state")

VERSION = 1


@dataclass
class StagedVolume:
    volume_id: str
    staging_path: str
    block: bool  # volumeMode Block (else a filesystem mounted at staging_path)
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    readonly: bool = False
    single_writer: bool = False  # staged SINGLE_NODE_SINGLE_WRITER: one publication at most
    context: dict[str, str] = field(default_factory=dict, repr=False)
    device: str = ""  # /dev/nbdX once attached
    index: int = -1
    encrypted: bool = False  # LUKS2 on the device (csi/luks.py); the key is never recorded
    mapper: str = ""  # /dev/dm-N once opened: what is mounted or published

    @property
    def volume_device(self) -> str:
        """The device that holds the volume's data: the plaintext mapping of an encrypted
        volume, else the NBD device."""
        return self.mapper if self.encrypted else self.device

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StagedVolume:
        data: dict[str, Any] = json.loads(text)
        if data.pop("version", None) != VERSION:
            raise ValueError("unknown record version")
        return cls(**data)


class StateStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "volumes"

    def ensure(self) -> None:
        """STATE_DIR and STATE_DIR/volumes, 0700: the records hold attachment credentials."""
        for d in (self.dir.parent, self.dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def _path(self, volume_id: str) -> Path:
        return self.dir / (hashlib.sha256(volume_id.encode()).hexdigest()[:32] + ".json")

    def get(self, volume_id: str) -> StagedVolume | None:
        try:
            record = StagedVolume.from_json(self._path(volume_id).read_text())
        except FileNotFoundError:
            return None
        return record if record.volume_id == volume_id else None

    def put(self, record: StagedVolume) -> None:
        self.ensure()
        path = self._path(record.volume_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, record.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_dir()

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(volume_id).unlink()
            self._sync_dir()

    def all(self) -> list[StagedVolume]:
        records = []
        try:
            paths = sorted(self.dir.glob("*.json"))
        except FileNotFoundError:
            return []
        for path in paths:
            try:
                records.append(StagedVolume.from_json(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable state file %s: %s", path.name, exc)
        return records

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
