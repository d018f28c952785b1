"""The Helm chart (charts/nbd-csi), rendered offline with Helm's engine (docs/install.md).

Owns the proof that the chart renders, lints and is coherent, for the default values and for
sets that change what the templates branch on (another kubelet directory, monitoring and QoS
tiers on, each source of the storage API's TLS certificate and TLS off, an own token Secret, a
root storage node, optional objects off). For each set: `helm lint --strict` is clean; every
object validates with kubernetes-validate (strict) against the oldest and newest Kubernetes the
chart supports, or against the published schema facts of its custom kind; each template file
holds one object (one kind for the QoS tiers). Across objects: the socket the registrar
registers is the one the plugin listens on, under kubeletDir; the storage node Service's ports
are the ones the storage nodes listen on, and it is the Service the controller discovers nodes
from; the token Secret is mounted where the token file options point; the driver name is the
same everywhere; every ServiceAccount exists, and the one that talks to the API is bound to
what the plugin and sidecars need; ServiceMonitors select real Services and ports; the
PrometheusRule's job is the ServiceMonitor's. The CRD in crds/ matches docs/tenant-quotas.md
and validates its example.

Each values set is rendered once per module (fixtures), so the file runs in a few seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

import csi.config
import storage_node.config
from csi.config import DRIVER_NAME
from tests.chart.render import (
    CHART,
    NAMESPACE,
    Obj,
    Rendered,
    args_of,
    containers,
    crd_objects,
    iter_pod_workloads,
    lint,
    listen_port,
    mount_of,
    pod_spec,
    ports,
    render,
    repeated_args,
    validate,
    volumes,
)
from tests.support.servers import REPO

OLDEST_KUBE, NEWEST_KUBE = "1.30.0", "1.34.0"

VALUES_SETS: dict[str, Obj] = {
    "default": {},
    "monitoring-qos-certmanager": {
        "kubeletDir": "/var/lib/k0s/kubelet",
        "monitoring": {
            "storageNodeJob": "storage-nodes",
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
        "volumeAttributesClasses": {"enabled": True},
        "volumeGroupSnapshotClass": {"enabled": True},
        "storageNode": {
            "topology": {"topology.nbd.csi.dev/zone": "a"},
            "ports": {"nbd": 20809, "api": 20810, "metrics": 20811},
        },
        "node": {"topology": {"topology.nbd.csi.dev/zone": "a"}, "maxVolumes": 32},
        "storageClasses": {"blockRwx": {"parameters": {"iops": 3000, "bandwidth": "200Mi"}}},
        "tls": {"certManager": {"enabled": True}},
    },
    "tls-own-token-root": {
        "tls": {"secretName": "storage-api-tls", "serverName": "storage-api.example.com"},
        "apiToken": {"existingSecret": "my-storage-token"},
        "storageNode": {"runAsUser": 0, "nodeSelector": {"example.com/disks": "nvme"}},
        "node": {"loadNbdModule": False, "loadDmCryptModule": False},
        "cdi": {"storageProfile": {"enabled": False}},
        "volumeSnapshotClass": {"enabled": False},
        "storageClasses": {"filesystem": {"enabled": False}},
    },
    # The management API in plaintext: only for trying things out (docs/security.md).
    "plaintext": {"tls": {"enabled": False}},
}
# Release names: "nbd" gets the suffix -nbd-csi; one that already says nbd-csi does not.
RELEASES = {
    "default": "nbd",
    "monitoring-qos-certmanager": "nbd",
    "tls-own-token-root": "nbd-csi",
    "plaintext": "nbd",
}
# Kubernetes versions each set is validated against (VolumeAttributesClass v1beta1 from 1.31).
KUBE_VERSIONS = {
    "default": (OLDEST_KUBE, NEWEST_KUBE),
    "monitoring-qos-certmanager": (NEWEST_KUBE,),
    "tls-own-token-root": (OLDEST_KUBE, NEWEST_KUBE),
    "plaintext": (OLDEST_KUBE, NEWEST_KUBE),
}


@pytest.fixture(scope="module", params=list(VALUES_SETS))
def chart(request: pytest.FixtureRequest) -> Rendered:
    name: str = request.param
    return render(VALUES_SETS[name], RELEASES[name])


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render({})


@pytest.fixture(scope="module")
def full() -> Rendered:
    return render(VALUES_SETS["monitoring-qos-certmanager"])


def values_name(rendered: Rendered) -> str:
    return next(k for k, v in VALUES_SETS.items() if v == rendered.values)


def fullname(rendered: Rendered) -> str:
    """The chart's name prefix: the release name, plus -nbd-csi unless it says so already."""
    return rendered.release if "nbd-csi" in rendered.release else f"{rendered.release}-nbd-csi"


def kubelet_dir(rendered: Rendered) -> str:
    return str(rendered.values.get("kubeletDir", "/var/lib/kubelet"))


# ---- lint, validation, layout ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUES_SETS))
def test_lint_strict_is_clean(name: str) -> None:
    assert lint(VALUES_SETS[name]) == []
    assert lint(VALUES_SETS[name], "v1.34.0") == []


def test_every_object_validates(chart: Rendered) -> None:
    problems = []
    for version in KUBE_VERSIONS[values_name(chart)]:
        for template, obj in chart.objects:
            for problem in validate(obj, version):
                problems.append(f"{version} {template} {obj['kind']}: {problem}")
    assert problems == []


def test_one_object_per_template_file(chart: Rendered) -> None:
    by_file: dict[str, list[Obj]] = {}
    for template, obj in chart.objects:
        by_file.setdefault(template, []).append(obj)
    for template, objs in by_file.items():
        if template == "volumeattributesclasses.yaml":  # the QoS tiers: one kind, a list
            assert {o["kind"] for o in objs} == {"VolumeAttributesClass"}
        else:
            assert len(objs) == 1, template


