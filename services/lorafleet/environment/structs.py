"""google.protobuf.Struct <-> plain values, with integers kept as integers.

Struct stores every number as a double; task parameters are typed (``max_len:
int``), so whole-number doubles come back as ints.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2


def _plain(value: struct_pb2.Value) -> Any:
    # A direct walk: json_format.MessageToDict costs about 10 us per small
    # Struct, and the scorer converts one per scored completion.
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            # As json_format: a JSON number cannot hold it.
            raise ValueError(f"Fail to serialize {number} for Value.number_value")
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None  # null_value, or no value set


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _plain(value) for key, value in struct.fields.items()}


def dict_to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct
