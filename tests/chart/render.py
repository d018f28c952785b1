"""Render and lint the Helm chart (charts/nbd-csi) offline, and find things in what it renders.

Owns: rendering the chart with helm-python-sdk (Helm's own engine, no cluster, no helm binary)
for one set of values, parsing every rendered manifest into objects that remember their
template file, linting, validating objects with kubernetes-validate (strict) and, for the kinds
it has no schema of (custom resources of snapshot-controller, CDI, the Prometheus Operator),
with small JSON schemas written from their published definitions; and lookups the tests use
(objects by kind, containers, args, volumes).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.support.servers import REPO

CHART = REPO / "charts" / "nbd-csi"
NAMESPACE = "storage-system"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One rendering of the chart: its objects (with their template file) and NOTES.txt."""

    values: Obj
    release: str
    objects: list[tuple[str, Obj]]  # (template file name, object)
    notes: str

    def all(self, kind: str) -> list[Obj]:
        return [o for _, o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def find(self, kind: str, name: str) -> Obj | None:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        return found[0] if found else None

    def workload(self, component: str) -> Obj:
        """The Deployment or DaemonSet of a component (controller, node, storage-node)."""
        found = [
            o
            for _, o in self.objects
            if o["kind"] in ("Deployment", "DaemonSet")
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, component
        return found[0]


def render(values: Obj, release: str = "nbd") -> Rendered:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(
            values=copy.deepcopy(values), name=release, namespace=NAMESPACE, is_install=True
        )
    objects: list[tuple[str, Obj]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        name = Path(path).name
        if name == "NOTES.txt":
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((name, doc))
    return Rendered(values, release, objects, notes)


def lint(values: Obj, kube_version: str | None = None) -> list[str]:
    """`helm lint --strict`: every message at warning level or above."""
    report = helm.lint(
        CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version=kube_version
    )
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems + list(report.get("errors") or [])


def crd_objects() -> list[Obj]:
    out: list[Obj] = []
    for path in sorted((CHART / "crds").glob("*.yaml")):
        out.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


# ---- validation ---------------------------------------------------------------------------

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}


def _kind(api_version: str, kind: str, spec: Obj, top: Obj | None = None) -> Obj:
    """A strict schema of a whole object; `top` for kinds without spec (fields at top level)."""
    properties: Obj = {
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": METADATA,
    }
    required = ["apiVersion", "kind", "metadata"]
    if top is not None:
        properties |= top["properties"]
        required += top.get("required", [])
    else:
        properties["spec"] = spec
        required.append("spec")
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


# Facts from the published CRDs: snapshot.storage.k8s.io/v1 VolumeSnapshotClass and
# groupsnapshot.storage.k8s.io VolumeGroupSnapshotClass (kubernetes-csi/external-snapshotter),
# cdi.kubevirt.io/v1beta1 StorageProfile (CDI), monitoring.coreos.com/v1 ServiceMonitor and
# PrometheusRule (prometheus-operator), cert-manager.io/v1 Issuer and Certificate
# (cert-manager). Only the fields the chart uses are allowed: anything else is a typo the API
# server would drop or refuse.
def _snapshot_class(api_version: str, kind: str) -> Obj:
    """A VolumeSnapshotClass or VolumeGroupSnapshotClass: the same fields at the top level."""
    return _kind(
        api_version,
        kind,
        {},
        top={
            "required": ["driver", "deletionPolicy"],
            "properties": {
                "driver": {"type": "string"},
                "deletionPolicy": {"enum": ["Delete", "Retain"]},
                "parameters": STRING_MAP,
            },
        },
    )


GROUP_SNAPSHOT_VERSIONS = ("v1", "v1beta2", "v1beta1")
CUSTOM_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): _snapshot_class(
        "snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"
    ),
    **{
        (f"groupsnapshot.storage.k8s.io/{v}", "VolumeGroupSnapshotClass"): _snapshot_class(
            f"groupsnapshot.storage.k8s.io/{v}", "VolumeGroupSnapshotClass"
        )
        for v in GROUP_SNAPSHOT_VERSIONS
    },
    ("cdi.kubevirt.io/v1beta1", "StorageProfile"): _kind(
        "cdi.kubevirt.io/v1beta1",
        "StorageProfile",
        {
            "type": "object",
            "properties": {
                "claimPropertySets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["accessModes", "volumeMode"],
                        "properties": {
                            "accessModes": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "enum": [
                                        "ReadWriteOnce",
                                        "ReadOnlyMany",
                                        "ReadWriteMany",
                                        "ReadWriteOncePod",
                                    ]
                                },
                            },
                            "volumeMode": {"enum": ["Block", "Filesystem"]},
                        },
                        "additionalProperties": False,
                    },
                },
                "cloneStrategy": {"enum": ["copy", "snapshot", "csi-clone"]},
            },
            "additionalProperties": False,
        },
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _kind(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": STRING_MAP},
                    "additionalProperties": False,
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": DURATION,
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "sourceLabels": {
                                            "type": "array",
                                            "items": {
                                                "type": "string",
                                                "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$",
                                            },
                                        },
                                        "targetLabel": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "action": {"type": "string"},
                                    },
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
    ("cert-manager.io/v1", "Issuer"): _kind(
        "cert-manager.io/v1",
        "Issuer",
        {
            "type": "object",
            "oneOf": [{"required": ["selfSigned"]}, {"required": ["ca"]}],
            "properties": {
                "selfSigned": {"type": "object", "additionalProperties": False},
                "ca": {
                    "type": "object",
                    "required": ["secretName"],
                    "properties": {"secretName": {"type": "string", "minLength": 1}},
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    ),
    ("cert-manager.io/v1", "Certificate"): _kind(
        "cert-manager.io/v1",
        "Certificate",
        {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "isCA": {"type": "boolean"},
                "duration": {"type": "string", "pattern": r"^(\d+(h|m|s))+$"},
                "renewBefore": {"type": "string", "pattern": r"^(\d+(h|m|s))+$"},
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "server auth",
                            "client auth",
                            "digital signature",
                            "key encipherment",
                            "cert sign",
                        ]
                    },
                },
                "privateKey": {
                    "type": "object",
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                    "additionalProperties": False,
                },
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _kind(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [
                                        {"required": ["alert"]},
                                        {"required": ["record"]},
                                    ],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": STRING_MAP,
                                        "annotations": STRING_MAP,
                                    },
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    ),
}


