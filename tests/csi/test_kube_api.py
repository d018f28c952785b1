"""The Kubernetes API stand-in (tests/support/kube_api.py), driven by the official client.

Owns the proof that the stand-in behaves like an API server where the controller depends on
it: the `kubernetes` client reaches it through a kubeconfig; TenantQuota objects keep status
and spec apart (the status subresource); resourceVersion, generation and uid behave; errors
come back as the client's ApiException with the right HTTP status; EndpointSlices are listed
by service label; every request is logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.support.kube_api import KubeApi, endpoint_slice, tenant_quota

GROUP, VERSION, PLURAL = "nbd.csi.dev", "v1alpha1", "tenantquotas"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


@pytest.fixture(scope="module")
def api_client(kube: KubeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = kube.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
    api = config.new_client_from_config(config_file=str(path))
    yield api
    api.close()


@pytest.fixture
def custom(api_client: Any) -> Any:
    return client.CustomObjectsApi(api_client)


def error_status(exc_info: pytest.ExceptionInfo[ApiException]) -> int:
    return int(exc_info.value.status)


def test_create_list_get_through_kubeconfig(kube: KubeApi, custom: Any) -> None:
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "team-a", PLURAL, tenant_quota("team-a", capacity="10Gi", volumes=3)
    )
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"].endswith("Z")
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, "team-a", PLURAL)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["storage"]
    assert custom.get_namespaced_custom_object(GROUP, VERSION, "team-a", PLURAL, "storage") == (
        created
    )
    everywhere = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert "team-a" in {i["metadata"]["namespace"] for i in everywhere["items"]}
    assert ("GET", f"/apis/{GROUP}/{VERSION}/namespaces/team-a/{PLURAL}") in kube.requests


def test_status_patch_changes_only_status(kube: KubeApi, custom: Any) -> None:
    kube.put(tenant_quota("team-b", volumes=5))
    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "team-b", PLURAL, "storage",
        {"spec": {"volumes": 99}, "status": {"used": {"volumes": 2}, "observedGeneration": 1}},
    )  # fmt: skip
    assert patched["status"]["used"] == {"volumes": 2}
    assert patched["spec"] == {"volumes": 5}, "a status patch must not change spec"
    assert patched["metadata"]["generation"] == 1
    path = f"/apis/{GROUP}/{VERSION}/namespaces/team-b/{PLURAL}/storage/status"
    assert ("PATCH", path) in kube.requests


def test_object_patch_never_changes_status_and_bumps_generation(kube: KubeApi, custom: Any) -> None:
    stored = kube.put({**tenant_quota("team-c", volumes=5), "status": {"used": {"volumes": 1}}})
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "team-c", PLURAL, "storage",
        {"spec": {"volumes": 6}, "status": {"used": {"volumes": 42}}},
    )  # fmt: skip
    assert patched["spec"] == {"volumes": 6}
    assert patched["status"] == {"used": {"volumes": 1}}
    assert patched["metadata"]["generation"] == 2
    assert int(patched["metadata"]["resourceVersion"]) > int(stored["metadata"]["resourceVersion"])
    # A label change is metadata: no new generation.
    relabelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "team-c", PLURAL, "storage", {"metadata": {"labels": {"a": "b"}}}
    )
    assert relabelled["metadata"]["generation"] == 2


def test_json_patch(kube: KubeApi, custom: Any) -> None:
    kube.put(tenant_quota("team-d", volumes=5, iops=100))
    ops = [
        {"op": "replace", "path": "/spec/volumes", "value": 7},
        {"op": "remove", "path": "/spec/iops"},
        {"op": "add", "path": "/spec/snapshots", "value": 3},
    ]
    # This client sends merge patches unless told otherwise, lists included.
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "team-d", PLURAL, "storage", ops,
        _content_type="application/json-patch+json",
    )  # fmt: skip
    assert patched["spec"] == {"volumes": 7, "snapshots": 3}


def test_replace_with_stale_resource_version_conflicts(kube: KubeApi, custom: Any) -> None:
    first = kube.put(tenant_quota("team-e", volumes=1))
    custom.replace_namespaced_custom_object(
        GROUP, VERSION, "team-e", PLURAL, "storage", {**first, "spec": {"volumes": 2}}
    )
    with pytest.raises(ApiException) as exc_info:
        custom.replace_namespaced_custom_object(
            GROUP, VERSION, "team-e", PLURAL, "storage", {**first, "spec": {"volumes": 3}}
        )
    assert error_status(exc_info) == 409
    assert '"reason": "Conflict"' in str(exc_info.value.body)
    stored = kube.get(f"{GROUP}/{VERSION}", "TenantQuota", "team-e", "storage")
    assert stored is not None and stored["spec"] == {"volumes": 2}


@pytest.mark.parametrize(
    ("call", "status"),
    [
        pytest.param(
            lambda c: c.get_namespaced_custom_object(GROUP, VERSION, "nowhere", PLURAL, "x"),
            404, id="get-missing",
        ),
        pytest.param(
            lambda c: c.delete_namespaced_custom_object(GROUP, VERSION, "nowhere", PLURAL, "x"),
            404, id="delete-missing",
        ),
        pytest.param(
            lambda c: c.create_namespaced_custom_object(
                GROUP, VERSION, "team-f", PLURAL, tenant_quota("team-f", volumes="many")
            ),
            422, id="invalid-spec",
        ),
        pytest.param(
            lambda c: c.patch_namespaced_custom_object(
                GROUP, VERSION, "team-a", PLURAL, "storage", {"spec": {"volumes": -1}}
            ),
            422, id="invalid-patch",
        ),
        pytest.param(
            lambda c: c.create_namespaced_custom_object(
                GROUP, VERSION, "team-a", PLURAL, tenant_quota("team-a")
            ),
            409, id="already-exists",
        ),
    ],
)  # fmt: skip
def test_errors_are_status_objects(custom: Any, call: Any, status: int) -> None:
    with pytest.raises(ApiException) as exc_info:
        call(custom)
    assert error_status(exc_info) == status
    assert '"kind": "Status"' in str(exc_info.value.body)


def test_wrong_token_is_401(kube: KubeApi, tmp_path: Path) -> None:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    path.write_text(path.read_text().replace(kube.token, "wrong"))
    api = config.new_client_from_config(config_file=str(path))
    try:
        with pytest.raises(ApiException) as exc_info:
            client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, PLURAL)
        assert error_status(exc_info) == 401
    finally:
        api.close()


def test_delete(kube: KubeApi, custom: Any) -> None:
    kube.put(tenant_quota("team-g"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "team-g", PLURAL, "storage")
    assert kube.get(f"{GROUP}/{VERSION}", "TenantQuota", "team-g", "storage") is None


def test_endpoint_slices_by_service(kube: KubeApi, api_client: Any) -> None:
    kube.put(endpoint_slice("storage", "nbd-storage", [("127.0.0.1", 7001)]))
    kube.put(endpoint_slice("storage", "nbd-storage", [("127.0.0.1", 7002)]))
    kube.put(endpoint_slice("storage", "other", [("127.0.0.1", 7003)]))
    slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(
        "storage", label_selector="kubernetes.io/service-name=nbd-storage"
    )
    found = []
    for s in slices.items:
        assert s.endpoints and s.ports
        for e in s.endpoints:
            assert e.conditions and e.conditions.ready
            found += [(e.addresses[0], p.port, p.name) for p in s.ports]
    assert sorted(found) == [("127.0.0.1", 7001, "api"), ("127.0.0.1", 7002, "api")]


def test_fields_the_crd_does_not_declare_are_pruned(kube: KubeApi, custom: Any) -> None:
    """As a real API server does with a structural schema (charts/nbd-csi/crds/)."""
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "team-h", PLURAL,
        {**tenant_quota("team-h", volumes=1, colour="blue"), "extra": 1},
    )  # fmt: skip
    assert created["spec"] == {"volumes": 1} and "extra" not in created
    patched = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "team-h", PLURAL, "storage", {"status": {"used": {"volumes": 1, "x": 2}}}
    )
    assert patched["status"] == {"used": {"volumes": 1}}
