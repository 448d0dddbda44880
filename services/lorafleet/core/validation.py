"""Request checks that fail as ``InvalidArgument`` with a stable reason.

Each failure names the offending field in ``ErrorInfo.metadata["field"]`` so
clients can point at it without parsing messages.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sized
from typing import Any, NoReturn

from lorafleet.core.errors import InvalidArgument

# Resource ids: lowercase DNS-label-like, so they are safe in URLs, file names,
# S3 keys, k8s labels and vLLM adapter names alike.
ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
# Version numbers: decimal, no sign, no leading zeros (v0 is the initial adapter).
NUMBER_PATTERN = r"0|[1-9][0-9]{0,17}"
# Placeholders spelled {n} (or ending in _n) are numbers; all others are ids.
_NUMERIC_PLACEHOLDER = re.compile(r"^(n|.+_n)$")

EXPERIMENT_NAME = "experiments/{id}"
ADAPTER_NAME = "adapters/{id}"
ADAPTER_VERSION_NAME = "adapters/{id}/versions/{n}"
NODE_NAME = "nodes/{id}"


def _fail(message: str, reason: str, field: str | None = None) -> NoReturn:
    raise InvalidArgument(message, reason=reason, metadata={"field": field} if field else None)


def require(cond: object, message: str, reason: str = "INVALID_ARGUMENT") -> None:
    if not cond:
        _fail(message, reason)


def require_positive(name: str, value: float) -> None:
    if not value > 0:
        _fail(f"{name} must be positive, got {value}", "VALUE_NOT_POSITIVE", name)


def require_range(name: str, value: float, lo: float, hi: float) -> None:
    """``lo <= value <= hi`` (both ends inclusive)."""
    if not lo <= value <= hi:
        _fail(f"{name} must be in [{lo}, {hi}], got {value}", "VALUE_OUT_OF_RANGE", name)


def require_nonempty(name: str, value: Sized | None) -> None:
    """Non-empty collection or string; a whitespace-only string counts as empty."""
    empty = value is None or len(value) == 0 or (isinstance(value, str) and not value.strip())
    if empty:
        _fail(f"{name} must not be empty", "FIELD_EMPTY", name)


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for literal, placeholder in re.findall(r"([^{]*)(?:\{([a-z_]+)\})?", pattern):
        parts.append(re.escape(literal))
        if placeholder:
            value = NUMBER_PATTERN if _NUMERIC_PLACEHOLDER.match(placeholder) else ID_PATTERN
            parts.append(f"(?P<{placeholder}>{value})")
    return re.compile("".join(parts))


def parse_resource_name(name: str, pattern: str, *, field: str = "name") -> dict[str, Any]:
    """Match ``name`` against a pattern such as ``adapters/{id}/versions/{n}``.

    Returns the placeholder values: ids as ``str``, numeric placeholders (``{n}``,
    ``{*_n}``) as ``int``.

    Raises:
        InvalidArgument: reason ``INVALID_RESOURCE_NAME``.
    """
    match = _compile(pattern).fullmatch(name)
    if match is None:
        _fail(
            f"invalid resource name {name!r}: expected {pattern} with ids matching {ID_PATTERN}",
            "INVALID_RESOURCE_NAME",
            field,
        )
    return {
        key: int(value) if _NUMERIC_PLACEHOLDER.match(key) else value
        for key, value in match.groupdict().items()
    }
