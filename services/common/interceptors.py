"""The one place where domain errors become gRPC statuses, and where every RPC is measured.

Servicers raise :class:`~services.common.errors.PlauditError`; this interceptor aborts the call
with the error's status code and message, logs it once, and counts it. Any other exception is an
INTERNAL error, logged with its traceback; the client never sees the traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.errors import PlauditError
from services.common.metrics import GrpcMetrics

log = logging.getLogger("plaudit.rpc")

_SILENT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


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
        if handler is None or method.startswith(_SILENT_PREFIXES):
            return handler
        short = method.lstrip("/")  # plaudit.v1.RewardService/Score
        wrap = _Wrapper(self._metrics, short)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap.unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap.unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap.streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap.streaming(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Wrapper:
    def __init__(self, metrics: GrpcMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method

    def unary(self, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await inner(request, context)
            except BaseException as exc:  # classified, logged once, then aborted or re-raised
                code, message = self._classify(exc, context)
                if message is not None:
                    await context.abort(code, message)
                raise
            finally:
                self.metrics.observe(self.method, code.name, time.perf_counter() - start)

        return call

    def streaming(
        self, inner: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
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
