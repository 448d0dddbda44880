"""google.protobuf.Struct <-> plain values, with integers kept as integers.

Struct stores every number as a double; task parameters are typed (``max_len:
int``), so whole-number doubles come back as ints.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2


def _restore_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _restore_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_ints(v) for v in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return _restore_ints(json_format.MessageToDict(struct))


def dict_to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct
