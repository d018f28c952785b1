"""The manifests users copy (docs/examples/), checked against Kubernetes and against the chart.

Owns: every file parses; built-in kinds validate with kubernetes-validate (strict) on the
oldest and newest Kubernetes the chart supports; TenantQuotas validate against the chart's CRD;
custom resources of KubeVirt, CDI and snapshot-controller carry the apiVersion their projects
publish; every class an example names (StorageClass, VolumeSnapshotClass,
VolumeAttributesClass) is one the chart creates; the VM is live-migratable (LiveMigrate on a
Block ReadWriteMany disk); the objects refer to each other correctly (the snapshot's PVC is
the VM's disk, restores and clones are at least their source's size); and the patch files,
applied to the VM's PVC as merge patches, give valid PVCs (the expansion grows it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.chart.render import CHART, Obj, crd_objects, render, validate
from tests.support.servers import REPO

EXAMPLES = REPO / "docs" / "examples"
KUBE_VERSIONS = ("1.30.0", "1.34.0")
PATCHES = {"expand-pvc.yaml", "change-qos-tier.yaml"}
CUSTOM_KINDS = {
    "VirtualMachine": "kubevirt.io/v1",
    "DataVolume": "cdi.kubevirt.io/v1beta1",
    "VolumeSnapshot": "snapshot.storage.k8s.io/v1",
    "VolumeGroupSnapshot": "groupsnapshot.storage.k8s.io/v1",
    "TenantQuota": "nbd.csi.dev/v1alpha1",
}

GIB = 1024**3


def gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2]) * GIB


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def examples() -> dict[str, list[Obj]]:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) == 9
    return {f.name: load(f) for f in files}


def objects(examples: dict[str, list[Obj]]) -> list[tuple[str, Obj]]:
    return [(name, o) for name, docs in examples.items() if name not in PATCHES for o in docs]


def by_kind(examples: dict[str, list[Obj]], kind: str) -> list[Obj]:
    return [o for _, o in objects(examples) if o["kind"] == kind]


@pytest.fixture(scope="module")
def chart_classes() -> dict[str, set[str]]:
    """Class names the chart creates: defaults, plus the QoS tiers and the group snapshot
    class when they are turned on."""
    rendered = render(
        {
            "volumeAttributesClasses": {"enabled": True},
            "volumeGroupSnapshotClass": {"enabled": True},
        }
    )
    kinds = ("StorageClass", "VolumeSnapshotClass", "VolumeAttributesClass")
    return {
        kind: {o["metadata"]["name"] for o in rendered.all(kind)}
        for kind in (*kinds, "VolumeGroupSnapshotClass")
    }


def test_built_in_kinds_validate_strictly(examples: dict[str, list[Obj]]) -> None:
    problems = []
    checked = 0
    for name, obj in objects(examples):
        if obj["kind"] in CUSTOM_KINDS:
            continue
        checked += 1
        for version in KUBE_VERSIONS:
            problems += [f"{version} {name} {obj['kind']}: {p}" for p in validate(obj, version)]
    assert problems == []
    # 2 Namespaces, 2 PVCs, a ClusterRole, a RoleBinding and the encrypted StorageClass
    assert checked == 7


def test_custom_resources_have_their_projects_api_versions(examples: dict[str, list[Obj]]) -> None:
    kinds = set()
    for name, obj in objects(examples):
        if obj["kind"] in CUSTOM_KINDS:
            assert obj["apiVersion"] == CUSTOM_KINDS[obj["kind"]], name
            kinds.add(obj["kind"])
    assert kinds == set(CUSTOM_KINDS)


def test_tenant_quota_validates_against_the_chart_crd(examples: dict[str, list[Obj]]) -> None:
    (crd,) = (o for o in crd_objects() if o["kind"] == "CustomResourceDefinition")
    (version,) = crd["spec"]["versions"]
    validator = jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])
    (quota,) = by_kind(examples, "TenantQuota")
    assert [e.message for e in validator.iter_errors(quota)] == []
    assert quota["metadata"]["namespace"] == "team-a"
    assert set(quota["spec"]) == {"capacity", "volumes", "snapshots", "iops", "bandwidth"}


def storage_of(dv: Obj) -> Obj:
    spec: Obj = dv["spec"].get("storage") or dv["spec"]["pvc"]
    return spec


def claims(examples: dict[str, list[Obj]]) -> list[Obj]:
    """Every PVC-like spec: PVCs, DataVolumes and the VM's dataVolumeTemplates."""
    out = [o["spec"] for o in by_kind(examples, "PersistentVolumeClaim")]
    out += [storage_of(dv) for dv in by_kind(examples, "DataVolume")]
    for vm in by_kind(examples, "VirtualMachine"):
        out += [storage_of(t) for t in vm["spec"].get("dataVolumeTemplates", [])]
    return out


