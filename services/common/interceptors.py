"""The one place where every RPC is admitted, measured, and its domain error becomes a status.

:class:`ServiceInterceptor` wraps every method but health and reflection (:data:`OPEN_PREFIXES`).
The call is admitted by the server's :class:`~plaudit.services.common.security.guard.AccessGuard`
(API key, role from the service's own table, rate limit) from its metadata alone, before a byte
of the request is read: a refused call gets a handler that answers the refusal without reading
or parsing the request, so an unauthenticated caller costs a header lookup whatever it sends.
An admitted request larger than its method's own limit
(:meth:`~plaudit.services.common.security.guard.ServerSecurity.message_limit`), or holding more
protobuf fields than its method's field limit
(:meth:`~plaudit.services.common.security.guard.ServerSecurity.field_limit`, counted on the wire:
an 8 MB request of empty items would take over 200 MB parsed), is RESOURCE_EXHAUSTED before it is
parsed; one that does not parse as the method's message (corrupt
wire format, invalid UTF-8 in a string field) is INVALID_ARGUMENT, never reaching the servicer.
The call is then served within the in-flight limit. Servicers raise
:class:`~plaudit.services.common.errors.PlauditError`; the call is aborted with the error's status
code and message, logged once and counted. Any other exception is an INTERNAL error, logged with its
traceback; the client never sees the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor

from plaudit.services.common.errors import (
    InvalidArgumentError,
    PlauditError,
    ResourceExhaustedError,
)
from plaudit.services.common.metrics import GrpcMetrics
from plaudit.services.common.security.guard import CALLER, AccessGuard
from plaudit.services.common.security.keys import Principal
from plaudit.services.common.security.limits import count_fields

log = logging.getLogger("plaudit.rpc")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods anyone may call, neither guarded nor measured: health checks and reflection."""

UnaryBehaviour = Callable[..., Awaitable[Any]]
StreamBehaviour = Callable[..., AsyncIterator[Any]]

_MALFORMED = object()
"""What the tolerant deserializer returns for bytes that are not the expected message."""


class _Oversized:
    """What the tolerant deserializer returns for a message over its method's limit."""

    def __init__(self, size: int) -> None:
        self.size = size


class _TooManyFields:
    """What the tolerant deserializer returns for a message over its method's field limit."""


_TOO_MANY_FIELDS = _TooManyFields()


_REQUEST_TYPES: dict[str, Descriptor] = {}


def request_type(call: str) -> Descriptor | None:
    """The request message type of ``call`` (``/package.Service/Method``) from the default
    descriptor pool (the servicer's ``_pb2`` module registered it); None if unknown."""
    found = _REQUEST_TYPES.get(call)
    if found is None:
        name = call.lstrip("/").replace("/", ".")
        try:
            found = descriptor_pool.Default().FindMethodByName(name).input_type
        except KeyError:
            return None
        _REQUEST_TYPES[call] = found
    return found


def _tolerant(
    deserializer: Callable[[bytes], Any] | None,
    limit: int,
    fields: int,
    message: Descriptor | None,
) -> Callable[[bytes], Any] | None:
    """``deserializer`` that refuses messages over ``limit`` bytes, or of ``message`` type with
    more than ``fields`` fields (:func:`count_fields`), unparsed, and returns a sentinel
    instead of raising (grpc would answer UNKNOWN or INTERNAL)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        if len(data) > limit:
            return _Oversized(len(data))
        if message is not None and count_fields(data, message, fields) > fields:
            return _TOO_MANY_FIELDS
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything a custom deserializer raises
            return _MALFORMED

    return parse


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call through ``guard`` (before reading it), bounds its request by
    ``message_limit`` and ``field_limit``, maps domain errors to statuses and records request
    count, errors and latency (refusals included)."""

    def __init__(
        self,
        metrics: GrpcMetrics,
        guard: AccessGuard,
        message_limit: Callable[[str], int],
        field_limit: Callable[[str], int],
    ) -> None:
        """``message_limit``: the largest request message of a call (``/package.Service/M``);
        ``field_limit``: the most protobuf fields one may hold."""
        self._metrics = metrics
        self._guard = guard
        self._message_limit = message_limit
        self._field_limit = field_limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        wrapper = _Wrapper(
            self._metrics,
            self._guard,
            method,
            self._message_limit(method),
            self._field_limit(method),
        )
        try:  # from the metadata alone: nothing of the request has been read yet
            wrapper.principal = self._guard.check(
                method, _authorization(handler_call_details.invocation_metadata)
            )
        except PlauditError as exc:
            return wrapper.refusal(exc)
        return wrapper.rebuild(handler)


