"""Checks of request fields (ids, specs, aliases, page tokens), as InvalidArgument
with a stable reason and the offending field in the metadata."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

from lorafleet.core.errors import InvalidArgument
from lorafleet.core.validation import ID_PATTERN
from lorafleet.registry.types import LATEST, LoraSpec

_ID = re.compile(ID_PATTERN)
# Aliases are ids that cannot be mistaken for a version number.
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_METRICS = 256
MAX_BASE_MODEL = 1024
MAX_TARGET_MODULES = 64
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _bad(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"field": field})


def adapter_id(value: str, field: str = "adapter_id") -> str:
    if not _ID.fullmatch(value):
        raise _bad(f"{field} {value!r} must match {ID_PATTERN}", "INVALID_ADAPTER_ID", field)
    return value


def experiment_id(value: str) -> str:
    if value and not _ID.fullmatch(value):
        raise _bad(
            f"experiment_id {value!r} must match {ID_PATTERN}",
            "INVALID_EXPERIMENT_ID",
            "experiment_id",
        )
    return value


def version_number(value: int, field: str = "version") -> int:
    if value < 1:
        raise _bad(f"{field} must be >= 1, got {value}", "INVALID_VERSION", field)
    return value


def parent_version(value: int) -> int:
    if value < 0:
        raise _bad(
            f"expected_parent_version must be >= 0, got {value}",
            "INVALID_VERSION",
            "expected_parent_version",
        )
    return value


def user_alias(value: str) -> str:
    if value == LATEST:
        raise _bad('"latest" is managed by the registry', "ALIAS_RESERVED", "alias")
    if not _ALIAS.fullmatch(value):
        raise _bad(f"alias {value!r} must match {_ALIAS.pattern}", "INVALID_ALIAS", "alias")
    return value


def base_model(value: str) -> str:
    if not value.strip() or len(value) > MAX_BASE_MODEL:
        raise _bad(
            f"base_model must be 1..{MAX_BASE_MODEL} characters", "INVALID_BASE_MODEL", "base_model"
        )
    return value


def lora_spec(spec: LoraSpec, *, max_rank: int) -> LoraSpec:
    if not 1 <= spec.rank <= max_rank:
        raise _bad(
            f"lora.rank must be in [1, {max_rank}], got {spec.rank}",
            "INVALID_LORA_SPEC",
            "lora.rank",
        )
    if not (math.isfinite(spec.alpha) and spec.alpha > 0):
        raise _bad(
            f"lora.alpha must be positive, got {spec.alpha}", "INVALID_LORA_SPEC", "lora.alpha"
        )
    if not (math.isfinite(spec.dropout) and 0 <= spec.dropout < 1):
        raise _bad(
            f"lora.dropout must be in [0, 1), got {spec.dropout}",
            "INVALID_LORA_SPEC",
            "lora.dropout",
        )
    if len(spec.target_modules) > MAX_TARGET_MODULES:
        raise _bad("too many lora.target_modules", "INVALID_LORA_SPEC", "lora.target_modules")
    for module in spec.target_modules:
        if not _MODULE.fullmatch(module):
            raise _bad(
                f"target module {module!r} is not a module name",
                "INVALID_LORA_SPEC",
                "lora.target_modules",
            )
    if len(set(spec.target_modules)) != len(spec.target_modules):
        raise _bad("lora.target_modules has duplicates", "INVALID_LORA_SPEC", "lora.target_modules")
    return spec


def labels(values: dict[str, str]) -> dict[str, str]:
    if len(values) > MAX_LABELS:
        raise _bad(f"at most {MAX_LABELS} labels", "INVALID_LABELS", "labels")
    for key, value in values.items():
        if not _LABEL_KEY.fullmatch(key) or len(value) > MAX_LABEL_VALUE:
            raise _bad(f"invalid label {key!r}", "INVALID_LABELS", "labels")
    return dict(values)


def metrics(values: dict[str, float]) -> dict[str, float]:
    if len(values) > MAX_METRICS:
        raise _bad(f"at most {MAX_METRICS} metrics", "INVALID_METRICS", "metrics")
    for key, value in values.items():
        if not key or len(key) > 128 or not math.isfinite(value):
            raise _bad(f"invalid metric {key!r}={value}", "INVALID_METRICS", "metrics")
    return dict(values)


def page_size(value: int) -> int:
    if value < 0:
        raise _bad("page_size must be >= 0", "INVALID_PAGE_SIZE", "page_size")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(kind: str, scope: str, after: str | int) -> str:
    raw = json.dumps({"k": kind, "s": scope, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, kind: str, scope: str) -> str | int | None:
    """The position a token continues from; None for an empty token.

    A token only continues the listing it came from (same kind and filter)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["k"] == kind and data["s"] == scope and isinstance(data["a"], str | int):
            return data["a"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        pass
    raise _bad(
        "page_token is invalid or belongs to another listing", "INVALID_PAGE_TOKEN", "page_token"
    )