def test_every_class_named_is_one_the_chart_creates(
    examples: dict[str, list[Obj]], chart_classes: dict[str, set[str]]
) -> None:
    specs = claims(examples)
    assert len(specs) >= 5
    own = {o["metadata"]["name"] for o in by_kind(examples, "StorageClass")}
    assert not own & chart_classes["StorageClass"], "an example's class shadows the chart's"
    for spec in specs:
        assert spec["storageClassName"] in chart_classes["StorageClass"] | own, spec
        # On the block class, the modes KubeVirt needs for live migration.
        if spec["storageClassName"] == "nbd-block-rwx":
            assert spec["volumeMode"] == "Block" and spec["accessModes"] == ["ReadWriteMany"]
    for snap in by_kind(examples, "VolumeSnapshot"):
        assert snap["spec"]["volumeSnapshotClassName"] in chart_classes["VolumeSnapshotClass"]
    for group in by_kind(examples, "VolumeGroupSnapshot"):
        name = group["spec"]["volumeGroupSnapshotClassName"]
        assert name in chart_classes["VolumeGroupSnapshotClass"]
    (tier_patch,) = load(EXAMPLES / "change-qos-tier.yaml")
    tier = tier_patch["spec"]["volumeAttributesClassName"]
    assert tier in chart_classes["VolumeAttributesClass"]


def vm_and_disk(examples: dict[str, list[Obj]], name: str = "debian-vm") -> tuple[Obj, Obj]:
    (vm,) = (o for o in by_kind(examples, "VirtualMachine") if o["metadata"]["name"] == name)
    (disk,) = vm["spec"]["dataVolumeTemplates"]
    return vm, disk


def test_encrypted_class_takes_its_key_from_the_pvc_namespace(
    examples: dict[str, list[Obj]],
) -> None:
    """docs/csi-node.md, "Encrypted volumes": `encrypted` plus node-stage secrets; no key in
    the example itself (everyone would share it)."""
    (sc,) = by_kind(examples, "StorageClass")
    assert sc["provisioner"] == "nbd.csi.dev"
    assert sc["parameters"] == {
        "encrypted": "true",
        "csi.storage.k8s.io/node-stage-secret-name": "nbd-encryption-key",
        "csi.storage.k8s.io/node-stage-secret-namespace": "${pvc.namespace}",
    }
    assert by_kind(examples, "Secret") == []
    _, disk = vm_and_disk(examples, "encrypted-vm")
    assert storage_of(disk)["storageClassName"] == sc["metadata"]["name"]


def test_the_group_snapshot_selects_every_disk_of_its_vm(examples: dict[str, list[Obj]]) -> None:
    """The selector matches the labels CDI copies from each DataVolume to its PVC: every disk
    of the VM, nothing else of the examples."""
    (group,) = by_kind(examples, "VolumeGroupSnapshot")
    selector = group["spec"]["source"]["selector"]["matchLabels"]
    vms = {v["metadata"]["name"]: v for v in by_kind(examples, "VirtualMachine")}
    vm = vms["db-vm"]
    assert vm["metadata"]["namespace"] == group["metadata"]["namespace"]
    templates = vm["spec"]["dataVolumeTemplates"]
    assert len(templates) == 2
    for t in templates:
        assert selector.items() <= t["metadata"].get("labels", {}).items(), t["metadata"]["name"]
    disks = {v["dataVolume"]["name"] for v in vm["spec"]["template"]["spec"]["volumes"]}
    assert disks == {t["metadata"]["name"] for t in templates}
    others = [
        o
        for _, o in objects(examples)
        if o is not vm and selector.items() <= o.get("metadata", {}).get("labels", {}).items()
    ]
    assert others == []