class _Wrapper:
    """One method's behaviour, admitted, measured and its errors mapped (see the module doc)."""

    def __init__(
        self, metrics: GrpcMetrics, guard: AccessGuard, call: str, limit: int, fields: int
    ) -> None:
        self.metrics = metrics
        self.guard = guard
        self.call = call  # /plaudit.v1.RewardService/Score: what the guard decides
        self.method = call.lstrip("/")  # plaudit.v1.RewardService/Score: metrics and logs
        self.limit = limit  # bytes of one request message
        self.fields = fields  # protobuf fields of one request message
        self.started = time.perf_counter()
        self.principal: Principal | None = None  # the admitted caller: CALLER while served

    def refusal(self, exc: PlauditError) -> grpc.RpcMethodHandler:
        """A handler that answers ``exc`` (the guard's refusal) without reading the request:
        request-streaming, whatever the method, so grpc reads no message until the behaviour
        asks for one, which it never does; no deserializer, so nothing would be parsed."""

        async def refuse(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            code, message = self._classify(exc, context)
            self.metrics.observe(self.method, code.name, time.perf_counter() - self.started)
            await context.abort(code, message or code.name)

        return grpc.stream_unary_rpc_method_handler(refuse)

    def _checked(self, request: Any) -> Any:
        if isinstance(request, _Oversized):
            raise ResourceExhaustedError(
                f"request: {request.size} bytes exceeds the limit of {self.limit} bytes for "
                f"{self.method}"
            )
        if request is _TOO_MANY_FIELDS:
            raise ResourceExhaustedError(
                f"request: more than {self.fields} protobuf fields (items, messages, map "
                f"entries...), the limit for {self.method}; send fewer"
            )
        if request is _MALFORMED:
            raise InvalidArgumentError(
                "request",
                "is not a valid message for this method (corrupt protobuf encoding or "
                "invalid UTF-8 in a string field)",
            )
        return request

    async def _checked_stream(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield self._checked(request)

    def rebuild(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with a bounded, tolerant deserializer and its behaviour wrapped."""
        kwargs = {
            "request_deserializer": _tolerant(
                handler.request_deserializer, self.limit, self.fields, request_type(self.call)
            ),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self.unary(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            unary = self.unary(handler.stream_unary, request_streaming=True)
            return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream:
            streaming = self.streaming(handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
        streaming = self.streaming(handler.stream_stream, request_streaming=True)
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)

    @contextlib.asynccontextmanager
    async def _served(
        self, request: Any, request_streaming: bool, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Yields the checked request once admitted, inside an in-flight slot; measures the
        call and turns what it raises into its status (logged once, then aborted or re-raised)."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            checked = self._checked_stream if request_streaming else self._checked
            request = checked(request)
            caller = CALLER.set(self.principal)
            try:
                with self.guard.in_flight.slot():
                    yield request
            finally:
                with contextlib.suppress(ValueError):  # a stream closed from another context
                    CALLER.reset(caller)
        except BaseException as exc:
            code, message = self._classify(exc, context)
            if message is not None:
                await context.abort(code, message)
            raise
        finally:
            self.metrics.observe(self.method, code.name, time.perf_counter() - start)

    def unary(self, inner: UnaryBehaviour, request_streaming: bool = False) -> UnaryBehaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._served(request, request_streaming, context) as checked:
                return await inner(checked, context)

        return call

    def streaming(self, inner: StreamBehaviour, request_streaming: bool = False) -> StreamBehaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._served(request, request_streaming, context) as checked:
                async for response in inner(checked, context):
                    yield response

        return call

    def _classify(
        self, exc: BaseException, context: grpc.aio.ServicerContext
    ) -> tuple[grpc.StatusCode, str | None]:
        """Status code for ``exc`` and the message to abort with (None: already final)."""
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED, None
        if isinstance(exc, grpc.aio.AbortError):
            return context.code() or grpc.StatusCode.UNKNOWN, None
        if isinstance(exc, PlauditError):
            level = logging.ERROR if exc.code == grpc.StatusCode.INTERNAL else logging.INFO
            log.log(
                level,
                "rpc failed",
                extra={"method": self.method, "code": exc.code.name, "error": exc.message},
            )
            return exc.code, exc.message
        log.error("rpc crashed", extra={"method": self.method}, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error in {self.method}"


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return str(value)
    return None
