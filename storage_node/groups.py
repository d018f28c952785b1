"""Group snapshots on one storage node: several volumes' snapshots of one instant.

Owns this node's part of a group snapshot (docs/storage-node-api.md, "Group snapshots"). The
caller (the CSI controller) drives every node of the group through three steps, each on
every node before the next begins, so the volumes of the whole group are held at once:

  prepare  reserve the member rows (not ready, named by the group), start each member's live
           copy (files.LiveCopy) and copy while writes go on until one more pass would be
           short. Nothing is held.
  hold     catch each member up once more, then hold new requests on every member of the
           node and make the last catch-up under the hold: each copy is now the volume as it
           was when its hold began. Returns with the holds in place.
  commit   release the holds, make the copies durable, rename them into place, mark the
           rows ready.

Why one instant: a member's copy is its volume at the moment its hold began, and no member
is released before every member of every node is held. A write that depends on another (it
was sent after the other was acknowledged) cannot be in a copy without the write it depends
on: had it been sent after its volume's hold began it would still be waiting.

The lease: a prepared group not held within its lease, or a held group not committed within
its lease (counted from the moment its hold began), is discarded by the node itself: holds
released, copies and rows removed. So a caller that crashes can never leave volumes frozen,
and nothing half-made stays under a real name. A step after the lease fails
FAILED_PRECONDITION. In-memory state only: a node that restarts has no holds, and recovery
(VolumeService.recover) removes rows never marked ready.

Each member's volume is guarded (InFlight) from prepare until commit or discard: no other
snapshot, clone, expansion or deletion of it runs meanwhile (ABORTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import files
from .errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .store import SnapshotRow, Store, VolumeRow
from .volumes import COPY_MAPS, VolumeService, _new_id, check_id, check_name, human

log = logging.getLogger("storage_node.groups")

DEFAULT_LEASE = 10.0  # seconds, when the caller gives none
MAX_LEASE = 3600.0
MAX_MEMBERS = 64
KEEP_FINISHED = 256


@dataclass
class _Member:
    snap: SnapshotRow
    vol: VolumeRow
    copy: files.LiveCopy
    name: str  # of the change tracking (DataPlane.track)
    half: int = 0
    tracking: bool = False


@dataclass
class _Group:
    group_id: str
    members: list[_Member]
    state: str = "preparing"  # preparing, prepared, held, committed, discarded
    why: str = ""  # why it was discarded
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    guards: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    holds: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    lease: asyncio.TimerHandle | None = None
    held_at: float = 0.0
    held_seconds: float = 0.0


def check_lease(seconds: float) -> float:
    if seconds < 0 or seconds > MAX_LEASE or seconds != seconds:
        raise InvalidArgument(f"lease_seconds must be 0 to {MAX_LEASE:g}, got {seconds}")
    return seconds or DEFAULT_LEASE


class GroupSnapshots:
    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes
        self.groups: dict[str, _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the three steps -------------------------------------------------------------------

    async def prepare(
        self, group_id: str, members: list[tuple[str, str]], lease: float
    ) -> tuple[str, list[SnapshotRow]]:
        check_id(group_id, "grp")
        lease = check_lease(lease)
        if not members or len(members) > MAX_MEMBERS:
            raise InvalidArgument(f"a group has 1 to {MAX_MEMBERS} members, got {len(members)}")
        for name, volume_id in members:
            check_name(name, "member name")
            check_id(volume_id, "vol")
        if len({v for _, v in members}) < len(members):
            raise InvalidArgument("a volume is named twice in the group")
        if len({n for n, _ in members}) < len(members):
            raise InvalidArgument("two members have the same name")
        current = self.groups.get(group_id)
        if current is not None and current.state in ("discarded", "committed"):
            # A new attempt after a failed one; a committed group's rows answer below.
            del self.groups[group_id]
            current = None
        if current is not None:
            wanted = sorted(members)
            have = sorted((m.snap.name, m.vol.id) for m in current.members)
            if current.state == "prepared" and have == wanted:
                return current.state, [m.snap for m in current.members]  # a retried prepare
            raise Aborted(f"group snapshot {group_id} is {current.state} on this node; retry")
        # Registered before the first await: a concurrent prepare of the same group is ABORTED.
        self._forget_finished()
        group = _Group(group_id, [])
        self.groups[group_id] = group
        try:
            async with group.lock:
                existing = await self.volumes.store.run(lambda s: s.snapshots(group_id=group_id))
                if existing:
                    raise AlreadyExists(
                        f"group snapshot {group_id} already has {len(existing)} member(s) on "
                        "this node; delete it first"
                    )
                await self._prepare(group, members)
                group.state = "prepared"
                self._lease(group, lease, "it was not held within its lease")
        except BaseException as exc:
            await self._discard(group, f"preparing it failed: {exc}")
            raise
        return group.state, [m.snap for m in group.members]

    async def _prepare(self, group: _Group, members: list[tuple[str, str]]) -> None:
        service, store = self.volumes, self.volumes.store
        group.guards.enter_context(service.inflight.guard(*(v for _, v in members)))
        vols = [await service.get_volume(v) for _, v in members]
        for vol in vols:
            if vol.state != "ready":
                raise FailedPrecondition(f"volume {vol.id} is {vol.state}, not ready")
        tenants = {v.tenant for v in vols}
        if len(tenants) > 1:
            raise FailedPrecondition(
                f"the volumes of a group belong to one tenant; got {', '.join(sorted(tenants))}"
            )
        tenant = tenants.pop()
        now = time.time()
        rows = []
        for (name, _), vol in zip(members, vols, strict=True):
            sid = _new_id("snap")
            path = str(service.settings.snapshots_dir / f"{sid}.img")
            rows.append(
                SnapshotRow(
                    sid, name, vol.id, tenant, vol.size, path, False, False, now, group.group_id
                )
            )
        total = await service._total_bytes()
        size = sum(v.size for v in vols)

        def reserve(s: Store) -> None:
            with s.tx():
                for row in rows:
                    if s.snapshot_by_name(row.name) is not None:
                        raise AlreadyExists(f"a snapshot named {row.name!r} exists on this node")
                service._check_room(s, tenant, size, 0, len(rows), total)
                for row in rows:
                    s.insert_snapshot(row)

        await store.run(reserve)
        maps = service.settings.data_dir / COPY_MAPS
        for row, vol in zip(rows, vols, strict=True):
            name = f"{vol.id}.{secrets.token_hex(4)}"
            copy = await service._io(
                files.LiveCopy, Path(vol.path), Path(row.path), maps / f"{name}.map"
            )
            member = _Member(row, vol, copy, name)
            group.members.append(member)
        for m in group.members:
            await service.dataplane.track(
                m.vol.id, m.name, str(m.copy.map_path), m.copy.chunk, m.copy.chunks
            )
            m.tracking = True
            await service._io(m.copy.first_pass)
            await service._io(m.copy.sync)
            m.half, _ = await service._converge(m.vol.id, m.copy, m.name, 0)
        log.info(
            "group snapshot %s prepared: %d member(s), %s",
            group.group_id,
            len(group.members),
            ", ".join(f"{m.snap.id} of {m.vol.id}" for m in group.members),
        )

    async def hold(self, group_id: str, lease: float) -> tuple[str, list[SnapshotRow]]:
        check_id(group_id, "grp")
        lease = check_lease(lease)
        group = self._group(group_id)
        service = self.volumes
        async with group.lock:
            if group.state == "held":
                return group.state, [m.snap for m in group.members]  # a retried hold
            self._check_state(group, "prepared")
            self._cancel_lease(group)
            try:
                # Writes went on while the other nodes prepared: catch up again first, so the
                # held catch-up stays short.
                for m in group.members:
                    m.half, _ = await service._converge(m.vol.id, m.copy, m.name, m.half)
                group.held_at = time.monotonic()
                self._lease(group, lease, "it was not committed within its lease")
                for m in group.members:
                    await group.holds.enter_async_context(
                        service.dataplane.quiesced(m.vol.id, flush=False)
                    )
                for m in group.members:
                    final = await service._io(m.copy.catch_up, m.half)
                    log.debug(
                        "group %s: %s held, %s in its last catch-up",
                        group_id,
                        m.vol.id,
                        human(final),
                    )
                group.state = "held"
            except BaseException as exc:
                await self._discard_locked(group, f"holding it failed: {exc}")
                raise
        return group.state, [m.snap for m in group.members]

    async def commit(self, group_id: str) -> tuple[str, list[SnapshotRow], float]:
        check_id(group_id, "grp")
        group = self._group(group_id)
        service = self.volumes
        async with group.lock:
            if group.state == "committed":
                return group.state, [m.snap for m in group.members], group.held_seconds
            self._check_state(group, "held")
            self._cancel_lease(group)
            try:
                await group.holds.aclose()
                group.held_seconds = time.monotonic() - group.held_at
                for m in group.members:
                    await service.dataplane.untrack(m.name)
                    m.tracking = False
                    await service._io(m.copy.commit)
                ids = [m.snap.id for m in group.members]

                def ready(s: Store) -> None:
                    with s.tx():
                        for sid in ids:
                            s.set_snapshot(sid, ready=True)

                await service.store.run(ready)
            except BaseException as exc:
                await self._discard_locked(group, f"committing it failed: {exc}")
                raise
            for m in group.members:
                m.snap = replace(m.snap, ready=True)
            group.state = "committed"
            group.guards.close()
            log.info(
                "group snapshot %s committed: %d member(s), their I/O held for %.0f ms",
                group_id,
                len(group.members),
                group.held_seconds * 1000,
            )
        # Kept for a retried commit until the group is deleted or the node restarts.
        return group.state, [m.snap for m in group.members], group.held_seconds

    async def delete(self, group_id: str) -> None:
        """Discard the group if it is in progress, then delete every member (idempotent)."""
        check_id(group_id, "grp")
        group = self.groups.get(group_id)
        if group is not None:
            await self._discard(group, "it was deleted")
        rows = await self.volumes.store.run(lambda s: s.snapshots(group_id=group_id))
        for row in rows:
            await self.volumes.delete_snapshot(row.id)
        self.groups.pop(group_id, None)

    def _forget_finished(self) -> None:
        """Committed and discarded groups are kept to answer a retried step; the oldest go
        past KEEP_FINISHED."""
        finished = [g for g, v in self.groups.items() if v.state in ("committed", "discarded")]
        for group_id in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
            del self.groups[group_id]

    async def close(self) -> None:
        """Shutting down: nothing stays held, nothing half-made stays."""
        for group in list(self.groups.values()):
            await self._discard(group, "the storage node is shutting down")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- leases and discarding -------------------------------------------------------------

    def _group(self, group_id: str) -> _Group:
        group = self.groups.get(group_id)
        if group is None:
            raise NotFound(f"group snapshot {group_id} is not in progress on this node")
        return group

    @staticmethod
    def _check_state(group: _Group, want: str) -> None:
        if group.state == "discarded":
            raise FailedPrecondition(
                f"group snapshot {group.group_id} was discarded on this node: {group.why}"
            )
        if group.state != want:
            raise FailedPrecondition(
                f"group snapshot {group.group_id} is {group.state} on this node, not {want}"
            )

    def _lease(self, group: _Group, seconds: float, why: str) -> None:
        def expire() -> None:
            log.warning(
                "group snapshot %s: lease of %.1f s expired; discarding it", group.group_id, seconds
            )
            task = asyncio.get_running_loop().create_task(self._discard(group, why))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        group.lease = asyncio.get_running_loop().call_later(seconds, expire)

    @staticmethod
    def _cancel_lease(group: _Group) -> None:
        if group.lease is not None:
            group.lease.cancel()
            group.lease = None

    async def _discard(self, group: _Group, why: str) -> None:
        async with group.lock:
            await self._discard_locked(group, why)

    async def _discard_locked(self, group: _Group, why: str) -> None:
        """Release the holds, stop tracking, remove the copies and the rows (never those of
        a committed group: those are ordinary snapshots, removed by delete)."""
        if group.state in ("committed", "discarded"):
            return
        self._cancel_lease(group)
        service = self.volumes
        with contextlib.suppress(Exception):
            await group.holds.aclose()
        for m in group.members:
            if m.tracking:
                with contextlib.suppress(Exception):
                    await service.dataplane.untrack(m.name)
                m.tracking = False
            with contextlib.suppress(Exception):
                await service._io(m.copy.abort)
        ids = [m.snap.id for m in group.members]
        group_id = group.group_id

        def unfinished(s: Store) -> list[SnapshotRow]:
            return [r for r in s.snapshots(group_id=group_id) if not r.ready or r.id in ids]

        # The files (and their temporaries) first, which frees the space, then the rows.
        with contextlib.suppress(Exception):
            for row in await service.store.run(unfinished):
                await service._io(files.remove, Path(row.path))
                await service.store.run(
                    functools.partial(Store.delete_snapshot, snapshot_id=row.id)
                )
        group.state, group.why = "discarded", why
        group.guards.close()
        log.warning("group snapshot %s discarded: %s", group_id, why)
