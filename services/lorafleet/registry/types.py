"""The registry's domain records: plain frozen dataclasses, no proto, no SQL."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

LATEST = "latest"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The PEFT layout, and nothing else: no pickles, no README, no extra shards.
VERSION_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class VersionState(enum.StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    DELETED = "DELETED"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    """Empty means the node's default set; then any module name is accepted."""
    dropout: float = 0.0
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str
    """Lower-case hex."""
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class Adapter:
    adapter_id: str
    experiment_id: str
    base_model: str
    lora: LoraSpec
    labels: Mapping[str, str]
    latest_version: int
    """0 while there is no READY version."""
    create_time: float
    """Unix seconds."""


@dataclasses.dataclass(frozen=True)
class Version:
    adapter_id: str
    version: int
    parent_version: int
    state: VersionState
    training_step: int
    metrics: Mapping[str, float]
    sha256: str
    size_bytes: int
    files: tuple[FileDigest, ...]
    uris: tuple[str, ...]
    """Original location first (the file:// it was published with, if any), then
    the durable copy once verified."""
    durable_uri: str
    """The registry-owned copy ("" until the background copy is verified)."""
    aliases: tuple[str, ...]
    """User aliases pointing here, plus "latest" when it is the latest READY."""
    create_time: float
    failure_reason: str = ""
    attempt_id: str = ""
    """Which publish attempt holds the number (PENDING) or produced it."""


@dataclasses.dataclass(frozen=True)
class Reservation:
    """A PENDING version number held by one publish attempt."""

    adapter: Adapter
    version: int
    parent_version: int
    attempt_id: str


@dataclasses.dataclass(frozen=True)
class RetentionOutcome:
    """What one retention pass did to an adapter."""

    retired: list[Version]
    """Versions marked DELETED, as they were (with their URIs, for blob removal)."""
    next_due_s: float | None
    """Wall time (s) at which the oldest version past the kept ones that no alias
    holds turns old enough to retire; None when there is no such version."""


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
