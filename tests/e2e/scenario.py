"""The end-to-end proof (docs/e2e.md): CSI calls in the sidecars' order, real VMs on the volumes.

Owns the scenario that both `scripts/e2e.py` and tests/e2e/test_e2e.py run, step by step,
printing each step and its time. Everything is a real process on 127.0.0.1: two storage nodes,
the CSI controller, the Kubernetes API stand-in with the tenant's TenantQuota, Prometheus, and
qemu-system-x86_64 (TCG) guests whose disk is the CSI volume, reached with QEMU's own NBD
client using the credential from publish_context (QEMU plays kubelet's node side here).

1. two storage nodes, one tenant with a quota;
2. a golden volume filled with a bootable guest disk the way CDI's importer fills a PVC
   (ControllerPublishVolume, `qemu-img convert` onto the NBD export, ControllerUnpublishVolume);
   the VM's volume cloned from it (CSI volume source, CDI's csi-clone); the VM boots from it on
   node A, writes seed data, records its checksum and runs a write/verify loop;
3. live migration: publish to node B, destination QEMU with `-incoming`, migrate; unpublish A:
   A's open connection and its export name are refused from then on;
4. snapshot while the guest writes; a volume restored from it boots a second VM, which checks
   the seed and that every ring slot matches one point in time between the calls;
5. ControllerExpandVolume while the guest runs; the guest sees the new size;
6. the next CreateVolume passes the quota: RESOURCE_EXHAUSTED; Prometheus shows usage = limit;
7. the volume's storage node restarts during guest I/O (SIGTERM, then SIGKILL of its whole
   process tree), on the same data directory and ports: no I/O error in the guest;
end: the VM boots once more from the volume and finds every write it had acknowledged.

Timings are host-side: monotonic stamps of calls and of the guest's console lines.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.e2e.cluster import Cluster, StaleAttachment
from tests.e2e.guest_disk import DATA_START, DISK_SIZE, build_disk, missing_tools
from tests.e2e.qemu import NbdTarget, Vm
from tests.support.api import poll
from tests.vm.guest import find_kernel, missing_prerequisites

MiB = 1024 * 1024
TENANT = "e2e-tenant"
NODE_A = "node-a@127.0.0.1"
NODE_B = "node-b@127.0.0.1"
GROWN_SIZE = DISK_SIZE + 32 * MiB
# golden + VM disk (after expansion) + snapshot + restored volume: the tenant ends at its limit.
QUOTA_BYTES = DISK_SIZE + GROWN_SIZE + DISK_SIZE + DISK_SIZE
QUOTA = {"capacity": str(QUOTA_BYTES), "volumes": 10, "snapshots": 10}
# A block of the data partition the guest never touches (guest_init.sh's layout): where the
# fenced client's write would land if the fence did not hold.
UNUSED_OFFSET = DATA_START + 1536 * 4096
BOOT_TIMEOUT = 180.0
STEADY_RECORDS = 5  # records the guest must complete to count as "keeps running"

TOOLS = (
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("nbdsh", "libnbd-bin"),
    ("prometheus", "prometheus"),
)
REC = r"^E2E REC (\d+)$"
FAILURE = re.compile(r"E2E (IOERR|MISMATCH)|I/O error|Buffer I/O|EXT4-fs error|Kernel panic")


class ScenarioFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


def missing() -> str | None:
    """Why the scenario cannot run on this machine, or None."""
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    return missing_prerequisites() or missing_tools()


@dataclass
class Report:
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(k) for k in self.timings) if self.timings else 10
        rows = [f"  {k:<{width}}  {v:8.2f} s" for k, v in self.timings.items()]
        facts = [f"  {k}: {v}" for k, v in self.facts.items()]
        return "\n".join(["timings:", *rows, "facts:", *facts])


class Steps:
    """Printing steps and timings as a scenario goes (both scenarios share it)."""

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say
        self.report = Report()
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:7.2f}s] {text}")

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.log(f"== {title}")
        start = time.monotonic()
        yield
        self.log(f"== {title}: done in {time.monotonic() - start:.2f}s")

    def timed(self, name: str, seconds: float) -> float:
        self.report.timings[name] = seconds
        self.log(f"   {name}: {seconds:.2f}s")
        return seconds


class Scenario(Steps):
    def __init__(self, workdir: Path, say: Callable[[str], None] = print) -> None:
        super().__init__(say)
        self.workdir = workdir
        self.cluster: Cluster | None = None
        self.vms: list[Vm] = []
        self.stale: StaleAttachment | None = None

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        try:
            self._run()
        finally:
            self.close()
        return self.report

    def close(self) -> None:
        if self.stale is not None:
            self.stale.close()
        for vm in self.vms:
            vm.kill()
        if self.cluster is not None:
            self.cluster.stop()

    def _run(self) -> None:
        with self.step("1. two storage nodes, the CSI controller, a tenant with a quota"):
            start = time.monotonic()
            self.cluster = cluster = Cluster(self.workdir / "cluster", TENANT, QUOTA).start()
            self.timed("start storage nodes + controller", time.monotonic() - start)
            self.log(f"   TenantQuota {TENANT}: {QUOTA}")
            start = time.monotonic()
            disk = build_disk(self.workdir / "guest", find_kernel())
            self.timed("build bootable guest disk", time.monotonic() - start)
        csi = cluster.csi

        with self.step("2. golden image, clone, boot a VM on node A"):
            start = time.monotonic()
            golden = csi.create_volume("golden-e2e-guest", DISK_SIZE)
            importer = csi.publish(golden, NODE_A)
            self._import(disk, importer)
            csi.unpublish(golden, NODE_A)
            self.timed("golden image import (CDI importer)", time.monotonic() - start)
            self.log(f"   golden volume {golden}")
            start = time.monotonic()
            volume = csi.create_volume("vm-disk", DISK_SIZE, source_volume=golden)
            self.timed("clone from golden (csi-clone)", time.monotonic() - start)
            self.log(f"   VM volume {volume}")
            target_a = csi.publish(volume, NODE_A)
            vm_a = self._vm("vm-on-node-a")
            vm_a.attach_disk(target_a)
            booted = time.monotonic()
            vm_a.boot()
            _, line, _ = vm_a.console.wait(r"^E2E BOOTED", BOOT_TIMEOUT)
            self.timed("boot (firmware to guest init)", line.at - booted)
            _, _, m = vm_a.console.wait(r"^E2E SEED ([0-9a-f]{32})$", BOOT_TIMEOUT)
            seed = m.group(1)
            _, line, _ = vm_a.console.wait(REC, BOOT_TIMEOUT)
            self.timed("boot to first verified write", line.at - booted)
            self.report.facts["seed md5"] = seed

        with self.step("3. live migration from node A to node B"):
            target_b = csi.publish(volume, NODE_B)
            check(target_b.export != target_a.export, "node B got node A's export name")
            vm_b = self._vm("vm-on-node-b", incoming=True)
            vm_b.attach_disk(target_b)
            port = vm_b.listen_incoming()
            info = vm_a.migrate(port)
            downtime = float(info.get("downtime", -1)) / 1000
            self.timed("migration total", float(info.get("total-time", -1)) / 1000)
            self.timed("migration downtime (QEMU)", downtime)
            _, first_b, m = vm_b.console.wait(REC, 60)
            last_a = [ln for ln in vm_a.console.snapshot() if re.match(REC, ln.text)][-1]
            self.timed("guest write pause across migration", first_b.at - last_a.at)
            check(vm_b.status() == "running", f"destination is {vm_b.status()}")
            self.log(f"   guest continues on node B at record {m.group(1)}")
            self._no_failures(vm_a)
            vm_a.quit()
            self.vms.remove(vm_a)
            self.stale = StaleAttachment(target_a, UNUSED_OFFSET)
            before = len(vm_b.console)
            csi.unpublish(volume, NODE_A)
            write = self.stale.ask("write")
            connect = self.stale.ask("connect")
            self.log(f"   after unpublish A: write on A's connection: {write}")
            self.log(f"   after unpublish A: new connection with A's export: {connect}")
            check(write.startswith("refused"), f"write from A after unpublish: {write}")
            check(connect.startswith("refused"), f"connect with A's export: {connect}")
            self.stale.close()
            self.stale = None
            self._steady(vm_b, before)
            # The guest would not notice a dropped connection (QEMU reconnects): ask QEMU.
            check(vm_b.reconnects() == 0, "unpublishing node A dropped node B's connection")
            self.log("   node B's connection untouched (QEMU made no reconnect)")
            self.report.facts["fence"] = f"write: {write}; reconnect: {connect}"

        with self.step("4. snapshot while the guest writes, restore, boot a second VM"):
            low = self._last_record(vm_b)
            start = time.monotonic()
            snapshot = csi.create_snapshot("vm-disk-snap", volume)
            self.timed("snapshot (guest running)", time.monotonic() - start)
            # Let the console catch up by one line: `high` may then be later than the snapshot
            # point, never earlier (the bound is loose on that side, strict on the other).
            vm_b.console.wait(REC, 60, start=len(vm_b.console))
            high = self._last_record(vm_b)
            self.log(f"   snapshot {snapshot} taken between records {low} and {high}")
            start = time.monotonic()
            restored = csi.create_volume("vm-disk-restored", DISK_SIZE, source_snapshot=snapshot)
            self.timed("volume from snapshot", time.monotonic() - start)
            target_r = csi.publish(restored, NODE_A)
            vm_r = self._vm("vm-restored")
            vm_r.attach_disk(target_r)
            booted = time.monotonic()
            vm_r.boot()
            point = self._verify_boot(vm_r, seed)
            self.timed("restored VM boot + verification", time.monotonic() - booted)
            check(
                low <= point <= high + 1,
                f"snapshot point {point} outside the records around the call ({low}..{high})",
            )
            self.report.facts["snapshot point"] = f"record {point} (calls between {low}, {high})"
            vm_r.quit()
            self.vms.remove(vm_r)
            csi.unpublish(restored, NODE_A)

        with self.step("5. expand the volume online"):
            start = time.monotonic()
            node_side = csi.expand(volume, GROWN_SIZE)
            self.timed("ControllerExpandVolume", time.monotonic() - start)
            vm_b.grow_disk(target_b, GROWN_SIZE)
            _, line, _ = vm_b.console.wait(
                r"^E2E SIZE (\d+)$", 60, accept=lambda m: int(m.group(1)) == GROWN_SIZE
            )
            self.timed("expansion until the guest sees it", line.at - start)
            self.log(f"   guest sees {GROWN_SIZE // MiB} MiB (node_expansion_required={node_side})")
            self._steady(vm_b, len(vm_b.console))

        with self.step("6. over quota: RESOURCE_EXHAUSTED, Prometheus shows usage at the limit"):
            try:
                csi.create_volume("one-too-many", DISK_SIZE)
            except grpc.RpcError as exc:
                code, message = exc.code(), exc.details() or ""
            else:
                raise ScenarioFailed("CreateVolume over the quota succeeded")
            self.log(f"   {code.name}: {message}")
            check(code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"over quota: {code.name}")
            check(TENANT in message, f"the refusal does not name the tenant: {message}")
            self.report.facts["quota refusal"] = message
            self._prometheus_at_limit()

        with self.step("7. restart the storage node during guest I/O"):
            node = cluster.storage_node_of(volume)
            self.log(f"   storage node {volume.partition(':')[0]} holds the VM's volume")
            before = len(vm_b.console)
            start = time.monotonic()
            node.restart()
            self.timed("storage node restart (SIGTERM + start)", time.monotonic() - start)
            # Writes counted from when the new node is up: until its workers are told to stop,
            # the old node keeps serving, so records made during the restart prove nothing.
            self._steady(vm_b, len(vm_b.console))
            self.timed("guest write blackout (restart)", self._largest_gap(vm_b, before))
            check(vm_b.reconnects() >= 1, "QEMU never reconnected: the restart missed the I/O")
            before = len(vm_b.console)
            start = time.monotonic()
            node.kill_tree()
            node.start()
            self.timed("storage node crash (SIGKILL) + start", time.monotonic() - start)
            self._steady(vm_b, len(vm_b.console))
            self.timed("guest write blackout (crash)", self._largest_gap(vm_b, before))
            check(vm_b.reconnects() >= 2, "QEMU did not reconnect after the crash")
            self.report.facts["reconnects"] = f"QEMU's NBD client reconnected {vm_b.reconnects()}x"

        with self.step("end: no I/O error at any time; every acknowledged write is on the volume"):
            self._no_failures(vm_b, include=[*self.vms])
            vm_b.quit()
            self.vms.remove(vm_b)
            vm_b.console.wait_closed(30)
            last = self._last_record(vm_b)
            # The VM starts again on node B (same attachment): its init checks the seed and the
            # ring, so every write acknowledged before the quit must be there, after the
            # migration, the expansion, the restart and the crash.
            vm_v = self._vm("vm-verify")
            vm_v.attach_disk(target_b)
            booted = time.monotonic()
            vm_v.boot()
            point = self._verify_boot(vm_v, seed)
            self.timed("verification boot", time.monotonic() - booted)
            check(
                last <= point <= last + 1,
                f"the volume holds records up to {point}; the guest had completed {last}",
            )
            self.log(f"   seed intact, ring complete up to record {point} (last verified {last})")
            vm_v.quit()
            self.vms.remove(vm_v)
            csi.unpublish(volume, NODE_B)
            self.report.facts["final check"] = f"records up to {point} of {last} acknowledged"

    # -- helpers ---------------------------------------------------------------------------

    def _vm(self, name: str, incoming: bool = False) -> Vm:
        vm = Vm(name, self.workdir / "vms" / name, incoming=incoming)
        self.vms.append(vm)
        return vm

    def _import(self, disk: Path, target: NbdTarget) -> None:
        """CDI's importer: qemu-img convert onto the published volume (-n: it exists)."""
        uri = f"nbd://{target.host}:{target.port}/{target.export}"
        done = subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(disk), uri],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            error = (done.stderr or done.stdout).replace(target.export, "<export>")
            raise ScenarioFailed(f"qemu-img convert onto the golden volume failed: {error}")

    def _verify_boot(self, vm: Vm, seed: str) -> int:
        """A later boot's own checks (guest_init.sh): the seed, and every ring slot at one
        point in time. Returns that point: the last record on the volume."""
        _, _, m = vm.console.wait(r"^E2E SEED-CHECK expected=(\S+) actual=(\S+)$", BOOT_TIMEOUT)
        check(
            m.group(1) == m.group(2) == seed,
            f"{vm.name}: seed header {m.group(1)}, seed data {m.group(2)}, written {seed}",
        )
        _, _, m = vm.console.wait(r"^E2E RING max=(-?\d+) bad=(\d+)$", BOOT_TIMEOUT)
        point, bad = int(m.group(1)), int(m.group(2))
        self.log(f"   {vm.name}: ring up to record {point}, {bad} slots off that point")
        check(bad == 0, f"{vm.name}: {bad} ring slots do not match record {point}")
        return point

    def _last_record(self, vm: Vm) -> int:
        records = [int(m.group(1)) for ln in vm.console.snapshot() if (m := re.match(REC, ln.text))]
        return records[-1] if records else -1

    def _steady(self, vm: Vm, start: int) -> None:
        """The guest completes more verified writes from console line `start` on, error-free."""
        vm.console.wait(
            REC, 120, start=start, accept=lambda m: self._records_since(vm, start) >= STEADY_RECORDS
        )
        self._no_failures(vm)

    def _records_since(self, vm: Vm, start: int) -> int:
        return sum(1 for ln in vm.console.snapshot()[start:] if re.match(REC, ln.text))

    def _largest_gap(self, vm: Vm, start: int) -> float:
        stamps = [ln.at for ln in vm.console.snapshot()[start - 1 :] if re.match(REC, ln.text)]
        return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)

    def _no_failures(self, vm: Vm, include: list[Vm] | None = None) -> None:
        for each in [vm, *(include or [])]:
            bad = [ln.text for ln in each.console.snapshot() if FAILURE.search(ln.text)]
            check(not bad, f"{each.name}: the guest reported I/O errors: {bad[:5]}")
            events = each.io_error_events()
            check(not events, f"{each.name}: QEMU reported BLOCK_IO_ERROR: {events[:3]}")

    def _prometheus_at_limit(self) -> None:
        assert self.cluster is not None and self.cluster.prometheus is not None
        prom = self.cluster.prometheus
        start = time.monotonic()
        used_q = f'nbdcsi_tenant_quota_used{{tenant="{TENANT}",resource="capacity_bytes"}}'
        limit_q = f'nbdcsi_tenant_quota_limit{{tenant="{TENANT}",resource="capacity_bytes"}}'
        nodes_q = f'sum(nbdcsi_tenant_provisioned_bytes{{tenant="{TENANT}"}})'
        limit = prom.wait_value(limit_q, lambda v: v is not None)
        used = prom.wait_value(used_q, lambda v: v == limit)
        on_nodes = prom.wait_value(nodes_q, lambda v: v == limit)
        self.timed("Prometheus shows usage at the limit", time.monotonic() - start)
        self.log(
            f"   Prometheus: quota_used {used:.0f} = quota_limit {limit:.0f} bytes; "
            f"storage nodes' provisioned bytes sum to {on_nodes:.0f}"
        )
        check(limit == QUOTA_BYTES, f"quota limit {limit}, expected {QUOTA_BYTES}")
        kube = self.cluster.kube
        assert kube is not None
        quota = poll(
            lambda: kube.get("nbd.csi.dev/v1alpha1", "TenantQuota", TENANT, "storage") or {},
            lambda q: (q.get("status") or {}).get("used", {}).get("capacityBytes") == QUOTA_BYTES,
            45,
            "TenantQuota status",
            step=0.2,
        )
        self.log(f"   TenantQuota {TENANT}/storage status.used: {quota['status']['used']}")
        self.report.facts["prometheus"] = f"{used_q} = {limit_q} = {limit:.0f}"
