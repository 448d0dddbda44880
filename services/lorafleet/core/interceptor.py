"""The one place where exceptions become gRPC status.

Servicers raise ``LorafleetError`` subclasses and never touch status codes; this
interceptor aborts the call with the error's rich status. Anything else is a bug:
it becomes INTERNAL with a generic message (no internals leak to clients) and is
logged here, once, with its traceback.

The same wrapper counts and times every RPC (``lorafleet.core.metrics``): it is
the one place that sees each call's final status, whichever way it ended.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from lorafleet.core.errors import Internal, LorafleetError
from lorafleet.core.metrics import RpcObservation, code_name

log = structlog.get_logger(__name__)

# Codes that mean "the client asked for something wrong or stale": routine, info.
# The rest (UNAVAILABLE, RESOURCE_EXHAUSTED, DATA_LOSS, ...) point at the server
# or its dependencies and are worth a warning.
_CLIENT_SIDE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

_Behavior = Callable[..., Any]


def _context_fields(method: str, request: Any, context: grpc.aio.ServicerContext) -> dict:
    fields: dict[str, Any] = {"rpc": method, "peer": context.peer()}
    request_id = getattr(request, "request_id", None)
    if isinstance(request_id, str) and request_id:
        fields["request_id"] = request_id
    return fields


def _status_after(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    """The code the handler left on ``context`` (``set_code``, ``abort``), else ``default``."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default.name


def _cancelled_code(context: grpc.aio.ServicerContext) -> str:
    # grpc cancels the handler both when the client goes away and when the
    # deadline passes; only the remaining time tells them apart.
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


async def _abort(err: BaseException, context: grpc.aio.ServicerContext) -> None:
    if isinstance(err, LorafleetError):
        level = "info" if err.code in _CLIENT_SIDE_CODES else "warning"
        getattr(log, level)("rpc_error", code=err.code.name, reason=err.reason, error=err.message)
        await context.abort_with_status(err.to_status())
    else:
        log.exception("rpc_failed", error_type=type(err).__name__)
        await context.abort_with_status(Internal("internal error").to_status())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Binds request context for logging and maps exceptions to status.

    Handlers keep their shape: a coroutine stays a coroutine, an async generator
    stays an async generator (grpc.aio picks its calling convention by inspecting
    the handler). Plain sync handlers are run inline on the event loop.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, "unary", unary_request=True), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, "client_stream", unary_request=False),
                **kwargs,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, "server_stream", unary_request=True),
                **kwargs,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, "bidi_stream", unary_request=False),
                **kwargs,
            )
        return handler


def _wrap_unary(
    behavior: _Behavior, method: str, rpc_type: str, *, unary_request: bool
) -> _Behavior:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        fields = _context_fields(method, request if unary_request else None, context)
        observation = RpcObservation(rpc_type, method)
        code = grpc.StatusCode.UNKNOWN.name
        with structlog.contextvars.bound_contextvars(**fields):
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = _status_after(context, grpc.StatusCode.OK)
                return result
            except grpc.aio.BaseError:
                # context.abort()'s own AbortError (and grpc usage errors): the
                # status is already decided; mapping it again would mask it.
                code = _status_after(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            except Exception as err:
                code = code_name(err)
                await _abort(err, context)
            finally:
                observation.done(code)

    return wrapper


def _wrap_stream(
    behavior: _Behavior, method: str, rpc_type: str, *, unary_request: bool
) -> _Behavior:
    if inspect.iscoroutinefunction(behavior):
        # Writer-style streaming handler (context.write): stays a coroutine.
        return _wrap_unary(behavior, method, rpc_type, unary_request=unary_request)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        fields = _context_fields(method, request if unary_request else None, context)
        observation = RpcObservation(rpc_type, method)
        code = grpc.StatusCode.UNKNOWN.name
        with structlog.contextvars.bound_contextvars(**fields):
            try:
                responses = behavior(request, context)
                if inspect.isawaitable(responses):
                    # A plain callable returning a writer-style coroutine.
                    await responses
                elif hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    for response in responses:
                        yield response
                code = _status_after(context, grpc.StatusCode.OK)
            except grpc.aio.BaseError:
                code = _status_after(context, grpc.StatusCode.UNKNOWN)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: grpc closed the generator (client gone mid-stream).
                code = _cancelled_code(context)
                raise
            except Exception as err:
                code = code_name(err)
                await _abort(err, context)
            finally:
                observation.done(code)

    return wrapper
