"""Typed errors of the CSI plugin, and the one place where they become gRPC statuses.

Services raise `CsiError` subclasses, each carrying the status code the CSI spec's error
tables ask for (csi-spec-v1.12.md, "Error Scheme" and each RPC's "Errors" section). `rpc` wraps
every servicer method and is the only code that calls `context.abort`; anything unexpected is
logged with its traceback and reported as INTERNAL, never swallowed.
"""

from __future__ import annotations

import logging

import grpc

from storage_node.errors import status_mapper

log = logging.getLogger("csi.errors")


class StartupError(Exception):
    """The plugin cannot start with this configuration (the message says why); not an RPC error."""


class CsiError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CsiError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(CsiError):
    code = grpc.StatusCode.UNAVAILABLE


# A storage node's own status, seen from the CO. The node's answer about the request itself
# (not found, already exists, quota...) passes through; a failure of the plugin's access to
# the node (wrong token, rejected by the node) is the plugin's problem, not the caller's
# secrets, so it must not reach the CO as UNAUTHENTICATED or PERMISSION_DENIED.
_FROM_STORAGE_NODE = {
    grpc.StatusCode.UNAUTHENTICATED: grpc.StatusCode.INTERNAL,
    grpc.StatusCode.PERMISSION_DENIED: grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN: grpc.StatusCode.INTERNAL,
}


class StorageNodeError(CsiError):
    """A call to a storage node's management API failed; carries the node's own status."""

    def __init__(self, node_id: str, node_code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"storage node {node_id}: {node_code.name}: {details}")
        self.node_id = node_id
        self.node_code = node_code
        self.code = _FROM_STORAGE_NODE.get(node_code, node_code)


# Every servicer method: typed errors become their status (logged at INFO), anything else
# INTERNAL with its traceback in the log.
rpc = status_mapper(CsiError, log, logging.INFO)
