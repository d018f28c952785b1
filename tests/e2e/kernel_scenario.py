"""The end-to-end scenario on the KubeVirt path (docs/e2e.md, "The kernel path").

In a KubeVirt cluster a VM's disk is the `/dev/nbdX` that the node plugin made in
NodeStageVolume and bound in NodePublishVolume; virt-launcher's QEMU opens that block device.
This scenario drives that path: two qemu-system guests (TCG, Debian's kernel with its NBD
driver, the host's tree over 9p) are two Kubernetes nodes, A (`node-a@127.0.0.2`) and B
(`node-b@127.0.0.3`), each running the real node plugin (tests/e2e/kube_node.py,
tests/e2e/kube_node_guest.py); the host runs two storage nodes and the CSI controller
(tests/e2e/cluster.py) and plays kubelet and the sidecars, making their calls in their order.
The workload in a guest stands for the VM: numbered, self-checking records written to the
published device with O_DIRECT and an fsync each (tests/e2e/records.py), every acknowledged
one printed on the console.

1. two storage nodes (publish_context names them as the guests reach them: 10.0.2.100 and
   10.0.2.101), the controller, a tenant with a quota;
2. both guests boot in parallel; NodeGetInfo gives each node's id (node-driver-registrar);
3. CreateVolume (the tenant's namespace as --extra-create-metadata sends it) →
   ControllerPublishVolume(A) → NodeStageVolume → NodePublishVolume (Block) on A; the
   workload writes on A;
4. live migration: ControllerPublishVolume(B) while A is still attached, NodeStage and
   NodePublish on B; the writes stop on A and go on on B with the next number; then
   NodeUnpublish and NodeUnstage on A, ControllerUnpublishVolume(A); A is fenced: a leftover
   kernel device on A's attachment fails its writes, and new connections from A's address are
   refused (with A's export name and with B's);
5. the volume's storage node restarts gracefully (SIGTERM) while B writes;
6. it crashes (SIGKILL of its process tree) and starts again from the same data directory;
end: B stops; every record is read back in B and, through an attachment of its own, on the
host with libnbd: every acknowledged write is there, and the fenced write is not; no I/O error
anywhere.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi.attach import CTX_EXPORT, CTX_HOST
from csi.v1 import csi_pb2 as pb
from tests.e2e import records
from tests.e2e.cluster import BLOCK_RWX, Cluster
from tests.e2e.kube_node import Forward, KubeNode
from tests.e2e.qemu import Console
from tests.e2e.scenario import Report, ScenarioFailed, Steps, check
from tests.support.api import poll
from tests.vm.guest import (
    HOSTROOT_MODULES,
    GuestImage,
    build_hostroot_initramfs,
    find_kernel,
    missing_prerequisites,
    module_load_order,
)

MiB = 1024 * 1024
TENANT = "e2e-kernel-tenant"
VOLUME_SIZE = 256 * MiB
QUOTA = {"capacity": str(4 * VOLUME_SIZE), "volumes": 4, "snapshots": 0}
# The storage nodes as the guests reach them (guestfwd addresses; --nbd-advertise).
ADVERTISED = {"sn-a": "10.0.2.100", "sn-b": "10.0.2.101"}
NODES = (("node-a", "127.0.0.2"), ("node-b", "127.0.0.3"))
VERIFIER = "e2e-verifier@127.0.0.1"
PV = "pvc-e2e-kernel"
POD_UIDS = {
    "node-a": "a0000000-0000-4000-8000-00000000000a",
    "node-b": "b0000000-0000-4000-8000-00000000000b",
}
STAGING = f"/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/{PV}"
PUBLISH_DIR = f"/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/{PV}"
BOOT_TIMEOUT = 900.0  # two TCG guests importing Python over 9p on shared cores
RECORD_TIMEOUT = 300.0  # the longest the scenario waits for the next acknowledged record
STEADY = 10  # acknowledged records that count as "the workload keeps going"
BEFORE_FENCE, AFTER_FENCE = "E2E-PROBE before the fence", "E2E-PROBE after the fence"
ACK = re.compile(r"^E2E-WL ACK (\d+)$")
FAILURE = re.compile(r"^E2E-WL (IOERR|MISMATCH|FULL)")
KERNEL_IO_ERROR = re.compile(r"I/O error, dev (nbd\d+)")
TOOLS = (("nbdsh", "libnbd-bin"), ("socat", "socat"))

# libnbd (nbdsh), fed host, port, export, offset, length and output file on stdin.
_READ = """
import sys
import nbd
host, port, export, offset, length, out = (sys.stdin.readline().strip() for _ in range(6))
offset, length = int(offset), int(length)
h = nbd.NBD()
h.set_export_name(export)
h.connect_tcp(host, port)
with open(out, "wb") as f:
    pos = offset
    while pos < offset + length:
        n = min(1 << 20, offset + length - pos)
        f.write(h.pread(n, pos))
        pos += n
h.shutdown()
print("read", length)
"""


def missing() -> str | None:
    """Why the kernel-path scenario cannot run on this machine, or None."""
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    reason = missing_prerequisites()
    if reason is not None:
        return reason
    try:  # 9p, overlayfs: the guests run the host's tree
        module_load_order(find_kernel(), HOSTROOT_MODULES)
    except LookupError as exc:
        return str(exc)
    return None


def acks(console: Console, start: int = 0) -> list[tuple[int, float, int]]:
    """(console line, host stamp, record number) of each acknowledged record from `start`."""
    found = []
    for index, line in enumerate(console.snapshot()[start:], start):
        m = ACK.match(line.text)
        if m:
            found.append((index, line.at, int(m.group(1))))
    return found


def longest_pause(console: Console, start: int) -> float:
    """The longest time between two acknowledged records, from the last one before console
    line `start` on."""
    every = acks(console)
    before = [at for index, at, _ in every if index < start][-1:]
    stamps = before + [at for index, at, _ in every if index >= start]
    return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)


class KernelScenario(Steps):
    def __init__(self, workdir: Path, say: Callable[[str], None] = print) -> None:
        super().__init__(say)
        self.workdir = workdir
        self.cluster: Cluster | None = None
        self.nodes: dict[str, KubeNode] = {}
        self.devices: dict[str, str] = {}  # node name -> the nbdX NodeStage made

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self._run()
        except BaseException:
            self._save_logs()
            raise
        finally:
            self.close()
        return self.report

    def close(self) -> None:
        for node in self.nodes.values():
            node.shutdown(timeout=60)
        if self.cluster is not None:
            self.cluster.stop()

    def _save_logs(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                (node.workdir / "plugin.log").write_text(node.plugin_log(400) + "\n")

    def _run(self) -> None:
        with self.step("1. two storage nodes, the CSI controller, a tenant with a quota"):
            start = time.monotonic()
            self.cluster = cluster = Cluster(
                self.workdir / "cluster",
                TENANT,
                QUOTA,
                advertise=dict(ADVERTISED),
                with_prometheus=False,
            ).start()
            self.timed("start storage nodes + controller", time.monotonic() - start)
            kernel = find_kernel()
            image = GuestImage(kernel, build_hostroot_initramfs(self.workdir / "initramfs", kernel))
            forwards = [Forward(ADVERTISED[n], cluster.nodes[n].nbd_port) for n in ADVERTISED]
        csi = cluster.csi

        with self.step("2. boot nodes A and B (guests with the node plugin), in parallel"):
            start = time.monotonic()
            for name, address in NODES:
                node = KubeNode(name, address, image, self.workdir / name, forwards)
                self.nodes[name] = node
                node.boot()
            ready: dict[str, float] = {}
            errors: list[BaseException] = []

            def wait(node: KubeNode) -> None:
                try:
                    ready[node.name] = node.wait_ready(BOOT_TIMEOUT)
                except BaseException as exc:
                    errors.append(exc)

            waiters = [threading.Thread(target=wait, args=(n,)) for n in self.nodes.values()]
            for t in waiters:
                t.start()
            for t in waiters:
                t.join()
            if errors:
                raise errors[0]
            for name, at in ready.items():
                self.timed(f"boot {name} until its plugin answers Probe", at - start)
            a, b = self.nodes["node-a"], self.nodes["node-b"]
            for kn in (a, b):
                info = kn.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=60)
                # NAME@ADDRESS, then the node's attach limit (docs/csi-driver.md, node ids).
                want = f"{kn.name}@{kn.address};"
                check(info.node_id.startswith(want), f"NodeGetInfo: {info.node_id}")
                kn.reported_node_id = info.node_id
                self.log(f"   {kn.name}: NodeGetInfo node_id={info.node_id}")

        with self.step("3. CreateVolume, attach to node A (ControllerPublish, Stage, Publish)"):
            start = time.monotonic()
            volume = csi.create(PV, VOLUME_SIZE)
            volume_id = str(volume.volume_id)
            self.timed("CreateVolume", time.monotonic() - start)
            holder = volume_id.partition(":")[0]
            self.log(f"   volume {volume_id} on storage node {holder}")
            ctx_a = self._attach(a, volume, ADVERTISED[holder])
            a.request("write-start", path=self._target(a), tag=volume_id, first=0)
            first = self._wait_ack(a, accept=lambda n: n >= STEADY)
            self.timed("NodePublish until the workload's first records", first - start)

        with self.step("4. live migration: attach B while A is attached, writes A -> B, fence A"):
            start = time.monotonic()
            ctx_b = self._attach(b, volume, ADVERTISED[holder])
            check(ctx_b[CTX_EXPORT] != ctx_a[CTX_EXPORT], "node B got node A's export name")
            self.timed("attach to B (ControllerPublish, Stage, Publish)", time.monotonic() - start)
            # What a node that never ran NodeUnstageVolume would still hold: a kernel device on
            # A's attachment, made outside the plugin. It writes while A is attached.
            stale = str(a.request("stale-attach", context=ctx_a)["device"])
            before = a.request("stale-write", device=stale, label=BEFORE_FENCE)
            check(before["result"] == "ok", f"write on A's leftover device: {before}")
            self.log(f"   a leftover device on A's attachment: {stale}; its write went through")

            stopped_a = a.request("write-stop")
            last_a = int(stopped_a["last"])
            self._summary_ok(a, stopped_a)
            b.request("write-start", path=self._target(b), tag=volume_id, first=last_a + 1)
            first_b = self._wait_ack(b, accept=lambda n: n == last_a + 1)
            last_a_at = acks(a.console)[-1][1]
            self.timed(
                "the workload's pause from A's last record to B's first", first_b - last_a_at
            )
            self.log(f"   A acknowledged records 0..{last_a}; B goes on from {last_a + 1}")
            self.report.facts["records on A"] = f"0..{last_a}"

            start = time.monotonic()
            a.node.NodeUnpublishVolume(
                pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=self._target(a)),
                timeout=180,
            )
            a.node.NodeUnstageVolume(
                pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=STAGING),
                timeout=180,
            )
            left = a.request("configured")["devices"]
            check(self.devices["node-a"] not in left, f"A's device still configured: {left}")
            csi.unpublish(volume_id, a.node_id)
            self.timed(
                "detach from A (Unpublish, Unstage, ControllerUnpublish)", time.monotonic() - start
            )

            after = a.request("stale-write", device=stale, label=AFTER_FENCE)
            new_a = a.request("probe-connect", context=ctx_a)["result"]
            as_b = a.request("probe-connect", context=ctx_b)["result"]
            self.log(f"   A's leftover device after the fence: write {after['result']}")
            self.log(f"   from A's address, a new connection with A's export: {new_a}")
            self.log(f"   from A's address, a new connection with B's export: {as_b}")
            check(after["result"] != "ok", f"a write from A went through after the fence: {after}")
            check(new_a.startswith("refused"), f"A connected again after the fence: {new_a}")
            check(as_b.startswith("refused"), f"A connected with B's export: {as_b}")
            a.request("stale-detach", device=stale)
            self.report.facts["fence"] = (
                f"leftover device write: {after['result']}; new connection: {new_a}; "
                f"with B's export: {as_b}"
            )
            # B's connections are untouched, and B reads what A wrote.
            mark = len(b.console)
            self._wait_ack(b, start=mark, accept=lambda n: True, count=STEADY)
            check(self._reconnects(b, volume_id) == 0, "fencing A made B reconnect")
            verified = b.request(
                "verify", path=self._target(b), tag=volume_id, first=0, last=last_a
            )
            check(verified["bad_count"] == 0, f"B reads A's records wrong: {verified}")
            self.log(
                f"   B reads A's {verified['checked']} records back intact; B made no reconnect"
            )

        storage = cluster.storage_node_of(volume_id)
        with self.step("5. the storage node restarts gracefully (SIGTERM) while B writes"):
            mark = len(b.console)
            start = time.monotonic()
            storage.restart()
            self.timed("storage node restart (SIGTERM + start)", time.monotonic() - start)
            # Records count from when the new node is up: until the old one's workers stop,
            # it serves, so records made during the restart prove nothing.
            self._wait_ack(b, start=len(b.console), accept=lambda n: True, count=STEADY)
            after_restart = self._wait_reconnects(b, volume_id, 1)
            pause = self.timed(
                "longest write pause (graceful restart)", longest_pause(b.console, mark)
            )
            self.report.facts["pause (restart)"] = f"{pause:.2f} s"

        with self.step("6. the storage node crashes (SIGKILL) and starts again while B writes"):
            mark = len(b.console)
            start = time.monotonic()
            storage.kill_tree()
            storage.start()
            self.timed("storage node crash (SIGKILL) + start", time.monotonic() - start)
            self._wait_ack(b, start=len(b.console), accept=lambda n: True, count=STEADY)
            count = self._wait_reconnects(b, volume_id, int(after_restart) + 1)
            pause = self.timed("longest write pause (crash)", longest_pause(b.console, mark))
            self.report.facts["pause (crash)"] = f"{pause:.2f} s"
            self.report.facts["reconnects"] = f"node B's plugin reconnected {count:.0f}x"
            # The fence is in the storage node's catalogue: a crash does not lift it.
            again = a.request("probe-connect", context=ctx_a)["result"]
            self.log(f"   from A's address after the crash, with A's export: {again}")
            check(again.startswith("refused"), f"A connected after the crash: {again}")

        with self.step("end: every acknowledged record is on the volume; no I/O error"):
            stopped_b = b.request("write-stop")
            last_b = int(stopped_b["last"])
            self._summary_ok(b, stopped_b)
            check(stopped_b["first"] == last_a + 1, f"B started at {stopped_b['first']}")
            acked = sorted({n for kn in (a, b) for _, _, n in acks(kn.console)})
            check(acked == list(range(last_b + 1)), "the consoles' acknowledged records have gaps")
            start = time.monotonic()
            verified = b.request(
                "verify", path=self._target(b), tag=volume_id, first=0, last=last_b
            )
            self.timed(f"B reads records 0..{last_b} back", time.monotonic() - start)
            check(verified["bad_count"] == 0, f"B reads records wrong: {verified}")
            self._no_failures()
            self._detach(b, volume_id)
            start = time.monotonic()
            self._host_check(volume_id, holder, last_b)
            self.timed("host reads the volume back (libnbd)", time.monotonic() - start)
            self.report.facts["records"] = (
                f"0..{last_b} acknowledged ({last_a + 1} on A, {last_b - last_a} on B), all on the "
                "volume; the write after the fence is not"
            )
            self.report.facts["longest record (guest clock)"] = (
                f"A {stopped_a['longest_record_seconds']} s, "
                f"B {stopped_b['longest_record_seconds']} s"
            )
            for name, kn in self.nodes.items():
                rc = kn.shutdown()
                check(rc == 0, f"{name}: the node plugin exited with {rc}")
            self.nodes.clear()

    # -- kubelet ---------------------------------------------------------------------------

    def _target(self, node: KubeNode) -> str:
        return f"{PUBLISH_DIR}/{POD_UIDS[node.name]}"

    def _attach(self, node: KubeNode, volume: Any, advertised: str) -> dict[str, str]:
        """The attacher's ControllerPublishVolume, then kubelet's NodeStage and NodePublish."""
        assert self.cluster is not None
        volume_id = str(volume.volume_id)
        start = time.monotonic()
        context = self.cluster.csi.publish_context(volume_id, node.node_id)
        self.timed(f"ControllerPublishVolume({node.name})", time.monotonic() - start)
        check(context[CTX_HOST] == advertised, f"publish_context host {context[CTX_HOST]}")
        node.request("mkdir", path=STAGING)
        node.request("mkdir", path=PUBLISH_DIR)
        start = time.monotonic()
        node.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=volume_id,
                publish_context=context,
                staging_target_path=STAGING,
                volume_capability=BLOCK_RWX,
                volume_context=dict(volume.volume_context),
            ),
            timeout=180,
        )
        self.timed(f"NodeStageVolume({node.name})", time.monotonic() - start)
        start = time.monotonic()
        node.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=volume_id,
                publish_context=context,
                staging_target_path=STAGING,
                target_path=self._target(node),
                volume_capability=BLOCK_RWX,
                volume_context=dict(volume.volume_context),
            ),
            timeout=180,
        )
        self.timed(f"NodePublishVolume({node.name})", time.monotonic() - start)
        dev = node.request("device-of", path=self._target(node))
        check(dev["backend"] == f"nbd.csi.dev/{volume_id}", f"{node.name}: device {dev}")
        self.devices[node.name] = str(dev["device"])
        self.log(f"   {node.name}: {self._target(node)} is /dev/{dev['device']}")
        return context

    def _detach(self, node: KubeNode, volume_id: str) -> None:
        assert self.cluster is not None
        node.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=self._target(node)),
            timeout=180,
        )
        node.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=STAGING),
            timeout=180,
        )
        self.cluster.csi.unpublish(volume_id, node.node_id)

    # -- checks ----------------------------------------------------------------------------

    def _wait_ack(
        self,
        node: KubeNode,
        *,
        accept: Callable[[int], bool],
        start: int = 0,
        count: int = 1,
    ) -> float:
        """Until `count` acknowledged records from console line `start` on, the last one
        accepted; fails at once on a reported error. Returns the host stamp of that record."""
        seen = 0

        def ok(m: re.Match[str]) -> bool:
            nonlocal seen
            if FAILURE.match(m.group(0)):
                raise ScenarioFailed(f"{node.name}: the workload reported {m.group(0)}")
            if not m.group(0).startswith("E2E-WL ACK"):
                return False
            seen += 1
            return seen >= count and accept(int(m.group(2)))

        _, line, _ = node.console.wait(
            r"^E2E-WL (ACK (\d+)$|IOERR|MISMATCH|FULL)", RECORD_TIMEOUT, start=start, accept=ok
        )
        return line.at

    def _summary_ok(self, node: KubeNode, summary: dict[str, Any]) -> None:
        self.log(f"   {node.name}'s workload: {summary}")
        check(summary["errors"] == 0, f"{node.name}: {summary['errors']} I/O errors")
        check(summary["mismatches"] == 0, f"{node.name}: {summary['mismatches']} bad read-backs")
        check(int(summary["acked"]) > 0, f"{node.name}: nothing acknowledged")

    def _reconnects(self, node: KubeNode, volume_id: str) -> float:
        return node.metric("nbdcsi_node_reconnects_total", volume=volume_id) or 0.0

    def _wait_reconnects(self, node: KubeNode, volume_id: str, at_least: int) -> float:
        return poll(
            lambda: self._reconnects(node, volume_id),
            lambda n: n >= at_least,
            RECORD_TIMEOUT,
            f"{node.name}: plugin reconnects",
            step=0.5,
        )

    def _no_failures(self) -> None:
        """No workload error on either console, and no kernel I/O error on a device the node
        plugin staged (the fenced leftover device's errors are the fence working)."""
        for name, node in self.nodes.items():
            lines = [ln.text for ln in node.console.snapshot()]
            bad = [t for t in lines if FAILURE.search(t)]
            for t in lines:
                m = KERNEL_IO_ERROR.search(t)
                if m and m.group(1) == self.devices.get(name):
                    bad.append(t)
            check(not bad, f"{name}: I/O errors: {bad[:5]}")

    def _host_check(self, volume_id: str, holder: str, last: int) -> None:
        """An attachment for the host, read with libnbd from the storage node's listener."""
        assert self.cluster is not None
        csi = self.cluster.csi
        context = csi.publish_context(volume_id, VERIFIER)
        port = self.cluster.nodes[holder].nbd_port
        try:
            length = (last + 1) * records.RECORD
            data = self._read(context[CTX_EXPORT], port, 0, length)
            bad = records.check(volume_id, 0, data)
            check(len(data) == length and not bad, f"records missing or wrong: {bad[:10]}")
            probe = self._read(context[CTX_EXPORT], port, records.probe_offset(VOLUME_SIZE), 4096)
            check(
                probe == records.probe_block(BEFORE_FENCE),
                f"the probe block holds {probe[:40]!r}, not the write made before the fence",
            )
        finally:
            csi.unpublish(volume_id, VERIFIER)
        self.log(f"   the host reads records 0..{last} intact; the fenced write did not land")

    def _read(self, export: str, port: int, offset: int, length: int) -> bytes:
        out = self.workdir / "readback.bin"
        done = subprocess.run(
            ["nbdsh", "-n", "-c", _READ],
            input=f"127.0.0.1\n{port}\n{export}\n{offset}\n{length}\n{out}\n",
            capture_output=True,
            text=True,
            timeout=600,
            env={"PATH": "/usr/bin:/bin"},
        )
        if done.returncode != 0:
            error = (done.stderr or done.stdout).replace(export, "<export>")
            raise ScenarioFailed(f"libnbd read of the volume failed: {error}")
        data = out.read_bytes()
        out.unlink()
        return data