@pytest.mark.parametrize("vm_name", ["debian-vm", "encrypted-vm"])
def test_vm_is_live_migratable(examples: dict[str, list[Obj]], vm_name: str) -> None:
    vm, disk = vm_and_disk(examples, vm_name)
    template = vm["spec"]["template"]["spec"]
    assert template["evictionStrategy"] == "LiveMigrate"
    storage = storage_of(disk)
    assert storage["accessModes"] == ["ReadWriteMany"] and storage["volumeMode"] == "Block"
    volumes = {v["name"]: v for v in template["volumes"]}
    disks = {d["name"] for d in template["domain"]["devices"]["disks"]}
    assert disks == set(volumes)
    assert volumes["root"]["dataVolume"]["name"] == disk["metadata"]["name"]
    assert vm["metadata"]["namespace"] == "team-a"


def test_snapshot_restore_and_clones_refer_to_real_sources(examples: dict[str, list[Obj]]) -> None:
    _, disk = vm_and_disk(examples)
    disk_size = gib(storage_of(disk)["resources"]["requests"]["storage"])
    (snap,) = by_kind(examples, "VolumeSnapshot")
    assert snap["spec"]["source"]["persistentVolumeClaimName"] == disk["metadata"]["name"]
    pvcs = {o["metadata"]["name"]: o for o in by_kind(examples, "PersistentVolumeClaim")}
    restored = pvcs["debian-vm-disk-restored"]
    assert restored["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": snap["metadata"]["name"],
    }
    assert restored["metadata"]["namespace"] == snap["metadata"]["namespace"]
    assert gib(restored["spec"]["resources"]["requests"]["storage"]) >= disk_size
    # The golden image and its clones.
    dvs = {o["metadata"]["name"]: o for o in by_kind(examples, "DataVolume")}
    golden = dvs["debian-12"]
    golden_size = gib(storage_of(golden)["resources"]["requests"]["storage"])
    clone = dvs["web-1-disk"]
    assert clone["spec"]["source"]["pvc"] == {
        "namespace": golden["metadata"]["namespace"],
        "name": golden["metadata"]["name"],
    }
    assert gib(storage_of(clone)["resources"]["requests"]["storage"]) >= golden_size
    copy_pvc = pvcs["debian-12-copy"]
    assert copy_pvc["metadata"]["namespace"] == golden["metadata"]["namespace"]
    assert copy_pvc["spec"]["dataSource"] == {
        "kind": "PersistentVolumeClaim",
        "name": golden["metadata"]["name"],
    }
    assert gib(copy_pvc["spec"]["resources"]["requests"]["storage"]) >= golden_size
    # CDI's clone permission is granted in the source namespace to the target's account.
    (binding,) = by_kind(examples, "RoleBinding")
    assert binding["metadata"]["namespace"] == golden["metadata"]["namespace"]
    (role,) = by_kind(examples, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["cdi.kubevirt.io"], "resources": ["datavolumes/source"], "verbs": ["create"]}
    ]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` sends)."""
    if not isinstance(patch, dict):
        return patch
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@pytest.mark.parametrize("patch_file", sorted(PATCHES))
def test_patches_give_valid_pvcs(examples: dict[str, list[Obj]], patch_file: str) -> None:
    vm, disk = vm_and_disk(examples)
    # The PVC CDI makes for the VM's disk, as the patches find it.
    pvc: Obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": disk["metadata"]["name"], "namespace": vm["metadata"]["namespace"]},
        "spec": copy.deepcopy(storage_of(disk)),
    }
    (patch,) = examples[patch_file]
    patched = merge_patch(pvc, patch)
    assert validate(patched, "1.34.0") == []
    # The patch changes only what it is for.
    changed = {k for k in patched["spec"] if patched["spec"][k] != pvc["spec"].get(k)}
    if patch_file == "expand-pvc.yaml":
        assert changed == {"resources"}
        before = gib(pvc["spec"]["resources"]["requests"]["storage"])
        assert gib(patched["spec"]["resources"]["requests"]["storage"]) > before
    else:
        assert changed == {"volumeAttributesClassName"}


def test_examples_readme_lists_every_file() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLES.glob("*.yaml"):
        assert f"`{path.name}`" in readme, path.name
    assert CHART.is_dir()
