"""Crash safety of the storage node's control path: SIGKILL during management calls.

Owns the promise of storage_node.volumes' order of steps. Fifty runs: each starts a node
(--workers 1) on the data directory the previous run's crash left (or, now and then, a fresh
one), checks what recovery made of it, retries the call the crash interrupted, then issues a
random sequence of calls (create empty / from a snapshot / from a volume, snapshot, expand,
publish, unpublish, delete, and NBD writes followed by FLUSH) from a thread, and SIGKILLs the
node's whole process tree at a random moment (mostly inside a call: after a random number of
calls has begun, plus a random jitter). After each restart:

- every volume row (ready) and snapshot row has its image file, of the row's size; every file
  under volumes/, snapshots/ and golden-images/ has a row; no *.tmp file is left, and nothing
  was quarantined (a crash leaves no orphan but temporaries, which recovery removes);
- volumes in the creating state become ready (none may fail here: their sources exist);
- the retried call converges: it returns its object, and no name exists twice;
- the objects are exactly those whose creation was acknowledged (plus the interrupted one);
- every write acknowledged by a FLUSH reads back, in volumes and in the snapshots and clones
  made after it. A write whose FLUSH was not acknowledged may read old or new.

The catalogue is read with sqlite3 (read-only, WAL) while the node is idle, and once more after
the last run with the node stopped. The seed is printed; NBD_CSI_CRASH_SEED replays a run (the
moment of each kill is a time, so a replay is close, not identical).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import Api, ApiNode, poll, start_api_node
from tests.support.rawnbd import RawClient

pytestmark = pytest.mark.slow

RUNS = 50
MiB = 1 << 20
BLOCK = 4096
DATA_BLOCKS = 256  # writes land in each volume's first MiB, read back in one request
READ, WRITE, FLUSH = 0, 1, 3
FRESH_DIR_CHANCE = 0.12
MAX_VOLUMES = 10
MAX_SNAPSHOTS = 8
# When to kill: once the run's N-th call has begun (N drawn from KILL_AFTER_CALLS), plus a
# jitter in seconds. Counting calls rather than seconds puts most kills inside a call, where
# the steps of interest are, whatever the machine's speed.
KILL_AFTER_CALLS = (1, 10)
KILL_JITTER = (0.0, 0.025)


Data = dict[int, set[int]]  # block -> byte values it may hold (absent: zeros)


@dataclass
class Vol:
    id: str
    size: int
    data: Data = field(default_factory=dict)
    export: str = ""  # published to node-1 when set


@dataclass
class Snap:
    id: str
    size: int
    data: Data


@dataclass
class Op:
    kind: str
    name: str = ""  # the object the call is about (volume or snapshot name)
    source: str = ""  # a snapshot or volume name
    size: int = 0
    block: int = 0
    value: int = 0


@dataclass
class Model:
    """What the client was told: acknowledged objects and flushed data."""

    volumes: dict[str, Vol] = field(default_factory=dict)
    snapshots: dict[str, Snap] = field(default_factory=dict)
    pending: Op | None = None


def copy_data(data: Data) -> Data:
    return {k: set(v) for k, v in data.items()}


class Runner:
    """Issues calls for one run and keeps the model in step with what was acknowledged."""

    def __init__(self, api: Api, nbd_port: int, model: Model, rng: random.Random, tag: str):
        self.api = api
        self.port = nbd_port
        self.model = model
        self.rng = rng
        self.tag = tag
        self.count = 0
        self.clients: dict[str, RawClient] = {}
        self.error: BaseException | None = None
        self.kill_after = 0
        self.reached = threading.Event()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    # -- choosing ----------------------------------------------------------------------------

    def next_name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}-{self.tag}-{self.count}"

    def choose(self) -> Op:
        m, rng = self.model, self.rng
        vols = sorted(m.volumes)
        published = [n for n in vols if m.volumes[n].export]
        unpublished = [n for n in vols if not m.volumes[n].export]
        choices: list[tuple[int, Callable[[], Op]]] = []
        if len(vols) < MAX_VOLUMES:
            choices.append((3, lambda: Op("create", self.next_name("v"), size=rng.choice(SIZES))))
            if m.snapshots:
                choices.append((3, lambda: self._from_snapshot(rng.choice(sorted(m.snapshots)))))
            if vols:
                choices.append((2, lambda: self._from_volume(rng.choice(vols))))
        if vols and len(m.snapshots) < MAX_SNAPSHOTS:
            choices.append((3, lambda: Op("snapshot", self.next_name("s"), rng.choice(vols))))
        if vols:
            choices.append((1, lambda: self._expand(rng.choice(vols))))
        if unpublished:
            choices.append((3, lambda: Op("publish", rng.choice(unpublished))))
            choices.append((2, lambda: Op("delete", rng.choice(unpublished))))
        if published:
            choices.append((2, lambda: Op("unpublish", rng.choice(published))))
            choices.append((8, self._write))
        if m.snapshots:
            choices.append((1, lambda: Op("delete-snapshot", rng.choice(sorted(m.snapshots)))))
        total = sum(w for w, _ in choices)
        pick = self.rng.uniform(0, total)
        for weight, make in choices:
            pick -= weight
            if pick <= 0:
                return make()
        return choices[-1][1]()

    def _from_snapshot(self, snap: str) -> Op:
        extra = self.rng.choice([0, MiB])
        return Op(
            "from-snapshot", self.next_name("v"), snap, self.model.snapshots[snap].size + extra
        )

    def _from_volume(self, vol: str) -> Op:
        extra = self.rng.choice([0, MiB])
        return Op("from-volume", self.next_name("v"), vol, self.model.volumes[vol].size + extra)

    def _expand(self, vol: str) -> Op:
        return Op("expand", vol, size=self.model.volumes[vol].size + MiB)  # the final size

    def _write(self) -> Op:
        name = self.rng.choice(sorted(n for n, v in self.model.volumes.items() if v.export))
        return Op(
            "write", name, block=self.rng.randrange(DATA_BLOCKS), value=self.rng.randrange(1, 256)
        )

    # -- doing -------------------------------------------------------------------------------

    def ready(self, name: str) -> None:
        v = self.model.volumes[name]
        state = self.api.wait_volume(v.id).state
        assert state == pb.VOLUME_STATE_READY, f"volume {name} is {state}"

    def do(self, op: Op, retry: bool = False) -> None:
        """One call, and the model update when it is acknowledged."""
        m, api = self.model, self.api
        if op.kind == "create":
            v = api.create_volume(op.name, op.size, "crash")
            m.volumes[op.name] = Vol(v.id, op.size)
        elif op.kind == "from-snapshot":
            snap = m.snapshots[op.source]
            v = api.create_volume(op.name, op.size, "crash", snapshot_id=snap.id)
            m.volumes[op.name] = Vol(v.id, op.size, copy_data(snap.data))
        elif op.kind == "from-volume":
            self.ready(op.source)
            src = m.volumes[op.source]
            v = api.create_volume(op.name, op.size, "crash", volume_id=src.id)
            m.volumes[op.name] = Vol(v.id, op.size, copy_data(src.data))
        elif op.kind == "snapshot":
            self.ready(op.source)
            vol = m.volumes[op.source]
            s = api.CreateSnapshot(pb.CreateSnapshotRequest(name=op.name, volume_id=vol.id))
            assert s.ready and s.size_bytes == vol.size, s
            m.snapshots[op.name] = Snap(s.id, vol.size, copy_data(vol.data))
        elif op.kind == "expand":
            self.ready(op.name)
            vol = m.volumes[op.name]
            got = api.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=op.size))
            assert got.size_bytes == op.size
            vol.size = op.size
        elif op.kind == "publish":
            self.ready(op.name)
            vol = m.volumes[op.name]
            vol.export = api.publish(vol.id).export_name
        elif op.kind == "unpublish":
            vol = m.volumes[op.name]
            client = self.clients.pop(op.name, None)
            if client is not None:
                client.close()
            api.unpublish(vol.id)
            vol.export = ""
        elif op.kind == "delete":
            if not retry:  # on a retry it may be gone already, which is the point
                self.ready(op.name)
            api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=m.volumes[op.name].id))
            del m.volumes[op.name]
        elif op.kind == "delete-snapshot":
            snap = m.snapshots[op.name]
            try:
                api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.id))
            except grpc.RpcError as exc:
                # In use by a clone still filling: legitimately refused; the model stands.
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                return
            del m.snapshots[op.name]
        elif op.kind == "write":
            vol = m.volumes[op.name]
            client = self.clients.get(op.name)
            if client is None:
                client = self.clients[op.name] = RawClient(self.port, timeout=30).connect(
                    vol.export
                )
            offset = op.block * BLOCK
            before = vol.data.get(op.block, {0})
            vol.data[op.block] = before | {op.value}  # in flight: either
            assert (
                client.call(WRITE, 1, offset, BLOCK, payload=bytes([op.value]) * BLOCK).error == 0
            )
            assert client.call(FLUSH, 2).error == 0
            vol.data[op.block] = {op.value}
        else:
            raise AssertionError(op.kind)

    def run(self, stop: threading.Event) -> None:
        """Calls until the node dies (or stop); the interrupted one stays in model.pending."""
        started = 0
        try:
            while not stop.is_set():
                op = self.choose()
                self.model.pending = op
                started += 1
                if started == self.kill_after:
                    self.reached.set()
                self.do(op)
                self.model.pending = None
        except BaseException as exc:
            # After the kill, only what a dead node causes is expected.
            if not (stop.is_set() and _dead_node_error(exc)):
                self.error = exc
        finally:
            self.reached.set()  # an early failure must not leave the killer waiting


SIZES = [MiB, 2 * MiB, 4 * MiB]


def _dead_node_error(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError):
        return exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        )
    if isinstance(exc, ValueError):
        return "closed channel" in str(exc)
    return isinstance(exc, OSError)


# -- checks ------------------------------------------------------------------------------------


def check_catalogue(data_dir: Path) -> None:
    """Rows and files agree (the node is idle or stopped)."""
    db = sqlite3.connect(f"file:{data_dir / 'storage-node.db'}?mode=ro", uri=True)
    try:
        volumes = db.execute("SELECT id, name, size, state, path FROM volumes").fetchall()
        snapshots = db.execute("SELECT id, size, ready, deleting, path FROM snapshots").fetchall()
        images = db.execute("SELECT id, path FROM golden_images").fetchall()
        attachments = db.execute("SELECT volume_id FROM attachments").fetchall()
    finally:
        db.close()
    known: set[Path] = set()
    for vid, name, size, state, path in volumes:
        assert state == "ready", f"volume {vid} ({name}) is {state} after recovery"
        p = data_dir / "volumes" / f"{vid}.img"
        assert Path(path) == p and p.is_file(), f"volume {vid} has no file"
        assert p.stat().st_size == size, f"volume {vid}: file {p.stat().st_size}, row {size}"
        known.add(p)
    for sid, size, ready, deleting, path in snapshots:
        assert ready and not deleting, f"snapshot {sid} left half made or half deleted"
        p = data_dir / "snapshots" / f"{sid}.img"
        assert Path(path) == p and p.is_file(), f"snapshot {sid} has no file"
        assert p.stat().st_size == size, f"snapshot {sid}: file {p.stat().st_size}, row {size}"
        known.add(p)
    known |= {Path(path) for _, path in images}
    for sub in ("volumes", "snapshots", "golden-images"):
        for p in (data_dir / sub).iterdir():
            assert p in known, f"{sub}/{p.name} has no row"
    leftovers = [str(p.relative_to(data_dir)) for p in data_dir.rglob("*.tmp")]
    assert not leftovers, leftovers
    # Recovery finds no orphan to set aside: only temporaries lack a row after a crash.
    assert not (data_dir / "quarantine").exists(), list((data_dir / "quarantine").rglob("*"))
    vids = {v[0] for v in volumes}
    assert all(a[0] in vids for a in attachments)


def settle(api: Api) -> list[pb.Volume]:
    """Wait until no volume is being filled; return them all."""

    def volumes() -> list[pb.Volume]:
        out: list[pb.Volume] = []
        token = ""
        for _ in range(100):
            r = api.ListVolumes(pb.ListVolumesRequest(page_token=token))
            out += r.volumes
            token = r.next_page_token
            if not token:
                break
        return out

    return poll(
        volumes,
        lambda vs: all(v.state != pb.VOLUME_STATE_CREATING for v in vs),
        60,
        "volumes still creating",
    )


def check_against_model(node: ApiNode, model: Model) -> None:
    api = node.api
    volumes = settle(api)
    names = sorted(v.name for v in volumes)
    assert names == sorted(model.volumes), (names, sorted(model.volumes))
    for v in volumes:
        want = model.volumes[v.name]
        assert (v.id, v.size_bytes, v.state) == (want.id, want.size, pb.VOLUME_STATE_READY), v
    snaps = api.ListSnapshots(pb.ListSnapshotsRequest(page_size=1000)).snapshots
    assert sorted(s.name for s in snaps) == sorted(model.snapshots)
    for s in snaps:
        assert (s.id, s.size_bytes, s.ready) == (
            model.snapshots[s.name].id,
            model.snapshots[s.name].size,
            True,
        )
    attached = {
        a.volume_id: a for a in api.ListAttachments(pb.ListAttachmentsRequest()).attachments
    }
    for name, vol in model.volumes.items():
        if vol.export:
            assert attached[vol.id].export_name == vol.export, name
        else:
            assert vol.id not in attached, name
    for name, vol in model.volumes.items():
        check_data(node, name, vol)


def check_data(node: ApiNode, name: str, vol: Vol) -> None:
    export = vol.export
    if not export:
        export = node.api.publish(vol.id, "checker").export_name
    client = RawClient(node.nbd_port, timeout=30).connect(export)
    try:
        reply = client.call(READ, 1, 0, DATA_BLOCKS * BLOCK)
        assert reply.error == 0
        for block in range(DATA_BLOCKS):
            value = reply.data[block * BLOCK]
            chunk = reply.data[block * BLOCK : (block + 1) * BLOCK]
            assert chunk == bytes([value]) * BLOCK, f"{name}: block {block} is torn"
            allowed = vol.data.get(block, {0})
            assert value in allowed, f"{name}: block {block} holds {value}, expected {allowed}"
            vol.data[block] = {value}  # what it is now is what later copies get
    finally:
        client.close()
    if not vol.export:
        node.api.unpublish(vol.id, "checker")


def retry_pending(runner: Runner, model: Model) -> None:
    """Retry the interrupted call: it must converge (an object, no duplicate)."""
    op = model.pending
    model.pending = None
    if op is None or op.kind == "write":
        return  # a write is not retried: the model already allows old or new
    if op.kind in ("delete", "delete-snapshot", "unpublish", "expand", "publish", "snapshot"):
        target = model.snapshots if op.kind == "delete-snapshot" else model.volumes
        key = op.name if op.kind != "snapshot" else op.source
        if key not in target:
            return
    runner.do(op, retry=True)


# -- the test ----------------------------------------------------------------------------------


def test_sigkill_during_management_calls(tmp_path: Path) -> None:
    seed = int(os.environ.get("NBD_CSI_CRASH_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"crash-safety seed: {seed} (NBD_CSI_CRASH_SEED={seed} to replay)")
    rng = random.Random(seed)
    generation = 0
    data_dir = tmp_path / f"data-{generation}"
    model = Model()
    node: ApiNode | None = None
    nbd_port = api_port = 0
    kills = 0
    interrupted: dict[str, int] = {}
    try:
        for run in range(RUNS):
            if run and rng.random() < FRESH_DIR_CHANCE:
                generation += 1
                data_dir = tmp_path / f"data-{generation}"
                model = Model()
            node = start_api_node(
                data_dir,
                workers=1,
                nbd_port=nbd_port or None,
                api_port=api_port or None,
                extra_args=["--log-level", "WARNING"],
            )
            nbd_port, api_port = node.nbd_port, node.api_port
            runner = Runner(node.api, node.nbd_port, model, rng, f"{run}")
            try:
                settle(node.api)
                check_catalogue(data_dir)
                retry_pending(runner, model)
                check_against_model(node, model)
            except BaseException:
                print(f"run {run} (seed {seed}), after restart:\n{node.log_text()[-6000:]}")
                raise
            stop = threading.Event()
            thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
            runner.kill_after = rng.randint(*KILL_AFTER_CALLS)
            jitter = rng.uniform(*KILL_JITTER)
            thread.start()
            # Bounded waits, never a reason to fail: the kill lands wherever the calls are.
            runner.reached.wait(30)
            thread.join(jitter)
            stop.set()
            node.kill_tree()
            kills += 1
            thread.join(60)
            assert not thread.is_alive(), "the calling thread hung after the kill"
            runner.close()
            if runner.error is not None:
                print(node.log_text()[-6000:])
                raise AssertionError(f"run {run} (seed {seed}): {runner.error!r}")
            if model.pending is not None:
                interrupted[model.pending.kind] = interrupted.get(model.pending.kind, 0) + 1
        node = start_api_node(data_dir, workers=1, nbd_port=nbd_port, api_port=api_port)
        settle(node.api)
        runner = Runner(node.api, node.nbd_port, model, rng, "final")
        retry_pending(runner, model)
        check_against_model(node, model)
        settle(node.api)
        assert node.stop() == 0
        node = None
        check_catalogue(data_dir)  # once more, with the node stopped
        inside = ", ".join(f"{k} {n}" for k, n in sorted(interrupted.items()))
        print(f"{kills} kills, {generation + 1} data dirs; calls interrupted: {inside}")
        repairs = sum(
            (tmp_path / f"data-{g}" / "storage-node.log").read_text().count("recovery:")
            for g in range(generation + 1)
        )
        print(f"recovery repaired {repairs} interrupted steps")
    finally:
        if node is not None:
            with contextlib.suppress(Exception):
                node.kill_tree()
