"""A stand-in for the Kubernetes API server, for tests of the CSI controller.

Owns: a threaded HTTP server on 127.0.0.1 that speaks the part of the Kubernetes REST API the
controller uses through the official `kubernetes` client, for two resources: `TenantQuota`
(nbd.csi.dev/v1alpha1, namespaced, with the status subresource; docs/tenant-quotas.md) and
`EndpointSlice` (discovery.k8s.io/v1). Verbs: list (one namespace or all, with equality label
selectors), get, create, replace (a stale resourceVersion is a 409), delete, and patch (merge,
JSON patch add/replace/remove, strategic merge for built-in kinds) on the object and on
`/status`. Like a real API server with the status subresource, writes to the object never
change `status` and writes to `/status` change nothing else. The server keeps uid,
resourceVersion (one global counter), generation (bumped when anything but metadata and status
changes) and creationTimestamp, answers errors as `Status` objects, wants the bearer token, and
validates TenantQuotas against the CRD's openAPIV3Schema in charts/nbd-csi/crds/ when that file
exists (with `jsonschema`). Not served: watch, server-side apply, field selectors, anything else.

This is the boundary that cannot run on this machine (no cluster), so it stays thin; tests put
and read objects directly and assert on the request log.
"""

from __future__ import annotations

import copy
import datetime
import json
import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.support.servers import REPO

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    api_version: str
    kind: str
    plural: str
    status_subresource: bool
    custom: bool  # a CRD: no strategic merge patch, like a real API server

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


