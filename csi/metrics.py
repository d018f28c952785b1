"""Prometheus metrics of the CSI plugin: every gRPC call by method and code, and its latency.

Owns the plugin's registry (injected, never prometheus_client's global one), the interceptor
that counts each call the CO makes, and the HTTP server that exposes `/metrics`. The Node
service adds its own families (attached devices, reconnects, blackout) to the same registry;
the Controller adds the tenant quota families. Every family is listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# CSI calls range from microseconds (Identity) to minutes (a clone of a large volume).
LATENCY_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0)


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts unary calls: nbdcsi_grpc_calls_total{method,code} and their latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "nbdcsi_grpc_calls",
            "CSI calls answered, by method and gRPC status code",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "nbdcsi_grpc_call_duration_seconds",
            "Time to answer a CSI call, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # "/csi.v1.Controller/CreateVolume" -> "Controller/CreateVolume"
        method = handler_call_details.method.rsplit(".", 1)[-1]
        inner: Any = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                # Servicers end every failure with context.abort (csi.errors.rpc), which sets
                # the status; anything else is reported UNKNOWN, as grpc does.
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                self.latency.labels(method).observe(time.perf_counter() - start)
                self.calls.labels(method, code).inc()

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class MetricsServer:
    """prometheus_client's HTTP server on its own thread, for the injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._http: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        self._http, _thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
