"""SQLite metadata of a storage node.

Owns the schema (versioned migrations in MIGRATIONS, applied in order, tracked with
PRAGMA user_version) and short transactions on it. WAL mode, synchronous=FULL, one connection.
Every call runs on the one thread that `StoreThread` owns; the event loop never touches the
database, and no transaction spans an await.

Rows are the source of truth for what exists; files under the data directory follow them
(see storage_node.volumes for the order of steps that keeps the two consistent across crashes).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ResourceExhausted

T = TypeVar("T")

# Tables whose rows stand for image files: a catalogue without any is "empty".
_OBJECT_TABLES = ("exports", "volumes", "snapshots", "golden_images")

MIGRATIONS: list[str] = [
    # 1: exports created from the command line (--export name=...,size=...).
    """
    CREATE TABLE exports (
        name        TEXT PRIMARY KEY,
        path        TEXT NOT NULL,
        size        INTEGER NOT NULL CHECK (size > 0),
        readonly    INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL
    ) STRICT
    """,
    # 2: the management API's objects.
    """
    CREATE TABLE volumes (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        tenant      TEXT NOT NULL,
        size        INTEGER NOT NULL CHECK (size > 0),
        state       TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting', 'failed')),
        source_kind TEXT NOT NULL DEFAULT '',
        source_id   TEXT NOT NULL DEFAULT '',
        qos_iops    INTEGER NOT NULL DEFAULT 0,
        qos_bps     INTEGER NOT NULL DEFAULT 0,
        labels      TEXT NOT NULL DEFAULT '{}',
        created_at  REAL NOT NULL,
        error       TEXT NOT NULL DEFAULT '',
        path        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX volumes_by_tenant ON volumes (tenant, id);
    CREATE TABLE snapshots (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        volume_id   TEXT NOT NULL,
        tenant      TEXT NOT NULL,
        size        INTEGER NOT NULL CHECK (size > 0),
        ready       INTEGER NOT NULL DEFAULT 0,
        deleting    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        path        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX snapshots_by_tenant ON snapshots (tenant, id);
    CREATE TABLE golden_images (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        size        INTEGER NOT NULL DEFAULT 0,
        ready       INTEGER NOT NULL DEFAULT 0,
        deleting    INTEGER NOT NULL DEFAULT 0,
        source_path TEXT NOT NULL,
        format      TEXT NOT NULL,
        error       TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        path        TEXT NOT NULL
    ) STRICT;
    CREATE TABLE attachments (
        volume_id    TEXT NOT NULL REFERENCES volumes (id),
        node_id      TEXT NOT NULL,
        node_address TEXT NOT NULL,
        readonly     INTEGER NOT NULL,
        multi_node   INTEGER NOT NULL,
        export_name  TEXT NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        PRIMARY KEY (volume_id, node_id)
    ) STRICT;
    CREATE TABLE tenant_limits (
        tenant         TEXT PRIMARY KEY,
        capacity_bytes INTEGER NOT NULL DEFAULT 0,
        volumes        INTEGER NOT NULL DEFAULT 0,
        snapshots      INTEGER NOT NULL DEFAULT 0,
        qos_iops       INTEGER NOT NULL DEFAULT 0,
        qos_bps        INTEGER NOT NULL DEFAULT 0
    ) STRICT
    """,
    # 3: group snapshots (storage_node.groups): a member snapshot names its group.
    """
    ALTER TABLE snapshots ADD COLUMN group_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX snapshots_by_group ON snapshots (group_id) WHERE group_id != ''
    """,
    # 4: zero detection, on unless the volume was created with it off (docs/storage-node.md).
    """
    ALTER TABLE volumes ADD COLUMN zero_detection INTEGER NOT NULL DEFAULT 1
    """,
]


@dataclass(frozen=True)
class ExportRow:
    name: str
    path: str
    size: int
    readonly: bool
    description: str


@dataclass(frozen=True)
class VolumeRow:
    id: str
    name: str
    tenant: str
    size: int
    state: str
    path: str
    source_kind: str = ""
    source_id: str = ""
    qos_iops: int = 0
    qos_bps: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    error: str = ""
    zero_detection: bool = True


@dataclass(frozen=True)
class SnapshotRow:
    id: str
    name: str
    volume_id: str
    tenant: str
    size: int
    path: str
    ready: bool = False
    deleting: bool = False
    created_at: float = 0.0
    group_id: str = ""  # the group snapshot it is a member of (storage_node.groups)


@dataclass(frozen=True)
class GoldenImageRow:
    id: str
    name: str
    source_path: str
    format: str
    path: str
    size: int = 0
    ready: bool = False
    deleting: bool = False
    error: str = ""
    created_at: float = 0.0


@dataclass(frozen=True)
class AttachmentRow:
    volume_id: str
    node_id: str
    node_address: str
    readonly: bool
    multi_node: bool
    export_name: str
    created_at: float = 0.0


@dataclass(frozen=True)
class TenantLimits:
    capacity_bytes: int = 0
    volumes: int = 0
    snapshots: int = 0
    qos_iops: int = 0
    qos_bps: int = 0


@dataclass(frozen=True)
class TenantUsage:
    provisioned_bytes: int = 0
    volumes: int = 0
    snapshots: int = 0


_VOLUME_COLUMNS = (
    "id, name, tenant, size, state, path, source_kind, source_id, qos_iops, qos_bps, labels, "
    "created_at, error, zero_detection"
)
_SNAPSHOT_COLUMNS = "id, name, volume_id, tenant, size, path, ready, deleting, created_at, group_id"
_IMAGE_COLUMNS = "id, name, source_path, format, path, size, ready, deleting, error, created_at"
_ATTACHMENT_COLUMNS = (
    "volume_id, node_id, node_address, readonly, multi_node, export_name, created_at"
)


def _volume(row: tuple[Any, ...]) -> VolumeRow:
    values = list(row)
    values[10] = json.loads(values[10])
    values[13] = bool(values[13])
    return VolumeRow(*values)


def _snapshot(row: tuple[Any, ...]) -> SnapshotRow:
    v = list(row)
    v[6], v[7] = bool(v[6]), bool(v[7])
    return SnapshotRow(*v)


def _image(row: tuple[Any, ...]) -> GoldenImageRow:
    v = list(row)
    v[6], v[7] = bool(v[6]), bool(v[7])
    return GoldenImageRow(*v)


def _attachment(row: tuple[Any, ...]) -> AttachmentRow:
    v = list(row)
    v[3], v[4] = bool(v[3]), bool(v[4])
    return AttachmentRow(*v)


class Store:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"metadata schema {version} is newer than this program ({len(MIGRATIONS)})"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.tx():
                for statement in filter(str.strip, sql.split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One short write transaction; BEGIN IMMEDIATE so checks and writes are atomic."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL, say): ROLLBACK would then
            # fail and hide the error that matters.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    # -- command-line exports ---------------------------------------------------------------

    def exports(self) -> list[ExportRow]:
        rows = self.db.execute(
            "SELECT name, path, size, readonly, description FROM exports ORDER BY name"
        )
        return [ExportRow(n, p, s, bool(r), d) for n, p, s, r, d in rows]

    def export(self, name: str) -> ExportRow | None:
        return next((e for e in self.exports() if e.name == name), None)

    def add_export(self, row: ExportRow) -> None:
        self.db.execute(
            "INSERT INTO exports (name, path, size, readonly, description, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row.name, row.path, row.size, int(row.readonly), row.description, time.time()),
        )

    # -- volumes -------------------------------------------------------------------------------

    def volume(self, volume_id: str) -> VolumeRow | None:
        row = self.db.execute(
            f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE id = ?", (volume_id,)
        ).fetchone()
        return _volume(row) if row else None

    def volume_by_name(self, name: str) -> VolumeRow | None:
        row = self.db.execute(
            f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE name = ?", (name,)
        ).fetchone()
        return _volume(row) if row else None

    def volumes(self, tenant: str = "", after: str = "", limit: int = -1) -> list[VolumeRow]:
        query = f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE id > ?"
        args: list[Any] = [after]
        if tenant:
            query += " AND tenant = ?"
            args.append(tenant)
        rows = self.db.execute(query + " ORDER BY id LIMIT ?", (*args, limit))
        return [_volume(r) for r in rows]

    def insert_volume(self, v: VolumeRow) -> None:
        self.db.execute(
            f"INSERT INTO volumes ({_VOLUME_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                v.id,
                v.name,
                v.tenant,
                v.size,
                v.state,
                v.path,
                v.source_kind,
                v.source_id,
                v.qos_iops,
                v.qos_bps,
                json.dumps(v.labels, sort_keys=True),
                v.created_at,
                v.error,
                int(v.zero_detection),
            ),
        )

    def set_volume(self, volume_id: str, **changes: Any) -> None:
        allowed = {"state", "error", "size", "qos_iops", "qos_bps"}
        assert set(changes) <= allowed, changes
        assignments = ", ".join(f"{k} = ?" for k in changes)
        self.db.execute(
            f"UPDATE volumes SET {assignments} WHERE id = ?", (*changes.values(), volume_id)
        )

    def volumes_filling_from(self, kind: str, source_id: str) -> list[str]:
        """Ids of volumes still being filled (state creating) from this source."""
        rows = self.db.execute(
            "SELECT id FROM volumes WHERE state = 'creating' AND source_kind = ? "
            "AND source_id = ? ORDER BY id",
            (kind, source_id),
        )
        return [r[0] for r in rows]

    def source_deleting(self, kind: str, source_id: str) -> bool:
        """True when the snapshot or image is gone or being deleted."""
        table = {"snapshot": "snapshots", "image": "golden_images"}[kind]
        row = self.db.execute(f"SELECT deleting FROM {table} WHERE id = ?", (source_id,)).fetchone()
        return row is None or bool(row[0])

    def delete_volume(self, volume_id: str) -> None:
        self.db.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, snapshot_id: str) -> SnapshotRow | None:
        row = self.db.execute(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)
        ).fetchone()
        return _snapshot(row) if row else None

    def snapshot_by_name(self, name: str) -> SnapshotRow | None:
        row = self.db.execute(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE name = ?", (name,)
        ).fetchone()
        return _snapshot(row) if row else None

    def snapshots(
        self,
        tenant: str = "",
        volume_id: str = "",
        after: str = "",
        limit: int = -1,
        group_id: str = "",
    ) -> list[SnapshotRow]:
        query = f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE id > ?"
        args: list[Any] = [after]
        if tenant:
            query += " AND tenant = ?"
            args.append(tenant)
        if volume_id:
            query += " AND volume_id = ?"
            args.append(volume_id)
        if group_id:
            query += " AND group_id = ?"
            args.append(group_id)
        rows = self.db.execute(query + " ORDER BY id LIMIT ?", (*args, limit))
        return [_snapshot(r) for r in rows]

    def insert_snapshot(self, s: SnapshotRow) -> None:
        self.db.execute(
            f"INSERT INTO snapshots ({_SNAPSHOT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                s.id,
                s.name,
                s.volume_id,
                s.tenant,
                s.size,
                s.path,
                int(s.ready),
                int(s.deleting),
                s.created_at,
                s.group_id,
            ),
        )

    def set_snapshot(self, snapshot_id: str, **changes: Any) -> None:
        assert set(changes) <= {"ready", "deleting"}, changes
        assignments = ", ".join(f"{k} = ?" for k in changes)
        values = [int(v) for v in changes.values()]
        self.db.execute(f"UPDATE snapshots SET {assignments} WHERE id = ?", (*values, snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    # -- golden images -------------------------------------------------------------------------

    def image(self, image_id: str) -> GoldenImageRow | None:
        row = self.db.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM golden_images WHERE id = ?", (image_id,)
        ).fetchone()
        return _image(row) if row else None

    def image_by_name(self, name: str) -> GoldenImageRow | None:
        row = self.db.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM golden_images WHERE name = ?", (name,)
        ).fetchone()
        return _image(row) if row else None

    def images(self) -> list[GoldenImageRow]:
        rows = self.db.execute(f"SELECT {_IMAGE_COLUMNS} FROM golden_images ORDER BY id")
        return [_image(r) for r in rows]

    def insert_image(self, i: GoldenImageRow) -> None:
        self.db.execute(
            f"INSERT INTO golden_images ({_IMAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                i.id,
                i.name,
                i.source_path,
                i.format,
                i.path,
                i.size,
                int(i.ready),
                int(i.deleting),
                i.error,
                i.created_at,
            ),
        )

    def set_image(self, image_id: str, **changes: Any) -> None:
        assert set(changes) <= {"ready", "deleting", "size", "error"}, changes
        assignments = ", ".join(f"{k} = ?" for k in changes)
        values = [int(v) if isinstance(v, bool) else v for v in changes.values()]
        self.db.execute(f"UPDATE golden_images SET {assignments} WHERE id = ?", (*values, image_id))

    def delete_image(self, image_id: str) -> None:
        self.db.execute("DELETE FROM golden_images WHERE id = ?", (image_id,))

    # -- attachments ---------------------------------------------------------------------------

    def attachments(self, volume_id: str = "") -> list[AttachmentRow]:
        if volume_id:
            rows = self.db.execute(
                f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE volume_id = ? "
                "ORDER BY created_at",
                (volume_id,),
            )
        else:
            rows = self.db.execute(
                f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments ORDER BY volume_id, created_at"
            )
        return [_attachment(r) for r in rows]

    def insert_attachment(self, a: AttachmentRow) -> None:
        self.db.execute(
            f"INSERT INTO attachments ({_ATTACHMENT_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
            (
                a.volume_id,
                a.node_id,
                a.node_address,
                int(a.readonly),
                int(a.multi_node),
                a.export_name,
                a.created_at,
            ),
        )

    def delete_attachment(self, volume_id: str, node_id: str) -> None:
        self.db.execute(
            "DELETE FROM attachments WHERE volume_id = ? AND node_id = ?", (volume_id, node_id)
        )

    # -- tenants -------------------------------------------------------------------------------

    def tenant_limits(self, tenant: str) -> TenantLimits:
        row = self.db.execute(
            "SELECT capacity_bytes, volumes, snapshots, qos_iops, qos_bps FROM tenant_limits "
            "WHERE tenant = ?",
            (tenant,),
        ).fetchone()
        return TenantLimits(*row) if row else TenantLimits()

    def set_tenant_limits(self, tenant: str, limits: TenantLimits) -> None:
        self.db.execute(
            "INSERT INTO tenant_limits (tenant, capacity_bytes, volumes, snapshots, qos_iops, "
            "qos_bps) VALUES (?,?,?,?,?,?) ON CONFLICT (tenant) DO UPDATE SET "
            "capacity_bytes = excluded.capacity_bytes, volumes = excluded.volumes, "
            "snapshots = excluded.snapshots, qos_iops = excluded.qos_iops, "
            "qos_bps = excluded.qos_bps",
            (
                tenant,
                limits.capacity_bytes,
                limits.volumes,
                limits.snapshots,
                limits.qos_iops,
                limits.qos_bps,
            ),
        )

    def tenant_usage(self, tenant: str) -> TenantUsage:
        vol_bytes, vol_count = self.db.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM volumes WHERE tenant = ?", (tenant,)
        ).fetchone()
        snap_bytes, snap_count = self.db.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM snapshots WHERE tenant = ?", (tenant,)
        ).fetchone()
        return TenantUsage(vol_bytes + snap_bytes, vol_count, snap_count)

    def tenants(self) -> list[str]:
        rows = self.db.execute(
            "SELECT tenant FROM volumes UNION SELECT tenant FROM snapshots "
            "UNION SELECT tenant FROM tenant_limits ORDER BY 1"
        )
        return [r[0] for r in rows]

    def provisioned_bytes(self) -> int:
        total = 0
        for table in ("volumes", "snapshots", "golden_images"):
            total += self.db.execute(f"SELECT COALESCE(SUM(size), 0) FROM {table}").fetchone()[0]
        return int(total)


@dataclass(frozen=True)
class CatalogueProblem:
    kind: str  # "missing", "empty" or "damaged"
    text: str  # for the operator: "is missing", "is damaged (...)"


def catalogue_problem(path: Path) -> CatalogueProblem | None:
    """What is wrong with the catalogue at `path`: None when it opens, passes SQLite's
    quick_check and has at least one object row. Never creates or migrates it."""
    if not path.exists():
        return CatalogueProblem("missing", "is missing")
    if path.stat().st_size == 0:
        return CatalogueProblem("empty", "is empty (0 bytes)")
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        return CatalogueProblem("damaged", f"cannot be opened ({exc})")
    try:
        check = [r[0] for r in db.execute("PRAGMA quick_check(1)")]
        if check != ["ok"]:
            words = " ".join(" ".join(check).split())  # one line, however SQLite puts it
            words = words if len(words) < 200 else words[:200] + "..."
            return CatalogueProblem("damaged", f"is damaged (SQLite quick_check: {words})")
        if int(db.execute("PRAGMA user_version").fetchone()[0]) == 0:
            return CatalogueProblem("empty", "is empty (no schema)")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = sum(
            db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in _OBJECT_TABLES
            if t in tables
        )
        if rows == 0:
            return CatalogueProblem("empty", "is empty (no export, volume, snapshot or image)")
        return None
    except sqlite3.OperationalError as exc:  # unreadable: permissions, I/O errors, locks
        return CatalogueProblem("damaged", f"cannot be read ({exc})")
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        return CatalogueProblem("damaged", f"is damaged ({exc})")
    finally:
        db.close()


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the filesystem (or a quota) has no room for the database to grow."""
    return (
        isinstance(exc, sqlite3.OperationalError)
        and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    )


class StoreThread:
    """Runs every Store call on one dedicated thread, for code on the event loop. A full
    filesystem is RESOURCE_EXHAUSTED naming the node (and the catalogue) for the caller."""

    def __init__(self, store: Store, node_id: str = "", path: Path | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")

    async def run(self, fn: Callable[[Store], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, self.store)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            name = self.path.name if self.path else "the catalogue"
            raise ResourceExhausted(
                f"storage node {self.node_id!r}: disk full: the filesystem of its data "
                f"directory has no room to write {name} ({exc}); nothing was changed, "
                "retry when space is freed"
            ) from exc

    def close(self) -> None:
        self._executor.submit(self.store.close).result()
        self._executor.shutdown()
