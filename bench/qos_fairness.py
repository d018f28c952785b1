"""Fair share between tenants: does a flooding tenant hurt another tenant's latency?

Starts a storage node (images on tmpfs), creates through the management API two volumes for
tenant "flood" and one for tenant "quiet", publishes them to 127.0.0.1, and runs fio's nbd
engine:
  1. quiet alone: 4k random reads at QD1 on its volume;
  2. the same while "flood" runs 4k random reads and writes at QD32 on both its volumes;
then prints quiet's mean and p99 completion latency in both cases and the ratio
(goal: mean within 2x). Repeats `--repeat` times alternating the two cases; medians.

    python bench/qos_fairness.py [--runtime 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.servers import free_port, start_storage_node

MiB = 1 << 20


def fio(
    uri: str, rw: str, depth: int, runtime: float, name: str, rwmix: int = 50
) -> subprocess.Popen[bytes]:
    argv = [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        "--bs=4k",
        f"--iodepth={depth}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--size=256M",
        "--output-format=json",
        f"--rwmixread={rwmix}",
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def result(proc: subprocess.Popen[bytes]) -> Any:
    out, _ = proc.communicate()
    text = out.decode()
    return json.loads(text[text.index("{") :])["jobs"][0]


def latency(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    clat = result(proc)["read"]["clat_ns"]
    return clat["mean"] / 1000, clat["percentile"]["99.000000"] / 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runtime", type=float, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--flood-iops", type=int, default=0, help="QoS IOPS limit on each flooding volume (0: none)"
    )
    args = p.parse_args()

    import grpc

    from storage_node.v1 import storage_node_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="nbd-qos-"))
    api_port = free_port()
    node = start_storage_node(
        work / "node", [], extra_args=["--api-listen", f"127.0.0.1:{api_port}"]
    )
    try:
        token = (work / "node" / "api-token").read_text().strip()
        md = [("authorization", f"Bearer {token}")]
        stub = pb_grpc.StorageNodeStub(grpc.insecure_channel(f"127.0.0.1:{api_port}"))
        uris = {}
        for name, tenant in (("flood-1", "flood"), ("flood-2", "flood"), ("quiet", "quiet")):
            vol = stub.CreateVolume(
                pb.CreateVolumeRequest(name=name, tenant=tenant, size_bytes=256 * MiB), metadata=md
            )
            att = stub.Publish(
                pb.PublishRequest(volume_id=vol.id, node_id="bench", node_address="127.0.0.1"),
                metadata=md,
            )
            uris[name] = att.uri
            if tenant == "flood" and args.flood_iops:
                stub.SetVolumeQos(
                    pb.SetVolumeQosRequest(volume_id=vol.id, qos=pb.Qos(iops=args.flood_iops)),
                    metadata=md,
                )
            subprocess.run(
                [
                    "fio",
                    "--name=fill",
                    "--ioengine=nbd",
                    f"--uri={att.uri}",
                    "--rw=write",
                    "--bs=1M",
                    "--size=256M",
                    "--iodepth=8",
                ],
                check=True,
                capture_output=True,
            )
        alone: list[tuple[float, float]] = []
        loaded: list[tuple[float, float]] = []
        flood_iops: list[float] = []
        for _ in range(args.repeat):
            alone.append(latency(fio(uris["quiet"], "randread", 1, args.runtime, "quiet")))
            floods = [
                fio(uris[n], "randrw", 32, args.runtime + 2, n) for n in ("flood-1", "flood-2")
            ]
            time.sleep(1)
            loaded.append(latency(fio(uris["quiet"], "randread", 1, args.runtime, "quiet")))
            flood_iops.append(
                sum(job["read"]["iops"] + job["write"]["iops"] for job in map(result, floods))
            )
        a_mean = statistics.median(x[0] for x in alone)
        l_mean = statistics.median(x[0] for x in loaded)
        a_p99 = statistics.median(x[1] for x in alone)
        l_p99 = statistics.median(x[1] for x in loaded)
        print(f"{'case':<28}{'mean us':>10}{'p99 us':>10}")
        print(f"{'quiet alone':<28}{a_mean:>10.1f}{a_p99:>10.1f}")
        print(f"{'quiet while flood QD32 x2':<28}{l_mean:>10.1f}{l_p99:>10.1f}")
        print(f"flood meanwhile: {statistics.median(flood_iops):.0f} IOPS on its two volumes")
        print(f"latency_ratio={l_mean / a_mean:.2f} (goal <= 2.0), p99_ratio={l_p99 / a_p99:.2f}")
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
