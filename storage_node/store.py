"""SQLite metadata of a storage node: the catalogue of images it owns.

Owns the schema (versioned migrations in MIGRATIONS, applied in order, tracked with
PRAGMA user_version) and short transactions on it. WAL mode, one connection, used from one
thread at a time; the event loop never calls it directly (startup runs before serving).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: images this node created under its data directory.
    """
    CREATE TABLE images (
        name        TEXT PRIMARY KEY,
        path        TEXT NOT NULL,
        size        INTEGER NOT NULL CHECK (size > 0),
        readonly    INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL
    ) STRICT;
    """,
]


@dataclass(frozen=True)
class ImageRow:
    name: str
    path: str
    size: int
    readonly: bool
    description: str


class Store:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"metadata schema {version} is newer than this program ({len(MIGRATIONS)})"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, sql.split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def images(self) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT name, path, size, readonly, description FROM images ORDER BY name"
        )
        return [ImageRow(n, p, s, bool(r), d) for n, p, s, r, d in rows]

    def image(self, name: str) -> ImageRow | None:
        row = self.db.execute(
            "SELECT name, path, size, readonly, description FROM images WHERE name = ?", (name,)
        ).fetchone()
        return ImageRow(row[0], row[1], row[2], bool(row[3]), row[4]) if row else None

    def add_image(self, row: ImageRow) -> None:
        self.db.execute(
            "INSERT INTO images (name, path, size, readonly, description, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row.name, row.path, row.size, int(row.readonly), row.description, time.time()),
        )

    def close(self) -> None:
        self.db.close()
