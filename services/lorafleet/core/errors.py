"""One error root for the whole mesh, mapped to rich gRPC status both ways.

Every error a service means to send carries its gRPC code (what the client should
do: fix the request, retry, give up) and a machine-readable ``reason``
(UPPER_SNAKE, stable, part of the API). On the wire it is a ``google.rpc.Status``
with one ``google.rpc.ErrorInfo{reason, domain="lorafleet", metadata}`` detail;
``error_from_rpc`` turns that back into the same exception class on the client.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "lorafleet"
UNKNOWN_REASON = "UNKNOWN_REASON"
# grpc_status exposes this only through a private module; the key is part of the
# gRPC wire protocol, so pinning it here is safe.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LorafleetError(Exception):
    """Root of every error lorafleet raises on purpose.

    Subclasses set ``code`` and a default ``reason``; an instance may refine the
    reason (``NotFound("...", reason="ADAPTER_NOT_FOUND")``) and attach string
    metadata that travels in ``ErrorInfo.metadata``.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.domain = DOMAIN

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def to_status(self) -> grpc.Status:
        """The rich status to hand to ``context.abort_with_status``."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return rpc_status.to_status(status)


class InvalidArgument(LorafleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(LorafleetError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(LorafleetError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(LorafleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(LorafleetError):
    """A concurrency conflict (e.g. version compare-and-set lost); retry the whole
    read-modify-write, not just the call."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class ResourceExhausted(LorafleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(LorafleetError):
    """Transient: the channel's retry policy retries exactly this code."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(LorafleetError):
    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"


class DeadlineExceeded(LorafleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Unimplemented(LorafleetError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(LorafleetError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[LorafleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        Unavailable,
        DataLoss,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def unimplemented(feature: str, issue: str) -> Unimplemented:
    """An ``Unimplemented`` naming what is missing; ``raise unimplemented(...)``."""
    return Unimplemented(
        f"{feature} is not implemented yet (tracked in {issue})",
        reason="NOT_IMPLEMENTED_YET",
        metadata={"feature": feature, "issue": issue},
    )


def _error_info(trailing_metadata: object) -> error_details_pb2.ErrorInfo | None:
    # Parsed by hand rather than with rpc_status.from_call: it works the same for
    # sync and aio errors, and a peer whose rich status disagrees with the plain
    # code should still yield an error, not a ValueError.
    for key, value in trailing_metadata or ():  # type: ignore[attr-defined]
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info
    return None


def error_from_rpc(exc: grpc.RpcError) -> LorafleetError:
    """Turn a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``) into
    the matching ``LorafleetError`` subclass; use as ``raise error_from_rpc(e) from e``.

    Codes without a subclass (CANCELLED, UNKNOWN, PERMISSION_DENIED, ...) come back
    as a plain ``LorafleetError`` whose instance ``code`` is the code seen.
    """
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message: str = exc.details() or ""  # type: ignore[attr-defined]
    info = _error_info(exc.trailing_metadata())  # type: ignore[attr-defined]
    cls = _BY_CODE.get(code, LorafleetError)
    if info is None:
        err = cls(message, reason=UNKNOWN_REASON)
    else:
        err = cls(message, reason=info.reason, metadata=dict(info.metadata))
        err.domain = info.domain
    if cls is LorafleetError:
        err.code = code
    return err
