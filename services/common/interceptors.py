"""The one place where domain errors become gRPC statuses, and where every RPC is measured and
admitted.

Servicers raise :class:`~services.common.errors.PlauditError`; :class:`ErrorAndMetricsInterceptor`
aborts the call with the error's status code and message, logs it once, and counts it. Any other
exception is an INTERNAL error, logged with its traceback; the client never sees the traceback.
A request that does not parse as the method's message (corrupt wire format, invalid UTF-8 in a
string field) is INVALID_ARGUMENT, never reaching the servicer.

:class:`AccessInterceptor` (inside it) admits each call through the
:class:`~services.common.security.AccessGuard`: API key, role, rate limit, in-flight limit.
Health and reflection are neither measured nor guarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.errors import InvalidArgumentError, PlauditError
from services.common.metrics import GrpcMetrics
from services.common.security import OPEN_PREFIXES, AccessGuard

log = logging.getLogger("plaudit.rpc")

UnaryBehaviour = Callable[..., Awaitable[Any]]
StreamBehaviour = Callable[..., AsyncIterator[Any]]
Wrap = Callable[[Any, bool], Any]  # (behaviour, request_streaming) -> behaviour


class MalformedRequest:
    """What the tolerant deserializer returns for bytes that are not the expected message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns a :class:`MalformedRequest` instead of raising (grpc would
    answer UNKNOWN or INTERNAL)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return MalformedRequest(exc)

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise InvalidArgumentError(
            "request",
            "is not a valid message for this method (corrupt protobuf encoding or "
            "invalid UTF-8 in a string field)",
        )
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def rebuild_handler(
    handler: grpc.RpcMethodHandler,
    unary: Wrap,
    streaming: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: ``unary`` for unary responses, ``streaming`` for
    streamed ones; each wrapper is told whether the request is a stream."""
    deserializer = request_deserializer or handler.request_deserializer
    kwargs = {
        "request_deserializer": deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream, False), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, True), **kwargs)


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses and records request count, errors and latency."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        short = method.lstrip("/")  # plaudit.v1.RewardService/Score
        wrap = _Wrapper(self._metrics, short)
        return rebuild_handler(
            handler, wrap.unary, wrap.streaming, _tolerant(handler.request_deserializer)
        )


class _Wrapper:
    def __init__(self, metrics: GrpcMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method

    def unary(self, inner: UnaryBehaviour, request_streaming: bool) -> UnaryBehaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                request = _checked_stream(request) if request_streaming else _checked(request)
                return await inner(request, context)
            except BaseException as exc:  # classified, logged once, then aborted or re-raised
                code, message = self._classify(exc, context)
                if message is not None:
                    await context.abort(code, message)
                raise
            finally:
                self.metrics.observe(self.method, code.name, time.perf_counter() - start)

        return call

    def streaming(self, inner: StreamBehaviour, request_streaming: bool) -> StreamBehaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                request = _checked_stream(request) if request_streaming else _checked(request)
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                code, message = self._classify(exc, context)
                if message is not None:
                    await context.abort(code, message)
                raise
            finally:
                self.metrics.observe(self.method, code.name, time.perf_counter() - start)

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


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call (key, role, rate, in-flight) before the servicer runs; a refusal is a
    domain error, which :class:`ErrorAndMetricsInterceptor` (outside this one) turns into its
    status, logs and counts."""

    def __init__(self, guard: AccessGuard) -> None:
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
        guard = self._guard

        def unary(inner: UnaryBehaviour, _streaming: bool) -> UnaryBehaviour:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                guard.check(method, _authorization(context))
                with guard.in_flight.slot():
                    return await inner(request, context)

            return call

        def streaming(inner: StreamBehaviour, _streaming: bool) -> StreamBehaviour:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                guard.check(method, _authorization(context))
                with guard.in_flight.slot():
                    async for response in inner(request, context):
                        yield response

            return call

        return rebuild_handler(handler, unary, streaming)