RESOURCES = (
    Resource("nbd.csi.dev/v1alpha1", "TenantQuota", "tenantquotas", True, True),
    Resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", False, False),
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def crd_schemas(crd_dir: Path = REPO / "charts" / "nbd-csi" / "crds") -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> openAPIV3Schema, from every CRD file found (none: empty)."""
    schemas: dict[tuple[str, str], Obj] = {}
    for path in sorted(crd_dir.glob("*.yaml")) if crd_dir.is_dir() else []:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec.get("versions", []):
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schemas[key] = schema
    return schemas


def _basic_tenant_quota_check(obj: Obj) -> list[str]:
    """Type checks of docs/tenant-quotas.md, used when the CRD or `jsonschema` is missing."""
    problems = []
    spec = obj.get("spec", {})
    if not isinstance(spec, dict):
        return ["spec: must be an object"]
    for field in ("volumes", "snapshots", "iops"):
        if field in spec and (type(spec[field]) is not int or spec[field] < 0):
            problems.append(f"spec.{field}: must be a non-negative integer")
    for field in ("capacity", "bandwidth"):
        if field in spec and type(spec[field]) not in (int, str):
            problems.append(f"spec.{field}: must be a quantity (integer or string)")
    return problems


def _schema_validator(schema: Obj) -> Any:
    """A validator for an openAPIV3Schema (draft 4 is its closest JSON Schema), or None."""
    try:
        import jsonschema  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    return jsonschema.Draft4Validator(schema)


def validation_problems(
    resource: Resource, obj: Obj, schemas: dict[tuple[str, str], Obj]
) -> list[str]:
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or not name:
        return ["metadata.name: Required value"]
    schema = schemas.get((resource.api_version, resource.kind))
    validator = _schema_validator(schema) if schema is not None else None
    problems: list[str] = []
    if validator is not None:
        for error in validator.iter_errors(obj):
            problems.append(f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}")
    elif resource.kind == "TenantQuota":
        problems = _basic_tenant_quota_check(obj)
    elif resource.kind == "EndpointSlice" and "addressType" not in obj:
        problems = ["addressType: Required value"]
    return problems


def prune(value: Any, schema: Obj) -> Any:
    """Drop fields the schema does not declare, as a real API server does for a CRD with a
    structural schema (so a field the controller writes but the CRD lacks vanishes here too)."""
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema["properties"]
        return {k: prune(v, props[k]) for k, v in value.items() if k in props}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in value]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Obj, ops: Any) -> Obj:
    """RFC 6902, the operations add, replace and remove."""
    doc = copy.deepcopy(target)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            raise ApiError(422, "Invalid", "cannot patch the whole document")
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.get(part)
            if parent is None:
                raise ApiError(422, "Invalid", f"path {op['path']} does not exist")
        last = parts[-1]
        kind = op.get("op")
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind in ("replace", "remove") and index < len(parent):
                parent[index : index + 1] = [op["value"]] if kind == "replace" else []
            else:
                raise ApiError(422, "Invalid", f"cannot {kind} {op['path']}")
        elif kind == "add" or (kind == "replace" and last in parent):
            parent[last] = op["value"]
        elif kind == "remove" and last in parent:
            del parent[last]
        else:
            raise ApiError(422, "Invalid", f"cannot {kind} {op['path']}")
    return doc


def matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors: `a=b`, `a==b`, `a!=b`, comma-separated (all must hold)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        else:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


class KubeApi:
    """The stand-in server; `start()` it (or use `with`), point the client at `url`."""

    def __init__(self, crd_dir: Path | None = None) -> None:
        self.token = secrets.token_urlsafe(16)
        self.requests: list[tuple[str, str]] = []  # (method, path without the query)
        self._schemas = crd_schemas(crd_dir) if crd_dir else crd_schemas()
        self._objects: dict[tuple[str, str, str], Obj] = {}  # (kind, namespace, name) -> object
        self._version = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> KubeApi:
        api = self

        class Handler(_Handler):
            kube = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def __enter__(self) -> KubeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "csi", "user": {"token": self.token}}],
            "contexts": [{"name": "csi", "context": {"cluster": "stand-in", "user": "csi"}}],
            "current-context": "csi",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # -- direct access for tests ------------------------------------------------------------

    def put(self, obj: Obj) -> Obj:
        """Create or replace `obj` as is, status included (validated like a create)."""
        resource = _resource_of_kind(obj["kind"])
        meta = obj.get("metadata", {})
        with self._lock:
            key = (resource.kind, meta.get("namespace", "default"), meta.get("name", ""))
            old = self._objects.get(key)
            return copy.deepcopy(self._store(resource, key, copy.deepcopy(obj), old))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            obj = self._objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj and obj["apiVersion"] == api_version else None

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        with self._lock:
            obj = self._objects.get((kind, namespace, name))
            if obj is None or obj["apiVersion"] != api_version:
                return False
            del self._objects[(kind, namespace, name)]
            return True

    def objects(self, kind: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for (k, _, _), o in sorted(self._objects.items()) if k == kind]

    # -- the REST verbs, under the lock --------------------------------------------------------

    def _store(
        self, resource: Resource, key: tuple[str, str, str], new: Obj, old: Obj | None
    ) -> Obj:
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        meta = new.setdefault("metadata", {})
        meta["namespace"], meta["name"] = key[1], key[2]
        schema = self._schemas.get((resource.api_version, resource.kind))
        if schema is not None:
            metadata = new.pop("metadata")
            new = dict(prune(new, schema), metadata=metadata)
        problems = validation_problems(resource, new, self._schemas)
        if problems:
            raise ApiError(
                422, "Invalid", f'{resource.kind} "{key[2]}" is invalid: ' + "; ".join(problems)
            )
        if old is not None:
            for field in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                meta[field] = old["metadata"][field]
            if new == old:
                return old  # a no-op write keeps the resourceVersion, as a real server does
            spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if spec_of(new) != spec_of(old):
                meta["generation"] += 1
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["generation"] = 1
            now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            meta["creationTimestamp"] = now.isoformat().replace("+00:00", "Z")
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        self._objects[key] = new
        return new

    def handle(
        self, method: str, path: str, query: dict[str, str], content_type: str, body: Any
    ) -> Obj:
        resource, namespace, name, status = _parse_path(path)
        with self._lock:
            if name is None:
                if method == "GET":
                    return self._list(resource, namespace, query.get("labelSelector", ""))
                if method != "POST" or namespace is None:
                    raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not served")
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "the body must be an object")
                name = body.get("metadata", {}).get("name", "")
                key = (resource.kind, namespace, name)
                if key in self._objects:
                    raise ApiError(409, "AlreadyExists", f"{_what(resource, name)} already exists")
                new = copy.deepcopy(body)
                if resource.status_subresource:
                    new.pop("status", None)  # a create sets no status, as with a real CRD
                _check_identity(resource, namespace, name, new)
                return copy.deepcopy(self._store(resource, key, new, None))
            assert namespace is not None
            key = (resource.kind, namespace, name)
            old = self._objects.get(key)
            if old is None:
                raise ApiError(404, "NotFound", f"{_what(resource, name)} not found")
            if method == "GET":
                return copy.deepcopy(old)
            if method == "DELETE":
                del self._objects[key]
                return copy.deepcopy(old)
            if method == "PUT":
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "the body must be an object")
                new = copy.deepcopy(body)
                _check_identity(resource, namespace, name, new)
            elif method == "PATCH":
                new = _apply_patch(resource, old, content_type, body)
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} {path} is not served")
            wanted = new.get("metadata", {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on {_what(resource, name)}: the "
                    "object has been modified; please apply your changes to the "
                    "latest version and try again",
                )
            if status:
                new = dict(copy.deepcopy(old), status=new.get("status"))
                if new["status"] is None:
                    del new["status"]
            elif resource.status_subresource:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            return copy.deepcopy(self._store(resource, key, new, old))

    def _list(self, resource: Resource, namespace: str | None, selector: str) -> Obj:
        items = [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in sorted(self._objects.items())
            if kind == resource.kind
            and namespace in (None, ns)
            and matches(obj["metadata"].get("labels") or {}, selector)
        ]
        return {
            "apiVersion": resource.api_version,
            "kind": f"{resource.kind}List",
            "metadata": {"resourceVersion": str(self._version)},
            "items": items,
        }


def _what(resource: Resource, name: str) -> str:
    return f'{resource.plural}.{resource.group} "{name}"'


def _resource_of_kind(kind: str) -> Resource:
    for r in RESOURCES:
        if r.kind == kind:
            return r
    raise ValueError(f"the stand-in does not serve {kind}")


def _parse_path(path: str) -> tuple[Resource, str | None, str | None, bool]:
    """`/apis/G/V[/namespaces/NS]/PLURAL[/NAME[/status]]` -> (resource, ns, name, status)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[0] == "apis":
        api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        for r in RESOURCES:
            if r.api_version == api_version and rest and rest[0] == r.plural:
                if len(rest) == 1:
                    return r, namespace, None, False
                if namespace is not None and len(rest) == 2:
                    return r, namespace, rest[1], False
                if namespace is not None and len(rest) == 3 and rest[2] == "status":
                    if not r.status_subresource:
                        break
                    return r, namespace, rest[1], True
    raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")


def _check_identity(resource: Resource, namespace: str, name: str, obj: Obj) -> None:
    meta = obj.get("metadata", {})
    if meta.get("namespace", namespace) != namespace or meta.get("name", name) != name:
        raise ApiError(
            400, "BadRequest", "the namespace or name of the object does not match the request"
        )
    if obj.get("apiVersion", resource.api_version) != resource.api_version:
        raise ApiError(400, "BadRequest", f"apiVersion must be {resource.api_version}")


def _apply_patch(resource: Resource, old: Obj, content_type: str, body: Any) -> Obj:
    if content_type == "application/json-patch+json":
        return json_patch(old, body)
    if content_type == "application/merge-patch+json" or (
        content_type == "application/strategic-merge-patch+json" and not resource.custom
    ):
        # Strategic merge is plain merge here: an EndpointSlice's lists have no merge keys.
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "a merge patch is an object")
        result: Obj = merge_patch(old, body)
        return result
    raise ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown "
        f"format - accepted media types include: application/json-patch+json, "
        f"application/merge-patch+json ({content_type} is not served here)",
    )


