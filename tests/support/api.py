"""A storage node with its management API, and a small typed client for tests.

Owns: starting `python -m storage_node` with the gRPC API on a free loopback port (through
tests/support/servers.py), reading the bearer token the node writes to DATA_DIR/api-token,
and `Api`, a thin wrapper over the generated stub that sends `authorization: Bearer TOKEN`
with every call and gives each RPC a typed signature. Also: restarting a node on the same
data directory and ports, killing its whole process tree (SIGKILL, for crash tests), and
polling helpers that wait for a state rather than for a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from storage_node.v1 import storage_node_pb2 as pb
from storage_node.v1 import storage_node_pb2_grpc as pb_grpc
from tests.support.servers import ServerHandle, free_port, start_storage_node

T = TypeVar("T")

CALL_TIMEOUT = 60.0


class Api:
    """The StorageNode service with the token attached; one method per RPC."""

    def __init__(self, channel: grpc.Channel, token: str, timeout: float = CALL_TIMEOUT) -> None:
        self.channel = channel
        self.stub = pb_grpc.StorageNodeStub(channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        fn = getattr(self.stub, method)
        return fn(request, metadata=self.metadata, timeout=self.timeout)

    def GetNodeInfo(self, request: pb.GetNodeInfoRequest) -> pb.NodeInfo:
        return self._call("GetNodeInfo", request)

    def GetCapacity(self, request: pb.GetCapacityRequest) -> pb.Capacity:
        return self._call("GetCapacity", request)

    def CreateVolume(self, request: pb.CreateVolumeRequest) -> pb.Volume:
        return self._call("CreateVolume", request)

    def GetVolume(self, request: pb.GetVolumeRequest) -> pb.Volume:
        return self._call("GetVolume", request)

    def ListVolumes(self, request: pb.ListVolumesRequest) -> pb.ListVolumesResponse:
        return self._call("ListVolumes", request)

    def DeleteVolume(self, request: pb.DeleteVolumeRequest) -> pb.DeleteVolumeResponse:
        return self._call("DeleteVolume", request)

    def ExpandVolume(self, request: pb.ExpandVolumeRequest) -> pb.Volume:
        return self._call("ExpandVolume", request)

    def SetVolumeQos(self, request: pb.SetVolumeQosRequest) -> pb.Volume:
        return self._call("SetVolumeQos", request)

    def CreateSnapshot(self, request: pb.CreateSnapshotRequest) -> pb.Snapshot:
        return self._call("CreateSnapshot", request)

    def GetSnapshot(self, request: pb.GetSnapshotRequest) -> pb.Snapshot:
        return self._call("GetSnapshot", request)

    def ListSnapshots(self, request: pb.ListSnapshotsRequest) -> pb.ListSnapshotsResponse:
        return self._call("ListSnapshots", request)

    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest) -> pb.DeleteSnapshotResponse:
        return self._call("DeleteSnapshot", request)

    def PrepareGroupSnapshot(self, request: pb.PrepareGroupSnapshotRequest) -> pb.GroupSnapshot:
        return self._call("PrepareGroupSnapshot", request)

    def HoldGroupSnapshot(self, request: pb.HoldGroupSnapshotRequest) -> pb.GroupSnapshot:
        return self._call("HoldGroupSnapshot", request)

    def CommitGroupSnapshot(self, request: pb.CommitGroupSnapshotRequest) -> pb.GroupSnapshot:
        return self._call("CommitGroupSnapshot", request)

    def DeleteGroupSnapshot(
        self, request: pb.DeleteGroupSnapshotRequest
    ) -> pb.DeleteGroupSnapshotResponse:
        return self._call("DeleteGroupSnapshot", request)

    def ImportImage(self, request: pb.ImportImageRequest) -> pb.Image:
        return self._call("ImportImage", request)

    def GetImage(self, request: pb.GetImageRequest) -> pb.Image:
        return self._call("GetImage", request)

    def ListImages(self, request: pb.ListImagesRequest) -> pb.ListImagesResponse:
        return self._call("ListImages", request)

    def DeleteImage(self, request: pb.DeleteImageRequest) -> pb.DeleteImageResponse:
        return self._call("DeleteImage", request)

    def Publish(self, request: pb.PublishRequest) -> pb.Attachment:
        return self._call("Publish", request)

    def Unpublish(self, request: pb.UnpublishRequest) -> pb.UnpublishResponse:
        return self._call("Unpublish", request)

    def ListAttachments(self, request: pb.ListAttachmentsRequest) -> pb.ListAttachmentsResponse:
        return self._call("ListAttachments", request)

    def GetTenant(self, request: pb.GetTenantRequest) -> pb.Tenant:
        return self._call("GetTenant", request)

    def ListTenants(self, request: pb.ListTenantsRequest) -> pb.ListTenantsResponse:
        return self._call("ListTenants", request)

    def SetTenantLimits(self, request: pb.SetTenantLimitsRequest) -> pb.Tenant:
        return self._call("SetTenantLimits", request)

    # -- conveniences ----------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size: int,
        tenant: str = "tenant-a",
        *,
        snapshot_id: str = "",
        volume_id: str = "",
        image_id: str = "",
    ) -> pb.Volume:
        source = None
        if snapshot_id or volume_id or image_id:
            kind = "snapshot_id" if snapshot_id else "volume_id" if volume_id else "image_id"
            source = pb.VolumeSource(**{kind: snapshot_id or volume_id or image_id})
        return self.CreateVolume(
            pb.CreateVolumeRequest(name=name, tenant=tenant, size_bytes=size, source=source)
        )

    def wait_volume(self, volume_id: str, timeout: float = 60.0) -> pb.Volume:
        """Poll until the volume leaves CREATING; returns it (READY or FAILED)."""
        return poll(
            lambda: self.GetVolume(pb.GetVolumeRequest(volume_id=volume_id)),
            lambda v: v.state != pb.VOLUME_STATE_CREATING,
            timeout,
            f"volume {volume_id} still creating",
        )

    def wait_image(self, image_id: str, timeout: float = 60.0) -> pb.Image:
        return poll(
            lambda: self.GetImage(pb.GetImageRequest(image_id=image_id)),
            lambda i: i.ready or bool(i.error),
            timeout,
            f"image {image_id} still importing",
        )

    def publish(
        self,
        volume_id: str,
        node_id: str = "node-1",
        address: str = "127.0.0.1",
        *,
        readonly: bool = False,
        multi_node: bool = False,
    ) -> pb.Attachment:
        return self.Publish(
            pb.PublishRequest(
                volume_id=volume_id,
                node_id=node_id,
                node_address=address,
                readonly=readonly,
                multi_node=multi_node,
            )
        )

    def unpublish(self, volume_id: str, node_id: str = "node-1") -> None:
        self.Unpublish(pb.UnpublishRequest(volume_id=volume_id, node_id=node_id))


def poll(
    get: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str, step: float = 0.05
) -> T:
    """Call get() until done(result); the timeout is only a bound, never an assertion on time."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s: {value}")
        time.sleep(step)