def validate(obj: Obj, kube_version: str) -> list[str]:
    """Problems of one object: kubernetes-validate --strict, or our schema of its kind."""
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
        return []
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        schema = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            return [f"no schema for {obj['apiVersion']} {obj['kind']}"]
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(obj)
        ]


# ---- lookups in pod templates ----------------------------------------------------------------


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj, init: bool = False) -> dict[str, Obj]:
    spec = pod_spec(workload)
    return {c["name"]: c for c in spec.get("initContainers" if init else "containers", [])}


def args_of(container: Obj) -> dict[str, str]:
    """`--flag=value` arguments as a dict (flags without a value map to "")."""
    out: dict[str, str] = {}
    for arg in container.get("args", []):
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            out[flag] = value
    return out


def repeated_args(container: Obj, flag: str) -> list[str]:
    return [a.partition("=")[2] for a in container.get("args", []) if a.startswith(f"{flag}=")]


def volumes(workload: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in pod_spec(workload).get("volumes", [])}


def mounts(container: Obj) -> dict[str, Obj]:
    """mountPath -> volumeMount."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def mount_of(container: Obj, volume: str) -> Obj:
    found = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(found) == 1, (container["name"], volume)
    return found[0]


def ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def listen_port(address: str) -> int:
    """HOST:PORT -> PORT."""
    return int(address.rpartition(":")[2])


def iter_pod_workloads(rendered: Rendered) -> Iterator[Obj]:
    for _, obj in rendered.objects:
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield obj
