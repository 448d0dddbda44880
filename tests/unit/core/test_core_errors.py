from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from lorafleet.core import errors

SUBCLASSES = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
]


def _decode(status: grpc.Status) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    return rich, info


@pytest.mark.parametrize(("cls", "code"), SUBCLASSES)
def test_each_subclass_carries_code_and_reason(cls, code):
    err = cls("boom")
    assert isinstance(err, errors.LorafleetError)
    assert err.code == code
    assert err.reason == code.name  # default reason is the code's name, UPPER_SNAKE
    status = err.to_status()
    assert status.code == code
    assert status.details == "boom"
    rich, info = _decode(status)
    assert rich.code == code.value[0]
    assert (info.reason, info.domain) == (code.name, "lorafleet")


def test_reason_and_metadata_override_per_instance():
    err = errors.NotFound("no adapter", reason="ADAPTER_NOT_FOUND", metadata={"adapter": "a1"})
    assert errors.NotFound.reason == "NOT_FOUND"  # class default untouched
    _, info = _decode(err.to_status())
    assert info.reason == "ADAPTER_NOT_FOUND"
    assert dict(info.metadata) == {"adapter": "a1"}
    assert str(err) == "no adapter"


def test_unimplemented_helper_names_what_is_missing():
    err = errors.unimplemented("S3 blob store", "#42")
    assert isinstance(err, errors.Unimplemented)
    assert err.reason == "NOT_IMPLEMENTED_YET"
    assert "S3 blob store" in err.message and "#42" in err.message
    with pytest.raises(errors.Unimplemented):
        raise err