def test_what_each_values_set_renders(chart: Rendered) -> None:
    kinds = sorted(o["kind"] for _, o in chart.objects)
    common = {
        "CSIDriver", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Deployment", "Role",
        "RoleBinding", "Service", "ServiceAccount", "StorageClass", "PodDisruptionBudget",
    }  # fmt: skip
    assert common <= set(kinds)
    assert kinds.count("DaemonSet") == 2 and kinds.count("ServiceAccount") == 3
    name = values_name(chart)
    if name == "default":
        assert "Secret" in kinds and "VolumeSnapshotClass" in kinds and "StorageProfile" in kinds
        assert kinds.count("StorageClass") == 2
        assert not {
            "ServiceMonitor", "PrometheusRule", "VolumeAttributesClass", "VolumeGroupSnapshotClass"
        } & set(kinds)  # fmt: skip
    if name == "monitoring-qos-certmanager":
        assert kinds.count("ServiceMonitor") == 3 and kinds.count("VolumeAttributesClass") == 3
        assert kinds.count("VolumeGroupSnapshotClass") == 1
        assert "PrometheusRule" in kinds and "ConfigMap" in kinds
    if name == "tls-own-token-root":
        assert not {"Secret", "StorageProfile", "VolumeSnapshotClass"} & set(kinds)
        assert kinds.count("StorageClass") == 1


def test_namespaced_objects_live_in_the_release_namespace(chart: Rendered) -> None:
    cluster_scoped = {
        "CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass", "VolumeSnapshotClass",
        "VolumeAttributesClass", "StorageProfile", "VolumeGroupSnapshotClass",
    }  # fmt: skip
    for _, obj in chart.objects:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_names_fit_and_carry_the_release(chart: Rendered) -> None:
    for _, obj in chart.objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63, name
        namespaced = ("Deployment", "DaemonSet", "Service", "ServiceAccount", "Secret")
        own_secret = chart.values.get("apiToken", {}).get("existingSecret")
        if obj["kind"] in namespaced and name != own_secret:
            assert name.startswith(f"{fullname(chart)}-"), name
    assert "nbd-csi-nbd-csi" not in json.dumps(chart.objects)


# ---- the driver, its name and its registration --------------------------------------------


def test_driver_name_is_the_plugins_everywhere(chart: Rendered) -> None:
    assert DRIVER_NAME == "nbd.csi.dev"
    driver = chart.one("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    for sc in chart.all("StorageClass"):
        assert sc["provisioner"] == DRIVER_NAME
    for vsc in chart.all("VolumeSnapshotClass") + chart.all("VolumeGroupSnapshotClass"):
        assert vsc["driver"] == DRIVER_NAME
    for vac in chart.all("VolumeAttributesClass"):
        assert vac["driverName"] == DRIVER_NAME


def test_csidriver_matches_the_plugins_capabilities(default: Rendered) -> None:
    spec = default.one("CSIDriver")["spec"]
    # PUBLISH_UNPUBLISH_VOLUME: the attacher must create VolumeAttachments.
    assert spec["attachRequired"] is True
    assert spec["podInfoOnMount"] is False
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["fsGroupPolicy"] == "File"


def test_node_plugin_socket_registration_and_kubelet_paths_agree(chart: Rendered) -> None:
    kubelet = kubelet_dir(chart)
    node = chart.workload("node")
    spec = pod_spec(node)
    cs = containers(node)
    plugin, registrar = cs["nbd-csi-plugin"], cs["node-driver-registrar"]
    probe = cs["liveness-probe"]
    vols = volumes(node)

    endpoint = args_of(plugin)["--endpoint"]
    assert endpoint.startswith("unix://")
    socket = endpoint.removeprefix("unix://")
    socket_dir, _, socket_name = socket.rpartition("/")
    host_plugin_dir = f"{kubelet}/plugins/{DRIVER_NAME}"
    # The plugin dir on the host is mounted where the plugin puts its socket, in every container.
    assert vols["plugin-dir"]["hostPath"]["path"] == host_plugin_dir
    for c in (plugin, registrar, probe):
        assert mount_of(c, "plugin-dir")["mountPath"] == socket_dir, c["name"]
        if c is not plugin:
            assert args_of(c)["--csi-address"] == socket, c["name"]
    # The kubelet is told the host path of that same socket.
    assert args_of(registrar)["--kubelet-registration-path"] == f"{host_plugin_dir}/{socket_name}"
    assert vols["registration-dir"]["hostPath"]["path"] == f"{kubelet}/plugins_registry"
    assert mount_of(registrar, "registration-dir")["mountPath"] == "/registration"
    # The kubelet directory, at the same path, with mounts flowing both ways.
    assert vols["kubelet-dir"]["hostPath"]["path"] == kubelet
    kubelet_mount = mount_of(plugin, "kubelet-dir")
    assert kubelet_mount["mountPath"] == kubelet
    assert kubelet_mount["mountPropagation"] == "Bidirectional"
    assert kubelet not in json.dumps(chart.workload("controller"))
    # No other path under the default kubelet dir survives a custom one.
    if kubelet != "/var/lib/kubelet":
        assert "/var/lib/kubelet" not in json.dumps(node)
    # Privileged, on the host's network, with /dev and /sys.
    assert plugin["securityContext"]["privileged"] is True
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert vols["dev"]["hostPath"]["path"] == "/dev"
    assert mount_of(plugin, "dev")["mountPath"] == "/dev"
    assert vols["sys"]["hostPath"]["path"] == "/sys"


def test_node_plugin_identity_comes_from_the_downward_api(chart: Rendered) -> None:
    for component in ("node", "storage-node"):
        workload = chart.workload(component)
        main = next(iter(containers(workload).values()))
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in main["env"]}
        assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP"}
        used = set(re.findall(r"\$\((\w+)\)", " ".join(main["args"])))
        assert used == {"NODE_NAME", "HOST_IP"}, component
    plugin = containers(chart.workload("node"))["nbd-csi-plugin"]
    args = args_of(plugin)
    assert args["--node-id"] == "$(NODE_NAME)" and args["--node-address"] == "$(HOST_IP)"
    assert plugin["args"][0] == "csi" and args["--mode"] == "node"
    assert args["--max-volumes"] == str(chart.values.get("node", {}).get("maxVolumes", 64))
    state = volumes(chart.workload("node"))["state-dir"]["hostPath"]["path"]
    assert state == "/var/lib/nbd-csi"
    assert mount_of(plugin, "state-dir")["mountPath"] == args["--state-dir"]


def test_nbd_module_loaded_by_an_init_container_unless_the_host_does(chart: Rendered) -> None:
    node = chart.workload("node")
    init = containers(node, init=True)
    load = chart.values.get("node", {}).get("loadNbdModule", True)
    load_dm = chart.values.get("node", {}).get("loadDmCryptModule", True)
    if not load and not load_dm:
        assert init == {} and "modules" not in volumes(node)
        return
    if load_dm:
        dm = init["load-dm-crypt-module"]
        assert dm["command"] == ["modprobe", "dm_crypt"]
        assert dm["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_MODULE"]}
        assert dm["securityContext"]["privileged"] is False
        assert mount_of(dm, "modules")["readOnly"] is True
    if not load:
        assert "load-nbd-module" not in init
        return
    modprobe = init["load-nbd-module"]
    max_volumes = args_of(containers(node)["nbd-csi-plugin"])["--max-volumes"]
    assert modprobe["command"] == ["modprobe", "nbd", f"nbds_max={max_volumes}"]
    # Root with CAP_SYS_MODULE only: loading a module needs nothing more.
    context = modprobe["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_MODULE"]}
    assert context["runAsUser"] == 0 and context["readOnlyRootFilesystem"] is True
    assert mount_of(modprobe, "modules") == {
        "name": "modules", "mountPath": "/lib/modules", "readOnly": True,
    }  # fmt: skip
    assert volumes(node)["modules"]["hostPath"]["path"] == "/lib/modules"


def test_topology_is_the_same_on_storage_nodes_and_node_plugins(chart: Rendered) -> None:
    node = repeated_args(containers(chart.workload("node"))["nbd-csi-plugin"], "--topology")
    storage_node = containers(chart.workload("storage-node"))["storage-node"]
    storage = repeated_args(storage_node, "--topology")
    assert node == storage
    if values_name(chart) == "monitoring-qos-certmanager":
        assert node == ["topology.nbd.csi.dev/zone=a"]


# ---- storage nodes, their Service, and the controller that finds them ----------------------