class _Handler(BaseHTTPRequestHandler):
    kube: KubeApi
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.kube.requests.append((self.command, url.path))
        code, reply = 200, None
        try:
            if self.headers.get("Authorization") != f"Bearer {self.kube.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if query.get("watch") in ("true", "1"):
                raise ApiError(405, "MethodNotAllowed", "watch is not served by the stand-in")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise ApiError(400, "BadRequest", "the body is not JSON") from None
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            reply = self.kube.handle(self.command, url.path, query, content_type, body)
            code = 201 if self.command == "POST" else 200
        except ApiError as exc:
            code, reply = exc.code, exc.status()
        data = json.dumps(reply).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `KubeApi.requests`


def tenant_quota(namespace: str, name: str = "storage", **spec: Any) -> Obj:
    """A TenantQuota object (docs/tenant-quotas.md) with these spec fields."""
    return {
        "apiVersion": "nbd.csi.dev/v1alpha1",
        "kind": "TenantQuota",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def endpoint_slice(
    namespace: str,
    service: str,
    addresses_ports: Sequence[tuple[str, int]],
    name: str | None = None,
    ready: bool = True,
) -> Obj:
    """An EndpointSlice of `service` whose port named `api` reaches the given storage nodes.

    One slice has one port list, so all addresses must share one port; storage nodes on
    loopback (one port each) need one slice per node: call this once per node with distinct
    names (the default name carries the port).
    """
    ports = {port for _, port in addresses_ports}
    if len(ports) != 1:
        raise ValueError("one EndpointSlice has one port list: one slice per port")
    port = ports.pop()
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-{port}",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
            }
            for address, _ in addresses_ports
        ],
        "ports": [{"name": "api", "port": port, "protocol": "TCP"}],
    }
