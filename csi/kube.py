"""The controller's only door to the Kubernetes API: TenantQuota objects and EndpointSlices.

Owns building the official `kubernetes` client from `--kubeconfig` or the pod's service account
(`--in-cluster`), and the four calls the controller makes: list TenantQuotas of one namespace
or of all, patch a TenantQuota's status, list the EndpointSlices of a Service. The client is
synchronous, so every call runs on this module's own two threads, never on the event loop.
Failures become `KubeError` with the API's status and message. Kept this thin on purpose: the
tests talk to a stand-in API server (tests/support/kube_api.py) through the same client.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from .config import KubeOptions
from .errors import StartupError

GROUP = "nbd.csi.dev"
VERSION = "v1alpha1"
PLURAL = "tenantquotas"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Each call is small; a stuck API server must not hold a CSI call for long.
REQUEST_TIMEOUT = 10.0


class KubeError(Exception):
    def __init__(self, what: str, status: int, reason: str) -> None:
        super().__init__(f"Kubernetes API: {what}: {status} {reason}".rstrip())
        self.status = status


class KubeClient:
    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._api_client = api_client
        self._custom = k8s.CustomObjectsApi(api_client)
        self._discovery = k8s.DiscoveryV1Api(api_client)
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="kube")

    @classmethod
    def from_options(cls, options: KubeOptions) -> KubeClient | None:
        """None when neither --kubeconfig nor --in-cluster was given."""
        try:
            if options.kubeconfig is not None:
                return cls(k8s_config.new_client_from_config(config_file=str(options.kubeconfig)))
            if options.in_cluster:
                configuration = k8s.Configuration()
                k8s_config.load_incluster_config(client_configuration=configuration)
                return cls(k8s.ApiClient(configuration))
        except (k8s_config.ConfigException, OSError, ValueError) as exc:
            raise StartupError(f"cannot use the Kubernetes API: {exc}") from None
        return None

    async def _run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs["_request_timeout"] = REQUEST_TIMEOUT
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except k8s.ApiException as exc:
            raise KubeError(what, exc.status or 0, exc.reason or "") from None
        except OSError as exc:  # urllib3 connection errors derive from OSError
            raise KubeError(what, 0, str(exc)) from None

    async def tenant_quotas(self, namespace: str = "") -> list[dict[str, Any]]:
        """TenantQuota objects of one namespace, or of every namespace when it is empty."""
        reply: dict[str, Any]
        if namespace:
            reply = await self._run(
                f"list tenantquotas in {namespace}",
                self._custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
            )
        else:
            reply = await self._run(
                "list tenantquotas",
                self._custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
            )
        return list(reply.get("items", []))

    async def patch_quota_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._run(
            f"update the status of tenantquota {namespace}/{name}",
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )

    async def service_endpoints(self, namespace: str, service: str, port_name: str) -> list[str]:
        """HOST:PORT of every ready endpoint of the Service, on its port named `port_name`."""
        reply = await self._run(
            f"list endpointslices of service {namespace}/{service}",
            self._discovery.list_namespaced_endpoint_slice,
            namespace,
            label_selector=f"{SERVICE_NAME_LABEL}={service}",
        )
        targets = []
        for endpoint_slice in reply.items:
            port = next((p.port for p in endpoint_slice.ports or [] if p.name == port_name), None)
            if port is None:
                continue
            for endpoint in endpoint_slice.endpoints or []:
                if endpoint.conditions is not None and endpoint.conditions.ready is False:
                    continue
                for address in endpoint.addresses:
                    host = f"[{address}]" if ":" in address else address
                    targets.append(f"{host}:{port}")
        return sorted(set(targets))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()
