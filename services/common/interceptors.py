"""The one place where every RPC is admitted, measured, and its domain error becomes a status.

:class:`ServiceInterceptor` wraps every method but health and reflection (:data:`OPEN_PREFIXES`).
A request that does not parse as the method's message (corrupt wire format, invalid UTF-8 in a
string field) is INVALID_ARGUMENT, never reaching the servicer. The call is then admitted by the
server's :class:`~plaudit.services.common.security.guard.AccessGuard` (API key, role from the
service's own table, rate limit) and served within the in-flight limit. Servicers raise
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

from plaudit.services.common.errors import InvalidArgumentError, PlauditError
from plaudit.services.common.metrics import GrpcMetrics
from plaudit.services.common.security.guard import AccessGuard

log = logging.getLogger("plaudit.rpc")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods anyone may call, neither guarded nor measured: health checks and reflection."""

UnaryBehaviour = Callable[..., Awaitable[Any]]
StreamBehaviour = Callable[..., AsyncIterator[Any]]

_MALFORMED = object()
"""What the tolerant deserializer returns for bytes that are not the expected message."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns a sentinel instead of raising (grpc would answer
    UNKNOWN or INTERNAL)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything a custom deserializer raises
            return _MALFORMED

    return parse


def _checked(request: Any) -> Any:
    if request is _MALFORMED:
        raise InvalidArgumentError(
            "request",
            "is not a valid message for this method (corrupt protobuf encoding or "
            "invalid UTF-8 in a string field)",
        )
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call through ``guard``, maps domain errors to statuses and records request
    count, errors and latency (refusals included)."""

    def __init__(self, metrics: GrpcMetrics, guard: AccessGuard) -> None:
        self._metrics = metrics
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        return _Wrapper(self._metrics, self._guard, method).rebuild(handler)


class _Wrapper:
    """One method's behaviour, admitted, measured and its errors mapped (see the module doc)."""

    def __init__(self, metrics: GrpcMetrics, guard: AccessGuard, call: str) -> None:
        self.metrics = metrics
        self.guard = guard
        self.call = call  # /plaudit.v1.RewardService/Score: what the guard decides
        self.method = call.lstrip("/")  # plaudit.v1.RewardService/Score: metrics and logs

    def rebuild(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with a tolerant deserializer and its behaviour wrapped."""
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
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
            request = _checked_stream(request) if request_streaming else _checked(request)
            self.guard.check(self.call, _authorization(context))
            with self.guard.in_flight.slot():
                yield request
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


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None