@dataclass
class ApiNode:
    """A running storage node with its API; `restart()` keeps the data dir and both ports."""

    data_dir: Path
    nbd_port: int
    api_port: int
    workers: int | None
    extra_args: list[str]
    exports: list[str]
    handle: ServerHandle | None = None
    api: Api = field(init=False)
    _channel: grpc.Channel | None = None

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "storage-node.db"

    @property
    def pid(self) -> int:
        assert self.handle is not None
        return self.handle.proc.pid

    def start(self) -> ApiNode:
        self.handle = start_storage_node(
            self.data_dir,
            self.exports,
            port=self.nbd_port,
            workers=self.workers,
            extra_args=[
                "--api-listen",
                f"127.0.0.1:{self.api_port}",
                # Any free port: nodes of tests running in parallel must not clash.
                *(
                    []
                    if "--metrics-listen" in self.extra_args
                    else ["--metrics-listen", "127.0.0.1:0"]
                ),
                *self.extra_args,
            ],
        )
        try:
            self._connect()
        except BaseException:
            self.handle.kill()
            raise
        return self

    def _connect(self) -> None:
        assert self.handle is not None
        self._close_channel()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.api_port}")
        self.api = Api(self._channel, self.token)
        deadline = time.monotonic() + 30
        while True:
            if self.handle.proc.poll() is not None:
                raise RuntimeError(
                    f"storage node exited with {self.handle.proc.returncode}:\n"
                    + self.handle.log_text()[-3000:]
                )
            try:
                self.api.GetNodeInfo(pb.GetNodeInfoRequest())
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> int:
        """SIGTERM (graceful). Returns the exit code."""
        self._close_channel()
        if self.handle is None:
            return 0
        return self.handle.stop()

    def kill_tree(self) -> None:
        """SIGKILL the main process and every process below it (workers, copies) at once.
        Calls in flight on the channel then fail as a client would see it (UNAVAILABLE)."""
        if self.handle is not None:
            kill_process_tree(self.handle.proc.pid)
            self.handle.proc.wait()
        self._close_channel()

    def restart(self) -> ApiNode:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.handle.log_text() if self.handle else ""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # Fields after the command name, which is in parentheses and may hold spaces.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry))
    return found


def kill_process_tree(pid: int) -> None:
    """Stop the tree first (so nothing forks or reparents midway), then SIGKILL every member."""
    tree: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
            tree.append(p)
            todo.extend(_children(p))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    # The main process is our child (Popen.wait reaps it); the others become init's. Wait
    # until each is dead, so their sockets and files are closed before anything restarts.
    deadline = time.monotonic() + 30
    for p in tree[1:]:
        while _alive(p) and time.monotonic() < deadline:
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_api_node(
    data_dir: Path,
    *,
    workers: int | None = 1,
    extra_args: Sequence[str] = (),
    exports: Sequence[str] = ("name=demo,size=1M",),
    nbd_port: int | None = None,
    api_port: int | None = None,
    node_id: str = "storage-test",
) -> ApiNode:
    node = ApiNode(
        data_dir=data_dir,
        nbd_port=nbd_port or free_port(),
        api_port=api_port or free_port(),
        workers=workers,
        extra_args=["--node-id", node_id, *extra_args],
        exports=list(exports),
    )
    return node.start()


@contextlib.contextmanager
def api_node(data_dir: Path, **kw: Any) -> Iterator[ApiNode]:
    node = start_api_node(data_dir, **kw)
    try:
        yield node
    finally:
        node.stop()
