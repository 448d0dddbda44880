"""Struct <-> plain values: what json_format gives, with whole numbers as ints."""

from __future__ import annotations

import pytest
from google.protobuf import json_format, struct_pb2

from lorafleet.environment.structs import dict_to_struct, struct_to_dict


def test_round_trip_keeps_types_and_nesting() -> None:
    values = {
        "answer": "12",
        "max_len": 8,
        "ratio": 0.25,
        "negative": -3,
        "flag": True,
        "nothing": None,
        "meta": {"digits": [1, 2.5, None, False, "s", {"deep": []}], "empty": {}},
    }
    assert struct_to_dict(dict_to_struct(values)) == values
    assert isinstance(struct_to_dict(dict_to_struct(values))["max_len"], int)


def test_matches_json_format_up_to_whole_numbers() -> None:
    struct = dict_to_struct({"a": [1.0, 1.5, {"b": 2.0}], "c": "x", "d": None})
    assert struct_to_dict(struct) == json_format.MessageToDict(struct)
    assert struct_to_dict(struct_pb2.Struct()) == {}


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_as_json_format_does(number: float) -> None:
    struct = dict_to_struct({"params": {"x": number}})
    with pytest.raises(ValueError):
        json_format.MessageToDict(struct)
    with pytest.raises(ValueError):
        struct_to_dict(struct)
