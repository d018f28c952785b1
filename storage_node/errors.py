"""Domain errors of the storage node, each carrying the gRPC status code it maps to.

The service raises these; the API layer (storage_node.api) is the one place that turns them
into gRPC statuses, with `status_mapper` (which the CSI plugin uses for its own errors too).
Messages are written for the person who made the request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

R = TypeVar("R")
Method = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def status_mapper(
    known: type[Exception], log: logging.Logger, known_level: int | None = None
) -> Callable[[Method[R]], Method[R]]:
    """A decorator for async servicer methods: an exception of type `known` (with a `code`
    attribute) becomes that status with its message (logged at `known_level`, if given);
    anything else is logged with its traceback and becomes INTERNAL. It is the only code that
    calls `context.abort`, which raises, so it is called outside `try`."""

    def decorate(fn: Method[R]) -> Method[R]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
            try:
                return await fn(self, request, context)
            except known as exc:
                code, message = getattr(exc, "code"), str(exc)  # noqa: B009
                if known_level is not None:
                    log.log(known_level, "%s: %s: %s", fn.__name__, code.name, message)
            except Exception:
                log.exception("%s failed", fn.__name__)
                code, message = grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}"
            await context.abort(code, message)
            raise AssertionError("abort returned")

        return wrapper

    return decorate


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


class OutOfRange(StorageError):
    code = grpc.StatusCode.OUT_OF_RANGE
