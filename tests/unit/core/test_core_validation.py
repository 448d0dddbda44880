from __future__ import annotations

import pytest

from lorafleet.core.errors import InvalidArgument
from lorafleet.core.validation import (
    ADAPTER_VERSION_NAME,
    EXPERIMENT_NAME,
    NODE_NAME,
    parse_resource_name,
    require,
    require_nonempty,
    require_positive,
    require_range,
)


def _reason(fn, *args) -> str:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    return info.value.reason


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("experiments/gsm8k-1", EXPERIMENT_NAME, {"id": "gsm8k-1"}),
        ("nodes/n0", NODE_NAME, {"id": "n0"}),
        ("adapters/exp-7/versions/0", ADAPTER_VERSION_NAME, {"id": "exp-7", "n": 0}),
        ("adapters/a/versions/12", ADAPTER_VERSION_NAME, {"id": "a", "n": 12}),
        ("experiments/" + "a" * 63, EXPERIMENT_NAME, {"id": "a" * 63}),
    ],
)
def test_parse_valid_names(name, pattern, expected):
    assert parse_resource_name(name, pattern) == expected


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("experiments/", EXPERIMENT_NAME),
        ("experiments/Upper", EXPERIMENT_NAME),
        ("experiments/-leading-dash", EXPERIMENT_NAME),
        ("experiments/" + "a" * 64, EXPERIMENT_NAME),
        ("experiments/a/b", EXPERIMENT_NAME),
        ("nodes/n0", EXPERIMENT_NAME),
        ("adapters/a/versions/x", ADAPTER_VERSION_NAME),
        ("adapters/a/versions/01", ADAPTER_VERSION_NAME),
        ("adapters/a/versions/-1", ADAPTER_VERSION_NAME),
        ("adapters/a", ADAPTER_VERSION_NAME),
        ("experiments/a.b", EXPERIMENT_NAME),
    ],
)
def test_parse_invalid_names(name, pattern):
    with pytest.raises(InvalidArgument) as info:
        parse_resource_name(name, pattern, field="adapter")
    assert info.value.reason == "INVALID_RESOURCE_NAME"
    assert info.value.metadata == {"field": "adapter"}


def test_require_helpers():
    require(True, "fine")
    assert _reason(require, False, "nope", "NO_SLOTS") == "NO_SLOTS"
    assert _reason(require, 0, "nope") == "INVALID_ARGUMENT"

    require_positive("group_size", 1)
    assert _reason(require_positive, "group_size", 0) == "VALUE_NOT_POSITIVE"
    assert _reason(require_positive, "lr", float("nan")) == "VALUE_NOT_POSITIVE"

    require_range("temperature", 0.0, 0.0, 2.0)
    require_range("temperature", 2.0, 0.0, 2.0)
    assert _reason(require_range, "temperature", 2.1, 0.0, 2.0) == "VALUE_OUT_OF_RANGE"

    require_nonempty("prompts", ["a"])
    for empty in ("", "   ", [], None):
        assert _reason(require_nonempty, "prompts", empty) == "FIELD_EMPTY"

    with pytest.raises(InvalidArgument) as info:
        require_positive("group_size", -3)
    assert info.value.metadata == {"field": "group_size"}
    assert "group_size" in info.value.message
