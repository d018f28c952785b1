"""The CSI controller bounds what it is given: QoS parameters, label values, ports.

Issue 12: an `iops` parameter of 3 MB of digits gave INTERNAL (decimal.Overflow), and a port
in non-ASCII digits was accepted. Parameters are parsed as ASCII quantities of at most 32
characters and at most 2^63 - 1; what becomes a storage node label is bounded there
(INVALID_ARGUMENT passes through); ports are ASCII digits 1-65535 in the options and in
publish_context. Through a real controller process and two real storage nodes.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from csi.attach import Target
from csi.v1 import csi_pb2 as pb

from .controller_fixtures import (
    BLOCK,
    CALL_TIMEOUT,
    MiB,
    Pool,
    expect_error,
    start_pool,
    stop_pool,
    unique_name,
)
from .plugin import run_plugin

MB = 1_000_000
PVC_NAME = "csi.storage.k8s.io/pvc/name"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = start_pool(tmp_path_factory.mktemp("pool"))
    try:
        yield p
    finally:
        stop_pool(p)


def create_request(parameters: dict[str, str], **kw: object) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(
        name=unique_name(),
        capacity_range=pb.CapacityRange(required_bytes=MiB, limit_bytes=MiB),
        volume_capabilities=[BLOCK],
        parameters=parameters,
        **kw,  # type: ignore[arg-type]
    )


def invalid(pool: Pool, request: pb.CreateVolumeRequest) -> str:
    error = expect_error(pool.controller.CreateVolume, request, grpc.StatusCode.INVALID_ARGUMENT)
    details = error.details() or ""
    assert len(details) < 1000, "the message must not echo the whole parameter"
    return details


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        pytest.param({"iops": "9" * (3 * MB)}, "at most 32 characters", id="iops-3MB-digits"),
        pytest.param({"bandwidth": "1" * 33}, "at most 32 characters", id="bandwidth-33-chars"),
        pytest.param({"iops": "9" * 20}, "larger than", id="iops-above-int64"),
        pytest.param({"iops": "\u0661\u0660\u0660"}, "not a quantity", id="iops-arabic-digits"),
        pytest.param({"iops": "\uff11\uff10"}, "not a quantity", id="iops-fullwidth-digits"),
        pytest.param({"k" * (3 * MB): "1"}, "unknown parameters", id="unknown-3MB-key"),
        pytest.param({PVC_NAME: "p" * (3 * MB)}, "at most 1024", id="label-3MB-value"),
    ],
)
def test_bad_parameters_are_invalid_argument(
    pool: Pool, parameters: dict[str, str], message: str
) -> None:
    request = create_request(parameters)
    assert message in invalid(pool, request)
    listed = pool.controller.ListVolumes(pb.ListVolumesRequest(), timeout=CALL_TIMEOUT)
    assert request.name not in {e.volume.volume_id for e in listed.entries}


def test_mutable_parameters_are_bounded_too(pool: Pool) -> None:
    assert "at most 32 characters" in invalid(
        pool, create_request({}, mutable_parameters={"iops": "9" * (3 * MB)})
    )
    volume = pool.create()
    expect_error(
        pool.controller.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"iops": "9" * (3 * MB)}
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert pool.sn_volume(volume.volume_id).qos.iops == 0


def test_the_largest_qos_values_are_accepted(pool: Pool) -> None:
    volume = pool.controller.CreateVolume(
        create_request({"iops": str((1 << 63) - 1), "bandwidth": "7Ei"}), timeout=CALL_TIMEOUT
    ).volume
    qos = pool.sn_volume(volume.volume_id).qos
    assert (qos.iops, qos.bytes_per_second) == ((1 << 63) - 1, 7 << 60)


@pytest.mark.parametrize("port", ["\u0661\u0660\u0668\u0661\u0660", "\uff11\uff10", "0", "65536"])
def test_ports_in_options_are_ascii_1_to_65535(port: str) -> None:
    result = run_plugin("--storage-node", f"a=127.0.0.1:{port}", "--storage-token-file", "t")
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr, result.stderr
    result = run_plugin("--metrics-listen", f"127.0.0.1:{port}")
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr, result.stderr


@pytest.mark.parametrize("port", ["\u0661\u0660\u0668\u0661\u0660", "\uff11\uff10", "0", "65536"])
def test_ports_in_publish_context_are_ascii_1_to_65535(port: str) -> None:
    context = {
        "nbd.csi.dev/host": "127.0.0.1",
        "nbd.csi.dev/port": port,
        "nbd.csi.dev/export": "vol-0123456789abcdef.credential",
    }
    with pytest.raises(ValueError, match=r"nbd\.csi\.dev/port"):
        Target.from_context(context)
    assert Target.from_context({**context, "nbd.csi.dev/port": "10809"}).port == 10809
