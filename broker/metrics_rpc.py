"""The broker's RPC metrics: :class:`RpcMetricsInterceptor` counts every RPC and its
latency (``rigshift_grpc_requests_total``, ``rigshift_grpc_request_duration_seconds``);
``broker.metrics.BrokerMetrics`` owns the series and makes the interceptor."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

__all__ = ["RpcMetricsInterceptor"]


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC and its latency by full method name and status code.

    Only methods the server implements are measured, so a client cannot grow
    the ``method`` label by calling made-up names.
    """

    def __init__(self, requests: Counter, duration: Histogram) -> None:
        self.requests = requests
        self.duration = duration

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = self._wrap(method, behavior)
                return handler._replace(**{kind: wrapped}) if wrapped else handler
        return handler

    def _record(
        self, method: str, context: Any, started: float, error: BaseException | None
    ) -> None:
        code = context.code()
        if code is None:
            if error is None:
                name = "OK"
            elif isinstance(error, asyncio.CancelledError | GeneratorExit):
                name = "CANCELLED"
            else:
                name = "UNKNOWN"
        else:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.requests.labels(method, name).inc()
        self.duration.labels(method, name).observe(time.perf_counter() - started)

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any] | None:
        record = self._record
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> Any:
                started, error = time.perf_counter(), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as err:
                    error = err
                    raise
                finally:
                    record(method, context, started, error)

            return stream
        if inspect.iscoroutinefunction(behavior):

            async def unary(request: Any, context: Any) -> Any:
                started, error = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as err:
                    error = err
                    raise
                finally:
                    record(method, context, started, error)

            return unary
        return None  # a synchronous handler: left unmeasured
