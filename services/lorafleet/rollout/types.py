"""The rollout domain's named records: plain frozen dataclasses, no proto, no engine.

Ragged data carries shape suffixes: ``_T`` per token, ``_P`` per prompt, ``_N``
per sample of a prompt.
"""

from __future__ import annotations

import dataclasses
import enum
import re

from lorafleet.core.errors import InvalidArgument

LATEST = "latest"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,62}")


class FinishReason(enum.StrEnum):
    STOP = "stop"
    """A stop string, a stop token or end of sequence."""
    LENGTH = "length"
    """max_tokens reached."""
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one request, named as vLLM names them."""

    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) disables top-k."""
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    """Return the logprob of every sampled token."""
    ignore_eos: bool = False
    """Generate exactly max_tokens (stop strings still apply). Not on the wire:
    for benchmarks and engine tests that need equal-length samples."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class AdapterSelection:
    """Which adapter version a request names: a fixed number, an alias or latest."""

    adapter_id: str
    version: int | None = None
    alias: str = LATEST
    """Used when ``version`` is None."""

    @classmethod
    def parse(cls, text: str) -> AdapterSelection:
        """``"exp"``, ``"exp@latest"``, ``"exp@best"`` or ``"exp@3"``."""
        adapter_id, _, selector = text.partition("@")
        return cls.of(adapter_id, selector or LATEST)

    @classmethod
    def of(cls, adapter_id: str, selector: str | int) -> AdapterSelection:
        if not _ID.fullmatch(adapter_id or ""):
            raise InvalidArgument(
                f"invalid adapter id {adapter_id!r}",
                reason="INVALID_ADAPTER_ID",
                metadata={"field": "adapter.adapter_id"},
            )
        if isinstance(selector, int) or (isinstance(selector, str) and selector.isdigit()):
            version = int(selector)
            if version < 1:
                raise InvalidArgument(
                    f"adapter version must be >= 1, got {version}",
                    reason="INVALID_ADAPTER_VERSION",
                    metadata={"field": "adapter.version"},
                )
            return cls(adapter_id, version=version)
        if not _ALIAS.fullmatch(selector):
            raise InvalidArgument(
                f"invalid adapter alias {selector!r}",
                reason="INVALID_ADAPTER_ALIAS",
                metadata={"field": "adapter.alias"},
            )
        return cls(adapter_id, alias=selector)

    @property
    def fixed(self) -> bool:
        return self.version is not None

    def __str__(self) -> str:
        return f"{self.adapter_id}@{self.version if self.version is not None else self.alias}"


@dataclasses.dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """Where one adapter version's bytes are and what they must hash to
    (the domain twin of ``lorafleet.common.v1.AdapterRef``)."""

    adapter_id: str
    version: int
    uri: str
    sha256: str = ""
    """Manifest digest: sha256 of ``"<name>\\t<sha256>\\t<size>\\n"`` lines sorted by name."""
    size_bytes: int = 0
    files: tuple[FileDigest, ...] = ()
    rank: int = 0
    """0 when the registry did not say; then adapter_config.json decides."""
    alpha: float = 0.0
    base_model: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)

    @property
    def engine_name(self) -> str:
        return engine_name(self.adapter_id, self.version)


def engine_name(adapter_id: str, version: int) -> str:
    """The name the engine knows a version by. Versioned, so the prefix cache
    (which hashes the LoRA name and path into block keys) can never hand one
    version's KV blocks to another."""
    return f"{adapter_id}@{version}"


@dataclasses.dataclass(frozen=True)
class EngineAdapter:
    """An adapter version as the engine sees it: a unique int id and a local dir."""

    adapter_id: str
    version: int
    engine_id: int
    """Unique per (adapter, version) for the life of the process."""
    path: str
    """Local PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    rank: int

    @property
    def name(self) -> str:
        return engine_name(self.adapter_id, self.version)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt, its ``n`` samples, and the adapter that serves it (None = base)."""

    prompt_token_ids: tuple[int, ...]
    n: int
    sampling: SamplingSpec
    adapter: EngineAdapter | None = None


@dataclasses.dataclass(frozen=True)
class Sample:
    token_ids_T: tuple[int, ...]
    text: str
    logprobs_T: tuple[float, ...]
    """Empty when logprobs were not asked for."""
    finish_reason: FinishReason


@dataclasses.dataclass(frozen=True)
class PromptSamples:
    prompt_token_ids: tuple[int, ...]
    samples_N: tuple[Sample, ...]


@dataclasses.dataclass(frozen=True)
class SampleDelta:
    """What one sample produced since its previous delta (streaming)."""

    prompt_index: int
    sample_index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: FinishReason | None = None
    """Set on the last delta of a sample."""


@dataclasses.dataclass(frozen=True)
class ScoreSequence:
    """Prompt tokens followed by completion tokens; only the completion is scored."""

    token_ids: tuple[int, ...]
    prompt_length: int


@dataclasses.dataclass(frozen=True)
class EngineStatus:
    engine: str
    base_model: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    running_requests: int
    healthy: bool
    epoch: int
    """1 after the first start, +1 per restart."""
    started_at: float
    """Unix seconds of the current engine's start."""
    engine_pids: tuple[int, ...] = ()
    """Engine worker processes, when the engine runs out of process."""


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """A version the engine holds (or held until evicted), as ListLoadedAdapters shows it."""

    adapter_id: str
    version: int
    engine_name: str
    rank: int
    load_ms: float
    active: bool
    path: str
    source: str
    """"local" (file:// in place) or "download"."""


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    results_P: tuple[PromptSamples, ...]
    adapter_version: int
    """The version that served the request; 0 for the base model."""
    prompt_tokens: int
    completion_tokens: int