def test_storage_node_service_ports_are_the_listening_ports(chart: Rendered) -> None:
    sn = chart.workload("storage-node")
    main = containers(sn)["storage-node"]
    args = args_of(main)
    assert main["args"][0] == "storage_node"
    listening = {
        "nbd": listen_port(args["--nbd-listen"]),
        "api": listen_port(args["--api-listen"]),
        "metrics": listen_port(args["--metrics-listen"]),
    }
    assert ports(main) == listening
    service = chart.one("Service", sn["metadata"]["name"])
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == listening
    for p in service["spec"]["ports"]:
        assert p["targetPort"] == p["name"]
    # The Service selects exactly the storage node pods.
    pod_labels = sn["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert sn["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    for other in ("controller", "node"):
        other_labels = chart.workload(other)["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= other_labels.items()
    want = chart.values.get("storageNode", {}).get("ports")
    if want:
        assert listening == want


def test_storage_nodes_run_where_labelled_with_their_data_dir(chart: Rendered) -> None:
    sn = chart.workload("storage-node")
    spec = pod_spec(sn)
    values = chart.values.get("storageNode", {})
    assert spec["nodeSelector"] == values.get("nodeSelector", {"nbd.csi.dev/storage-node": "true"})
    assert spec["hostNetwork"] is True
    main = containers(sn)["storage-node"]
    args = args_of(main)
    data = volumes(sn)["data"]["hostPath"]
    assert data == {"path": "/var/lib/nbd-csi-storage", "type": "DirectoryOrCreate"}
    assert mount_of(main, "data")["mountPath"] == args["--data-dir"]
    assert args["--node-id"] == "$(NODE_NAME)" and args["--nbd-advertise"] == "$(HOST_IP)"
    uid = values.get("runAsUser", 65532)
    assert spec["securityContext"]["runAsUser"] == uid
    init = containers(sn, init=True)
    if uid == 0:
        assert init == {} and spec["securityContext"]["runAsNonRoot"] is False
    else:
        chown = init["data-dir-owner"]
        assert chown["command"] == ["chown", "-R", f"{uid}:{uid}", args["--data-dir"]]
        assert chown["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert spec["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_controller_discovers_the_storage_node_service(chart: Rendered) -> None:
    controller = containers(chart.workload("controller"))["nbd-csi-plugin"]
    args = args_of(controller)
    assert controller["args"][0] == "csi" and args["--mode"] == "controller"
    assert "--in-cluster" in args
    namespace, _, name = args["--storage-node-service"].partition("/")
    assert namespace == NAMESPACE
    service = chart.one("Service", name)
    assert "api" in {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "storage-node"


def test_api_token_secret_is_mounted_where_the_token_options_point(chart: Rendered) -> None:
    own = chart.values.get("apiToken", {}).get("existingSecret")
    secret_name = own or f"{fullname(chart)}-api-token"
    if own:
        assert chart.find("Secret", own) is None
    else:
        secret = chart.one("Secret", secret_name)
        token = secret["data"]["token"]
        assert len(token) >= 64  # base64 of 48 random characters
    for component, container, option in (
        ("controller", "nbd-csi-plugin", "--storage-token-file"),
        ("storage-node", "storage-node", "--api-token-file"),
    ):
        workload = chart.workload(component)
        c = containers(workload)[container]
        token_vol = volumes(workload)["api-token"]["secret"]
        assert token_vol["secretName"] == secret_name
        assert args_of(c)[option] == mount_of(c, "api-token")["mountPath"] + "/token"
    assert "api-token" not in volumes(chart.workload("node"))


def tls_values(rendered: Rendered) -> Obj:
    tls: Obj = rendered.values.get("tls", {})
    return tls


def server_name(rendered: Rendered) -> str:
    default = f"{fullname(rendered)}-storage-node.{NAMESPACE}.svc"
    return str(tls_values(rendered).get("serverName") or default)


def test_tls_files_where_the_options_point(chart: Rendered) -> None:
    tls = tls_values(chart)
    controller = containers(chart.workload("controller"))["nbd-csi-plugin"]
    storage = containers(chart.workload("storage-node"))["storage-node"]
    if not tls.get("enabled", True):
        assert not {"--storage-tls-ca", "--storage-tls-server-name"} & set(args_of(controller))
        assert not {"--tls-cert", "--tls-key"} & set(args_of(storage))
        assert "--insecure-api" in args_of(storage)
        for component in ("controller", "storage-node"):
            assert "tls" not in volumes(chart.workload(component))
        assert not chart.all("Certificate") and not chart.all("Issuer")
        assert chart.find("Secret", f"{fullname(chart)}-storage-node-tls") is None
        return
    assert "--insecure-api" not in args_of(storage)
    secret = tls.get("secretName") or f"{fullname(chart)}-storage-node-tls"
    server_files = {"--tls-cert": "tls.crt", "--tls-key": "tls.key"}
    for workload, c, files in (
        (chart.workload("controller"), controller, {"--storage-tls-ca": "ca.crt"}),
        (chart.workload("storage-node"), storage, server_files),
    ):
        volume = volumes(workload)["tls"]["secret"]
        assert volume["secretName"] == secret
        # Each mounts only the files it reads: the controller never gets the key.
        assert [i["key"] for i in volume["items"]] == list(files.values())
        assert volume["defaultMode"] == 0o440
        for option, file in files.items():
            assert args_of(c)[option] == mount_of(c, "tls")["mountPath"] + "/" + file
    # One name the controller checks on every storage node, whatever IP it dials.
    assert args_of(controller)["--storage-tls-server-name"] == server_name(chart)
    # Where the Secret comes from.
    if tls.get("secretName"):
        assert chart.find("Secret", secret) is None and not chart.all("Certificate")
    elif tls.get("certManager", {}).get("enabled"):
        assert chart.find("Secret", secret) is None
        cert = chart.one("Certificate", f"{fullname(chart)}-storage-node")
        assert cert["spec"]["secretName"] == secret
        assert cert["spec"]["dnsNames"] == [server_name(chart)]
        assert "server auth" in cert["spec"]["usages"]
        # Signed by the chart's CA, itself from a self-signed Issuer.
        issuer = chart.one("Issuer", cert["spec"]["issuerRef"]["name"])
        ca = chart.one("Certificate", f"{fullname(chart)}-storage-node-ca")
        assert ca["spec"]["isCA"] is True
        assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
        assert chart.one("Issuer", ca["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}
    else:
        generated = chart.one("Secret", secret)
        assert generated["type"] == "kubernetes.io/tls"
        assert set(generated["data"]) == {"ca.crt", "tls.crt", "tls.key"}
        assert generated["metadata"]["annotations"]["nbd.csi.dev/server-name"] == server_name(chart)
        assert not chart.all("Certificate")


def openssl(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(
        ["openssl", *args], input=stdin, capture_output=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_generated_certificate_is_for_the_server_name_and_signed_by_the_ca(
    default: Rendered, tmp_path: Path
) -> None:
    data = default.one("Secret", f"{fullname(default)}-storage-node-tls")["data"]
    for key, value in data.items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    name = server_name(default)
    assert name == "nbd-nbd-csi-storage-node.storage-system.svc"
    cert = str(tmp_path / "tls.crt")
    # The server name is the certificate's only subject alternative name (no IPs).
    sans = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName")
    assert re.findall(r"(DNS|IP Address):([^,\s]+)", sans) == [("DNS", name)]
    assert f"CN = {name}" in openssl(
        "x509", "-in", cert, "-noout", "-subject", "-nameopt", "sep_multiline,space_eq"
    )
    # Signed by the CA in ca.crt, for server auth, and the key is the certificate's.
    verified = openssl("verify", "-CAfile", str(tmp_path / "ca.crt"), "-purpose", "sslserver", cert)
    assert verified.strip().endswith("OK")
    ca_text = openssl("x509", "-in", str(tmp_path / "ca.crt"), "-noout", "-text")
    assert "CA:TRUE" in ca_text
    assert openssl("x509", "-in", cert, "-noout", "-pubkey") == openssl(
        "pkey", "-in", str(tmp_path / "tls.key"), "-pubout"
    )


def test_generated_certificate_reaches_the_pods_checksum(default: Rendered) -> None:
    """One certificate per rendering: the pods' checksum annotation is of the same one the
    Secret holds, so a new certificate (another server name) restarts them."""
    data = default.one("Secret", f"{fullname(default)}-storage-node-tls")["data"]
    digest = hashlib.sha256(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
    for component in ("controller", "storage-node"):
        annotations = default.workload(component)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/storage-api-tls"] == digest.hexdigest(), component
    again = render({})
    assert again.one("Secret", f"{fullname(again)}-storage-node-tls")["data"] != data


def test_cert_manager_with_an_issuer_of_yours() -> None:
    values = {
        "tls": {
            "serverName": "storage-api.example.com",
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"},
            },
        }
    }
    assert lint(values) == []
    rendered = render(values)
    (cert,) = rendered.all("Certificate")
    assert not rendered.all("Issuer")
    assert cert["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io",
    }  # fmt: skip
    assert cert["spec"]["dnsNames"] == ["storage-api.example.com"]
    assert [p for p in validate(cert, NEWEST_KUBE)] == []
    controller = containers(rendered.workload("controller"))["nbd-csi-plugin"]
    assert args_of(controller)["--storage-tls-server-name"] == "storage-api.example.com"


# ---- our programs accept what the chart passes them ---------------------------------------

# What the downward API gives the pods; loopback addresses, as everywhere in the tests.
DOWNWARD = {"NODE_NAME": "worker-1", "HOST_IP": "127.0.0.2"}


def program_argv(container: Obj) -> tuple[str, list[str]]:
    """The module the image's entrypoint runs (`python -m MODULE`) and its arguments, with the
    $(VAR) references expanded as the kubelet does."""
    module, *args = container["args"]
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: DOWNWARD[m.group(1)], a) for a in args]
    return module, expanded


def parsed(module: str, argv: list[str]) -> Any:
    parse = {"csi": csi.config.from_args, "storage_node": storage_node.config.from_args}[module]
    try:
        return parse(argv)
    except SystemExit as exc:  # argparse's error(): an option the program does not have
        raise AssertionError(f"python -m {module} refuses {argv}") from exc


def test_our_programs_accept_the_charts_arguments(chart: Rendered) -> None:
    controller = containers(chart.workload("controller"))["nbd-csi-plugin"]
    config = parsed(*program_argv(controller))
    assert config.mode == csi.config.Mode.CONTROLLER
    assert config.kube.in_cluster and config.kube.storage_node_service.startswith(NAMESPACE)
    assert str(config.storage_token_file) == args_of(controller)["--storage-token-file"]
    assert config.metrics_listen == ("0.0.0.0", ports(controller)["metrics"])

    plugin = containers(chart.workload("node"))["nbd-csi-plugin"]
    config = parsed(*program_argv(plugin))
    assert config.mode == csi.config.Mode.NODE
    assert (config.node_id, config.node.address) == ("worker-1", "127.0.0.2")
    assert str(config.endpoint.unix_path) == args_of(plugin)["--endpoint"].removeprefix("unix://")
    assert config.metrics_listen == ("0.0.0.0", ports(plugin)["metrics"])
    assert str(config.node.state_dir) == "/var/lib/nbd-csi"

    sn = containers(chart.workload("storage-node"))["storage-node"]
    config = parsed(*program_argv(sn))
    assert (config.nbd_port, config.api_port, config.metrics_port) == (
        ports(sn)["nbd"], ports(sn)["api"], ports(sn)["metrics"],
    )  # fmt: skip
    assert (config.node_id, config.nbd_advertise) == ("worker-1", "127.0.0.2")
    assert str(config.api_token_file) == args_of(sn)["--api-token-file"]
    assert str(config.data_dir) == "/var/lib/nbd-csi-storage"
    # Only attachments (with their credential) are served: no default export.
    assert config.exports == () and not config.default_export
    tls = tls_values(chart).get("enabled", True)
    assert (config.tls_cert is not None) == tls


def test_every_container_requests_resources(chart: Rendered) -> None:
    for workload in iter_pod_workloads(chart):
        for init in (False, True):
            for c in containers(workload, init).values():
                requests = c.get("resources", {}).get("requests", {})
                assert {"cpu", "memory"} <= set(requests), (workload["metadata"]["name"], c["name"])


def test_sidecar_resources_are_configurable() -> None:
    values = {
        "sidecars": {
            "resources": {"requests": {"cpu": "20m", "memory": "40Mi"}},
            "provisioner": {"resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
        },
        "controller": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
    }
    rendered = render(values)
    cs = containers(rendered.workload("controller"))
    assert cs["csi-provisioner"]["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}}
    for name in ("csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"):
        assert cs[name]["resources"] == {"requests": {"cpu": "20m", "memory": "40Mi"}}, name
    assert cs["nbd-csi-plugin"]["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    registrar = containers(rendered.workload("node"))["node-driver-registrar"]
    assert registrar["resources"] == {"requests": {"cpu": "20m", "memory": "40Mi"}}


def test_disruption_budgets_select_the_controller_and_the_storage_nodes(chart: Rendered) -> None:
    budgets = {
        b["metadata"]["labels"]["app.kubernetes.io/component"]: b
        for b in chart.all("PodDisruptionBudget")
    }
    assert set(budgets) == {"controller", "storage-node"}
    for component, budget in budgets.items():
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["maxUnavailable"] == 1
        workload = chart.workload(component)
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector == workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    off = render({"storageNode": {"podDisruptionBudget": {"enabled": False}}})
    assert [b["metadata"]["name"] for b in off.all("PodDisruptionBudget")] == [
        f"{fullname(off)}-controller"
    ]


def test_node_plugin_runs_as_root_although_the_image_does_not(chart: Rendered) -> None:
    plugin = containers(chart.workload("node"))["nbd-csi-plugin"]
    assert plugin["securityContext"]["runAsUser"] == 0
    assert plugin["securityContext"]["privileged"] is True


# ---- the controller's sidecars and rights ---------------------------------------------------


def test_controller_sidecars(chart: Rendered) -> None:
    controller = chart.workload("controller")
    cs = containers(controller)
    assert set(cs) == {
        "nbd-csi-plugin", "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter",
        "liveness-probe",
    }  # fmt: skip
    socket = args_of(cs["nbd-csi-plugin"])["--endpoint"].removeprefix("unix://")
    # One replica, never two pods at once (docs/security.md: the quota fence).
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}
    for name, c in cs.items():
        if name == "nbd-csi-plugin":
            continue
        args = args_of(c)
        assert args["--csi-address"] == socket, name
        assert mount_of(c, "socket-dir")["mountPath"] == socket.rpartition("/")[0]
        if name != "liveness-probe":
            # Each sidecar acts only while it holds its Lease: a pod cut off from the API
            # server and its replacement never both act.
            assert "--leader-election" in args, name
    provisioner = args_of(cs["csi-provisioner"])
    assert "--extra-create-metadata" in provisioner
    assert provisioner["--default-fstype"] == "ext4"
    # No feature gates: Topology and VolumeAttributesClass are GA and on in csi-provisioner v6
    # and csi-resizer v2, and a sidecar refuses a gate it no longer knows.
    assert "--feature-gates" not in provisioner
    assert "--feature-gates" not in args_of(cs["csi-resizer"])
    assert "--extra-create-metadata" in args_of(cs["csi-snapshotter"])
    # The liveness probe sidecar serves the port the plugin container's probe asks.
    health = args_of(cs["liveness-probe"])["--health-port"]
    plugin = cs["nbd-csi-plugin"]
    assert str(ports(plugin)["healthz"]) == health
    assert plugin["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    node_cs = containers(chart.workload("node"))
    assert (
        str(ports(node_cs["nbd-csi-plugin"])["healthz"])
        == args_of(node_cs["liveness-probe"])["--health-port"]
    )


@pytest.mark.parametrize("replicas", [2, 3, 0])
def test_a_controller_replica_count_other_than_one_is_refused(replicas: int) -> None:
    message = rf"controller.replicas must be 1 \(got {replicas}\)"
    with pytest.raises(Exception, match=message) as e:
        render({"controller": {"replicas": replicas}})
    assert "quota" in str(e.value) and "docs/security.md" in str(e.value)


def test_controller_runs_unprivileged(chart: Rendered) -> None:
    controller = chart.workload("controller")
    spec = pod_spec(controller)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    for c in containers(controller).values():
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]


def rules_of(role: Obj) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a Role or ClusterRole grants."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def grants(role: Obj, group: str, resource: str, *verbs: str) -> bool:
    return all((group, resource, v) in rules_of(role) for v in verbs)


def test_every_service_account_exists_and_the_api_user_is_bound(chart: Rendered) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in chart.all("ServiceAccount")}
    bound: dict[str, list[Obj]] = {}
    for binding in chart.all("ClusterRoleBinding") + chart.all("RoleBinding"):
        role_kind = binding["roleRef"]["kind"]
        role = chart.one(role_kind, binding["roleRef"]["name"])  # the role exists
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["namespace"] == NAMESPACE
            assert subject["name"] in accounts, subject
            bound.setdefault(subject["name"], []).append(role)
    for workload in iter_pod_workloads(chart):
        spec = pod_spec(workload)
        name = spec["serviceAccountName"]
        assert name in accounts, workload["metadata"]["name"]
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "controller":
            assert bound.get(name), "the controller's account has no rights"
        else:
            # Pods that never call the API get no token and no rights.
            assert spec["automountServiceAccountToken"] is False, component
            assert accounts[name]["automountServiceAccountToken"] is False, component
            assert name not in bound, component
    assert len(accounts) == 3


# What each sidecar's deploy/kubernetes RBAC (rbac.yaml; csi-snapshotter's
# csi-snapshotter/rbac-csi-snapshotter.yaml) grants its ClusterRole, for the releases in
# values.yaml: (apiGroup, resource, verbs). Secrets rules are commented out there (optional).
SIDECAR_CLUSTER_RULES: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "csi-provisioner": [
        ("", "persistentvolumes", ("get", "list", "watch", "create", "patch", "delete")),
        ("", "persistentvolumeclaims", ("get", "list", "watch", "update")),
        ("storage.k8s.io", "storageclasses", ("get", "list", "watch")),
        ("", "events", ("list", "watch", "create", "update", "patch")),
        # watch and update since v6.0.1/v6.2: its finalizer on a snapshot being restored.
        ("snapshot.storage.k8s.io", "volumesnapshots", ("get", "list", "watch", "update")),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list")),
        ("storage.k8s.io", "csinodes", ("get", "list", "watch")),
        ("", "nodes", ("get", "list", "watch")),
        ("storage.k8s.io", "volumeattachments", ("get", "list", "watch")),
        ("storage.k8s.io", "volumeattributesclasses", ("get", "list", "watch")),
    ],
    "csi-attacher": [
        ("", "persistentvolumes", ("get", "list", "watch", "update", "patch")),
        ("storage.k8s.io", "csinodes", ("get", "list", "watch")),
        ("storage.k8s.io", "volumeattachments", ("get", "list", "watch", "update", "patch")),
        ("storage.k8s.io", "volumeattachments/status", ("patch",)),
    ],
    "csi-resizer": [
        ("", "persistentvolumes", ("get", "list", "watch", "patch")),
        ("", "persistentvolumeclaims", ("get", "list", "watch")),
        ("", "pods", ("get", "list", "watch")),
        ("", "persistentvolumeclaims/status", ("patch",)),
        ("", "events", ("list", "watch", "create", "update", "patch")),
        ("storage.k8s.io", "volumeattributesclasses", ("get", "list", "watch")),
    ],
    "csi-snapshotter": [
        ("", "events", ("list", "watch", "create", "update", "patch")),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch")),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            ("create", "get", "list", "watch", "update", "patch"),
        ),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("update", "patch")),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", ("get", "list", "watch")),
        (
            "groupsnapshot.storage.k8s.io",
            "volumegroupsnapshotcontents",
            ("get", "list", "watch", "update", "patch"),
        ),
        ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", ("update", "patch")),
    ],
}


def test_controller_rights_cover_plugin_and_sidecars_and_no_more(chart: Rendered) -> None:
    name = f"{fullname(chart)}-controller"
    cluster = chart.one("ClusterRole", name)
    role = chart.one("Role", name)
    # The plugin: tenant quotas everywhere, their status written; storage nodes' endpoints
    # in the release namespace only.
    # Exactly the calls of csi/kube.py: list quotas, patch their status, list EndpointSlices.
    quota_rights = {(r, v) for g, r, v in rules_of(cluster) if g == "nbd.csi.dev"}
    assert quota_rights == {
        ("tenantquotas", "get"),
        ("tenantquotas", "list"),
        ("tenantquotas/status", "patch"),
    }
    assert {(r, v) for g, r, v in rules_of(role) if g == "discovery.k8s.io"} == {
        ("endpointslices", "list")
    }
    assert not any(g == "discovery.k8s.io" for g, _, _ in rules_of(cluster))
    # Every rule each sidecar documents, the snapshotter's group snapshot rules too (the
    # plugin has the GroupController service).
    granted = rules_of(cluster)
    for sidecar, rules in SIDECAR_CLUSTER_RULES.items():
        for group, resource, verbs in rules:
            for verb in verbs:
                assert (group, resource, verb) in granted, (sidecar, group, resource, verb)
    # Nothing beyond the sidecars' rules and the plugin's own.
    documented = {
        (g, r, v)
        for rules in SIDECAR_CLUSTER_RULES.values()
        for g, r, verbs in rules
        for v in verbs
    }
    assert {t for t in granted if t[0] != "nbd.csi.dev"} <= documented
    assert grants(role, "coordination.k8s.io", "leases", "get", "create", "update")
    # Least privilege: no secrets, no wildcards, nothing that runs code.
    for triple in rules_of(cluster) | rules_of(role):
        assert "*" not in triple, triple
        assert triple[1] not in ("secrets", "pods/exec", "serviceaccounts/token"), triple
        if triple[1] == "pods":
            assert triple[2] in ("get", "list", "watch"), triple


# ---- classes --------------------------------------------------------------------------------


def test_storage_classes(chart: Rendered) -> None:
    classes = {sc["metadata"]["name"]: sc for sc in chart.all("StorageClass")}
    block = classes["nbd-block-rwx"]
    assert block["allowVolumeExpansion"] is True
    assert block["volumeBindingMode"] == "Immediate"
    assert block["metadata"]["annotations"]["cdi.kubevirt.io/clone-strategy"] == "csi-clone"
    assert "csi.storage.k8s.io/fstype" not in block.get("parameters", {})
    params = block.get("parameters", {})
    assert all(isinstance(v, str) for v in params.values())
    if values_name(chart) == "monitoring-qos-certmanager":
        assert params == {"iops": "3000", "bandwidth": "200Mi"}
    if "nbd-filesystem" in classes:
        fs = classes["nbd-filesystem"]
        assert fs["parameters"]["csi.storage.k8s.io/fstype"] == "ext4"
        assert fs["allowVolumeExpansion"] is True


def test_volume_attributes_classes_are_qos_tiers(full: Rendered) -> None:
    tiers = {c["metadata"]["name"]: c for c in full.all("VolumeAttributesClass")}
    assert set(tiers) == {"nbd-qos-bronze", "nbd-qos-silver", "nbd-qos-gold"}
    for tier in tiers.values():
        # The API csi-provisioner v6 and csi-resizer v2 (the default sidecars) read.
        assert tier["apiVersion"] == "storage.k8s.io/v1"
        assert set(tier["parameters"]) == {"iops", "bandwidth"}
        assert tier["parameters"]["iops"].isdigit()
        assert re.fullmatch(r"\d+(Ki|Mi|Gi)?", tier["parameters"]["bandwidth"])
    assert tiers["nbd-qos-silver"]["parameters"]["bandwidth"] == "200Mi"


def test_volume_attributes_classes_v1beta1_with_older_sidecars() -> None:
    """Kubernetes 1.31-1.33: the beta API, csi-provisioner v5 and csi-resizer v1 with their
    VolumeAttributesClass gate, all set in values (docs/install.md)."""
    gate = ["VolumeAttributesClass=true"]
    values = {
        "volumeAttributesClasses": {"enabled": True, "apiVersion": "storage.k8s.io/v1beta1"},
        "sidecars": {
            "provisioner": {
                "image": "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0",
                "featureGates": gate,
            },
            "resizer": {
                "image": "registry.k8s.io/sig-storage/csi-resizer:v1.14.0",
                "featureGates": gate,
            },
        },
    }
    assert lint(values, "v1.33.0") == []
    rendered = render(values)
    tiers = rendered.all("VolumeAttributesClass")
    assert tiers and all(t["apiVersion"] == "storage.k8s.io/v1beta1" for t in tiers)
    assert [p for t in tiers for p in validate(t, "1.31.0")] == []
    cs = containers(rendered.workload("controller"))
    for sidecar in ("csi-provisioner", "csi-resizer"):
        assert args_of(cs[sidecar])["--feature-gates"] == "VolumeAttributesClass=true"


def test_default_sidecars_are_the_releases_for_current_kubernetes() -> None:
    sidecars = yaml.safe_load((CHART / "values.yaml").read_text())["sidecars"]

    def major(name: str) -> int:
        return int(sidecars[name]["image"].rpartition(":v")[2].split(".")[0])

    # csi-provisioner v6 and csi-resizer v2 read the v1 VolumeAttributesClass API (1.34+).
    assert (major("provisioner"), major("resizer")) == (6, 2)
    assert major("snapshotter") == 8 and major("attacher") == 4
    for name in ("provisioner", "resizer", "snapshotter"):
        assert sidecars[name]["featureGates"] == [], name


def test_group_snapshot_class_for_the_snapshotter_release(full: Rendered) -> None:
    """v1 and no gate for csi-snapshotter v8.6+ (GA, on by default); an older release takes
    its API version and the CSIVolumeGroupSnapshot gate from values (docs/install.md)."""
    vgsc = full.one("VolumeGroupSnapshotClass")
    assert vgsc["apiVersion"] == "groupsnapshot.storage.k8s.io/v1"
    assert vgsc["metadata"]["name"] == "nbd-group-snapshot"
    assert vgsc["metadata"]["annotations"] == {
        "groupsnapshot.storage.kubernetes.io/is-default-class": "true"
    }
    assert vgsc["deletionPolicy"] == "Delete"
    assert "--feature-gates" not in args_of(
        containers(full.workload("controller"))["csi-snapshotter"]
    )
    values = {
        "volumeGroupSnapshotClass": {
            "enabled": True,
            "apiVersion": "groupsnapshot.storage.k8s.io/v1beta1",
        },
        "sidecars": {
            "snapshotter": {
                "image": "registry.k8s.io/sig-storage/csi-snapshotter:v8.2.1",
                "featureGates": ["CSIVolumeGroupSnapshot=true"],
            }
        },
    }
    assert lint(values) == []
    older = render(values)
    (vgsc,) = older.all("VolumeGroupSnapshotClass")
    assert vgsc["apiVersion"] == "groupsnapshot.storage.k8s.io/v1beta1"
    assert validate(vgsc, "1.30.0") == []
    snapshotter = containers(older.workload("controller"))["csi-snapshotter"]
    assert args_of(snapshotter)["--feature-gates"] == "CSIVolumeGroupSnapshot=true"


def test_snapshot_class_and_cdi_storage_profile(default: Rendered) -> None:
    vsc = default.one("VolumeSnapshotClass")
    assert vsc["metadata"]["annotations"]["snapshot.storage.kubernetes.io/is-default-class"] == (
        "true"
    )
    assert vsc["deletionPolicy"] == "Delete"
    profile = default.one("StorageProfile")
    # CDI matches a profile to its StorageClass by name.
    assert profile["metadata"]["name"] == "nbd-block-rwx"
    assert default.find("StorageClass", "nbd-block-rwx") is not None
    assert profile["spec"]["claimPropertySets"] == [
        {"accessModes": ["ReadWriteMany"], "volumeMode": "Block"},
        {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"},
    ]
    assert profile["spec"]["cloneStrategy"] == "csi-clone"
    # Made before the StorageClass, so that CDI does not make an empty one first.
    assert profile["metadata"]["annotations"]["helm.sh/hook"] == "pre-install"


# ---- monitoring -----------------------------------------------------------------------------


def test_service_monitors_select_real_services_and_ports(full: Rendered) -> None:
    monitors = full.all("ServiceMonitor")
    jobs = {}
    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
        selected = [
            s
            for s in full.all("Service")
            if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, monitor["metadata"]["name"]
        service = selected[0]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        job = next(r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job")
        jobs[service["metadata"]["labels"]["app.kubernetes.io/component"]] = job
        # The metrics port the Service names is the one the program listens on.
        workload = full.workload(service["metadata"]["labels"]["app.kubernetes.io/component"])
        main = next(iter(containers(workload).values()))
        target = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
        assert listen_port(args_of(main)["--metrics-listen"]) == target["port"]
        assert ports(main)[target["targetPort"]] == target["port"]
    assert jobs == {
        "storage-node": "storage-nodes",
        "controller": "nbdcsi-controller",
        "node": "nbdcsi-node",
    }
    # The alert on storage nodes being down matches the job the ServiceMonitor sets.
    rule = full.one("PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any('job="storage-nodes"' in e for e in exprs)
    assert not any("nbdcsi-storage-node" in e for e in exprs)


def test_prometheus_rule_holds_the_rule_file(full: Rendered) -> None:
    rule_file = yaml.safe_load((CHART / "rules" / "nbd-csi.rules.yaml").read_text())
    rendered = full.one("PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in rendered] == [g["name"] for g in rule_file["groups"]]
    names = [r["alert"] for g in rendered for r in g["rules"]]
    assert names == [r["alert"] for g in rule_file["groups"] for r in g["rules"]]


def test_dashboard_configmap_holds_the_dashboard(full: Rendered) -> None:
    (cm,) = full.all("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(cm["data"]["nbd-csi.json"])
    assert board == json.loads((CHART / "dashboards" / "nbd-csi.json").read_text())


# ---- images, notes ----------------------------------------------------------------------------


def test_images_are_ours_or_the_sidecars(chart: Rendered) -> None:
    sidecars = {
        v["image"] for v in yaml.safe_load((CHART / "values.yaml").read_text())["sidecars"].values()
        if isinstance(v, dict) and "image" in v
    }  # fmt: skip
    ours = "localhost/nbd-csi:0.1.0"
    for workload in iter_pod_workloads(chart):
        for init in (False, True):
            for c in containers(workload, init).values():
                assert c["image"] == ours or c["image"] in sidecars, c["image"]
                modprobes = ("load-nbd-module", "load-dm-crypt-module")
                if c["image"] == ours and c["name"] not in ("data-dir-owner", *modprobes):
                    assert c["args"][0] in ("csi", "storage_node"), c["name"]


def test_notes_name_the_release_and_the_storage_node_label(chart: Rendered) -> None:
    selector = chart.values.get("storageNode", {}).get(
        "nodeSelector", {"nbd.csi.dev/storage-node": "true"}
    )
    for key, value in selector.items():
        assert f"{key}={value}" in chart.notes
    assert NAMESPACE in chart.notes and "XFS" in chart.notes
    if tls_values(chart).get("enabled", True):
        assert server_name(chart) in chart.notes
    else:
        assert "WARNING: tls.enabled is false" in chart.notes


# ---- the TenantQuota CRD against docs/tenant-quotas.md --------------------------------------


def doc_example() -> Obj:
    text = (REPO / "docs" / "tenant-quotas.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert block
    example: Obj = yaml.safe_load(block.group(1))
    return example


def tenant_quota_crd() -> Obj:
    crds = [o for o in crd_objects() if o["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 1
    return crds[0]


def test_crd_validates_strictly() -> None:
    for version in (OLDEST_KUBE, NEWEST_KUBE):
        assert validate(tenant_quota_crd(), version) == []


def test_crd_names_scope_and_subresources_as_documented() -> None:
    crd = tenant_quota_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "tenantquotas.nbd.csi.dev"
    assert spec["group"] == "nbd.csi.dev" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "TenantQuota", "tenantquotas", ["tq"],
    )  # fmt: skip
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["jsonPath"] for c in version["additionalPrinterColumns"]}
    # Limits and usage side by side (docs/tenant-quotas.md).
    assert {".spec.capacity", ".status.used.capacity", ".spec.volumes", ".status.used.volumes",
            ".spec.snapshots", ".status.used.snapshots"} <= columns  # fmt: skip


def test_crd_fields_are_the_documented_ones() -> None:
    example = doc_example()
    assert example["apiVersion"] == "nbd.csi.dev/v1alpha1" and example["kind"] == "TenantQuota"
    (version,) = tenant_quota_crd()["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert set(schema["spec"]["properties"]) == set(example["spec"])
    status = schema["status"]["properties"]
    assert set(status) == set(example["status"])
    assert set(status["used"]["properties"]) == set(example["status"]["used"])
    for quantity in ("capacity", "bandwidth"):
        field = schema["spec"]["properties"][quantity]
        assert field["x-kubernetes-int-or-string"] is True
        assert field["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    for count in ("volumes", "snapshots", "iops"):
        assert schema["spec"]["properties"][count]["type"] == "integer"


def crd_validator() -> Any:
    (version,) = tenant_quota_crd()["spec"]["versions"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def test_crd_accepts_the_documented_example() -> None:
    errors = [e.message for e in crd_validator().iter_errors(doc_example())]
    assert errors == []


@pytest.mark.parametrize(
    "spec, ok",
    [
        ({"capacity": "500Gi"}, True),
        ({"capacity": "1.5T"}, True),
        ({"capacity": 4096}, True),
        ({"bandwidth": "400Mi", "iops": 0}, True),
        ({}, True),
        ({"capacity": "lots"}, False),
        ({"capacity": "-1Gi"}, False),
        ({"bandwidth": "400MiB"}, False),
        ({"volumes": -1}, False),
        ({"volumes": "20"}, False),
        ({"iops": 1.5}, False),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_crd_schema_checks_values(spec: Obj, ok: bool) -> None:
    obj = {
        "apiVersion": "nbd.csi.dev/v1alpha1",
        "kind": "TenantQuota",
        "metadata": {"name": "q", "namespace": "team-a"},
        "spec": spec,
    }
    assert (not list(crd_validator().iter_errors(obj))) == ok


# ---- the threat model (docs/security.md) ------------------------------------------------------


def test_security_doc_is_linked_and_covers_the_threat_model() -> None:
    doc = (REPO / "docs" / "security.md").read_text()
    assert "security.md" in (REPO / "README.md").read_text()
    assert "(security.md)" in (REPO / "docs" / "install.md").read_text()
    for topic in (
        "anyone who can read VolumeAttachment",
        "spoofing on the same L2",
        "has no TLS of its own",
        "IPsec",
        "WireGuard",
        "dedicated storage network",
        "management API token",
        "--import-dir",
        "0600",
        "What a compromised node can reach",
        "One controller replica: the quota fence",
    ):
        assert topic in doc, topic
    # The secret names it tells admins to guard are the ones the chart makes.
    chart = render({})
    for secret in chart.all("Secret"):
        name = secret["metadata"]["name"].removeprefix(f"{fullname(chart)}-")
        assert f"<release>-nbd-csi-{name}" in doc + (REPO / "docs" / "install.md").read_text()
