"""The machinery around the end-to-end VMs: storage nodes, the CSI controller, quotas, Prometheus.

Owns: starting two real storage nodes (`sn-a`, `sn-b`, one shared API token, one NBD worker
process each, metrics on known ports), the Kubernetes API stand-in holding the tenant's
TenantQuota (tests/support/kube_api.py: the boundary that needs a cluster), the real CSI
controller (`python -m csi --mode controller`) pointed at all of them, and a real Prometheus
scraping the controller and both storage nodes every second. `Csi` makes the calls the
Kubernetes sidecars make, with the arguments they pass (csi-provisioner's
`--extra-create-metadata` namespace parameter, the attacher's volume capability), and turns
publish_context into the NBD target QEMU connects to. `StaleAttachment` keeps a libnbd
connection (Debian's nbdsh) open on one attachment, to show that unpublishing fences it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi.v1 import csi_pb2 as pb
from tests.csi.plugin import Plugin, start_plugin, storage_args
from tests.e2e.qemu import NbdTarget
from tests.support.api import ApiNode, start_api_node
from tests.support.kube_api import KubeApi, tenant_quota
from tests.support.prometheus import Prometheus
from tests.support.servers import free_port, stop_process

CALL_TIMEOUT = 120.0
STORAGE_NODES = ("sn-a", "sn-b")
NAMESPACE_PARAM = "csi.storage.k8s.io/pvc/namespace"
Mode = pb.VolumeCapability.AccessMode.Mode
BLOCK_RWX = pb.VolumeCapability(
    block=pb.VolumeCapability.BlockVolume(),
    access_mode=pb.VolumeCapability.AccessMode(mode=Mode.MULTI_NODE_MULTI_WRITER),
)


@dataclass
class Csi:
    """The CSI Controller service, called the way the sidecars call it, for one tenant."""

    plugin: Plugin
    tenant: str

    @property
    def stub(self) -> Any:
        return self.plugin.controller

    def create_volume(
        self, name: str, size: int, *, source_volume: str = "", source_snapshot: str = ""
    ) -> str:
        """csi-provisioner: a block PVC (RWX) in the tenant's namespace; returns the volume id."""
        volume = self.create(
            name, size, source_volume=source_volume, source_snapshot=source_snapshot
        )
        return str(volume.volume_id)

    def create(
        self, name: str, size: int, *, source_volume: str = "", source_snapshot: str = ""
    ) -> Any:
        """create_volume's call; returns the CSI Volume (id, capacity, volume_context)."""
        source = None
        if source_volume:
            source = pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id=source_volume)
            )
        elif source_snapshot:
            source = pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=source_snapshot)
            )
        request = pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[BLOCK_RWX],
            parameters={
                NAMESPACE_PARAM: self.tenant,
                "csi.storage.k8s.io/pvc/name": name,
            },
            volume_content_source=source,
        )
        return self._retrying(self.stub.CreateVolume, request).volume

    def publish_context(self, volume_id: str, node_id: str) -> dict[str, str]:
        """csi-attacher: ControllerPublishVolume; the publish_context kubelet passes on."""
        reply = self.stub.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node_id, volume_capability=BLOCK_RWX, readonly=False
            ),
            timeout=CALL_TIMEOUT,
        )
        return dict(reply.publish_context)

    def publish(self, volume_id: str, node_id: str) -> NbdTarget:
        """csi-attacher: ControllerPublishVolume; publish_context as QEMU's NBD target."""
        context = self.publish_context(volume_id, node_id)
        return NbdTarget(
            context["nbd.csi.dev/host"],
            int(context["nbd.csi.dev/port"]),
            context["nbd.csi.dev/export"],
        )

    def unpublish(self, volume_id: str, node_id: str) -> None:
        self.stub.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id),
            timeout=CALL_TIMEOUT,
        )

    def create_snapshot(self, name: str, volume_id: str) -> str:
        """csi-snapshotter: CreateSnapshot; returns the snapshot id once it is ready."""
        request = pb.CreateSnapshotRequest(source_volume_id=volume_id, name=name)
        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            snap = self._retrying(self.stub.CreateSnapshot, request).snapshot
            if snap.ready_to_use:
                return str(snap.snapshot_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"snapshot {name} not ready after {CALL_TIMEOUT}s")
            time.sleep(0.2)  # the snapshotter polls the same way until ready_to_use

    def expand(self, volume_id: str, size: int) -> bool:
        """csi-resizer: ControllerExpandVolume; returns node_expansion_required."""
        reply = self.stub.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=volume_id,
                capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capability=BLOCK_RWX,
            ),
            timeout=CALL_TIMEOUT,
        )
        return bool(reply.node_expansion_required)

    def _retrying(self, call: Any, request: Any) -> Any:
        """ABORTED means "operation pending, retry" (spec); the sidecars retry, so do we."""
        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            try:
                return call(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                code = exc.code()
                if code != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


@dataclass
class Cluster:
    """Everything the scenario runs against; `stop()` ends every process it started."""

    base: Path
    tenant: str
    quota: dict[str, Any]
    nodes: dict[str, ApiNode] = field(default_factory=dict)
    kube: KubeApi | None = None
    plugin: Plugin | None = None
    prometheus: Prometheus | None = None
    controller_metrics_port: int = 0
    node_metrics_ports: dict[str, int] = field(default_factory=dict)
    # Storage node id -> the NBD host it puts in publish_context (--nbd-advertise), for
    # clients that reach it through a forward (the kernel-path guests); default: 127.0.0.1.
    advertise: dict[str, str] = field(default_factory=dict)
    with_prometheus: bool = True

    @property
    def csi(self) -> Csi:
        assert self.plugin is not None
        return Csi(self.plugin, self.tenant)

    def start(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        token = secrets.token_urlsafe(32)
        for node_id in STORAGE_NODES:
            data_dir = self.base / node_id
            data_dir.mkdir(parents=True)
            (data_dir / "api-token").write_text(token + "\n")
            (data_dir / "api-token").chmod(0o600)
            port = self.node_metrics_ports[node_id] = free_port()
            advertise = self.advertise.get(node_id)
            self.nodes[node_id] = start_api_node(
                data_dir,
                workers=1,
                node_id=node_id,
                extra_args=[
                    "--metrics-listen",
                    f"127.0.0.1:{port}",
                    *(["--nbd-advertise", advertise] if advertise else []),
                ],
            )
        self.kube = KubeApi().start()
        self.kube.put(tenant_quota(self.tenant, **self.quota))
        kubeconfig = self.kube.write_kubeconfig(self.base / "kubeconfig")
        self.controller_metrics_port = free_port()
        args = storage_args(
            [(node_id, node.api_port) for node_id, node in self.nodes.items()],
            self.base / STORAGE_NODES[0] / "api-token",
        )
        self.plugin = start_plugin(
            self.base / "controller",
            "--mode",
            "controller",
            *args,
            "--kubeconfig",
            str(kubeconfig),
            "--metrics-listen",
            f"127.0.0.1:{self.controller_metrics_port}",
        )
        if not self.with_prometheus:
            return
        prom_dir = self.base / "prometheus"
        prom_dir.mkdir()
        self.prometheus = Prometheus(
            prom_dir,
            {
                "csi-controller": self.controller_metrics_port,
                **{f"storage-{n}": p for n, p in self.node_metrics_ports.items()},
            },
        )

    def storage_node_of(self, volume_id: str) -> ApiNode:
        return self.nodes[volume_id.partition(":")[0]]

    def stop(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.plugin is not None:
            self.plugin.stop()
        for node in self.nodes.values():
            node.stop()
        if self.kube is not None:
            self.kube.stop()


# nbdsh's Python, fed the export name on stdin (never on a command line), then commands.
_PROBE = """
import sys
import nbd
host, port, export, offset = (sys.stdin.readline().strip() for _ in range(4))
offset = int(offset)
def connect():
    c = nbd.NBD()
    c.set_export_name(export)
    c.connect_tcp(host, port)
    return c
c = connect()
c.pread(4096, offset)
print("connected", flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "write":
            c.pwrite(bytes(4096), offset)
            c.flush()
        else:
            connect().pread(4096, offset)
        print("ok", flush=True)
    except nbd.Error as exc:
        print("refused", str(exc).replace(export, "<export>"), flush=True)
"""


class StaleAttachment:
    """A libnbd client on one attachment: connected now, probed after an unpublish.

    `offset` must be a block the guest never uses: if the fence failed, the write would land.
    """

    def __init__(self, target: NbdTarget, offset: int) -> None:
        # nbdsh runs `python3 -m nbd`: Debian's python3, which has libnbd's module.
        env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
        self.proc = subprocess.Popen(
            ["nbdsh", "-n", "-c", _PROBE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{target.host}\n{target.port}\n{target.export}\n{offset}\n")
        self.proc.stdin.flush()
        first = self.proc.stdout.readline().strip()
        if first != "connected":
            self.close()
            raise RuntimeError(f"libnbd could not use the attachment: {first}")

    def ask(self, command: str) -> str:
        """`write` on the open connection, or `connect` anew; returns "ok" or "refused ..."."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        stop_process(self.proc, timeout=10)  # type: ignore[arg-type]
