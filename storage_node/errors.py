"""Domain errors of the storage node, each carrying the gRPC status code it maps to.

The service raises these; the API layer (storage_node.api) is the one place that turns them
into gRPC statuses. Messages are written for the person who made the request.
"""

from __future__ import annotations

import grpc


class StorageError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(StorageError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StorageError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StorageError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(StorageError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(StorageError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StorageError):
    code = grpc.StatusCode.ABORTED
