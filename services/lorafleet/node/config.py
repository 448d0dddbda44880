"""Settings of the co-located node (env prefix ``LORAFLEET_NODE_``).

One process, one base model, both RolloutService and TrainerService: the fields
are the trainer's and the rollout service's that make sense on one shared
model (one ``model_path``, ``dtype``, ``device``, ``node_id``, registry and
adapter cache), under one prefix. :meth:`NodeSettings.trainer_settings` turns
them into the trainer's own settings, which the node wires unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings
from lorafleet.trainer.config import TrainerSettings, usable_cores


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_NODE_", extra="forbid")

    # -- the shared base model ---------------------------------------------------------
    model_path: str = Field(
        default="", description="HF model directory of the base model; empty = the tiny model."
    )
    base_model_name: str = Field(
        default="",
        description="Base model name written into adapter_config.json and reported by the "
        'trainer; empty = model_path ("tiny" for the tiny model).',
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Dtype of the one base model both services use. float32 keeps rollout "
        "and trainer logprobs identical on CPU; bfloat16 is the usual choice on GPU.",
    )
    device: str = Field(default="cpu", description="torch device of the model (cpu, cuda).")
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads; 0 = every core this process may use. Rollout "
        "and training take turns on the model (one lock), so they never compete for them.",
    )
    batch_invariant: bool | None = Field(
        default=None,
        description="Fused train passes never put two requests in one micro-batch (each "
        "update bit-identical to training the adapter alone). Unset: on for a CPU device.",
    )
    micro_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Padded tokens of one forward/backward in a fused train pass (the "
        "trainer's micro_batch_tokens). Unset: 1024 on CPU, 16384 on GPUs.",
    )
    share_prompts: bool = Field(
        default=True,
        description="Samples of a request that repeat a prompt (GRPO groups) run that prompt "
        "once in training (same gradient, fewer tokens).",
    )
    # -- mesh --------------------------------------------------------------------------
    node_id: str = Field(
        default="local",
        description="This node's id, as the registry's file_roots names it; also the host "
        "part of the node's mem:// version references.",
    )
    registry_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the AdapterRegistryService."
    )
    registry_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of each unary call to the registry."
    )
    adapter_cache_dir: str = Field(
        default="var/node/adapters",
        description="Node-local adapter cache: SaveVersion writes <dir>/<adapter>/v<N>/ there "
        "for the registry and other consumers; the rollout side of this node serves its "
        "own versions from memory and reads this directory only for versions it does not "
        "hold (published elsewhere, or dropped from memory).",
    )
    state_dir: str = Field(
        default="",
        description="Where SaveState writes checkpoints; empty = <adapter_cache_dir>/"
        ".trainer-state.",
    )
    # -- trainer -----------------------------------------------------------------------
    max_adapters: int = Field(default=8, ge=1, description="Trainer adapter slots.")
    max_rank: int = Field(default=16, ge=1, description="Largest LoRA rank the trainer accepts.")
    fuse: bool | None = Field(
        default=None,
        description="Fuse concurrent train requests of different adapters into one pass. "
        "Unset: on, except with batch-invariant passes (CPU), where it saves nothing.",
    )
    train_order: Literal["fewest_steps_first", "arrival"] = Field(
        default="fewest_steps_first",
        description="Which waiting train request goes next: the adapter with the fewest "
        "optimizer steps / fair-share weight first (experiments that fell behind catch up), or "
        "arrival order.",
    )
    fuse_max_wait_ms: float = Field(
        default=5.0, ge=0, description="How long a train request waits for others to fuse with."
    )
    fuse_max_batch_tokens: int = Field(
        default=65536, ge=1, description="Padded tokens of one fused forward/backward."
    )
    state_keep_last: int = Field(
        default=3,
        ge=0,
        description="SaveState checkpoints kept per adapter (the newest steps); older ones "
        "are deleted when a new one is written. 0 keeps every checkpoint.",
    )
    max_state_bytes: int = Field(
        default=4 * 1024**3, gt=0, description="Largest state checkpoint LoadState reads."
    )
    idempotency_max_entries: int = Field(
        default=10_000, ge=1, description="request_id answers remembered for replay."
    )
    idempotency_ttl_s: float = Field(
        default=3600.0, gt=0, description="How long a request_id answer is remembered."
    )
    # -- rollout -----------------------------------------------------------------------
    max_loras: int = Field(default=8, ge=1, description="Adapters in one rollout batch.")
    max_cpu_loras: int = Field(
        default=32, ge=1, description="Adapter versions the rollout engine keeps attached."
    )
    max_lora_rank: int = Field(default=16, ge=1, description="Largest rank the rollout serves.")
    max_model_len: int = Field(default=128, ge=8, description="Prompt + completion tokens.")
    max_num_seqs: int = Field(
        default=256, ge=1, description="Rows (prompts x samples) in one rollout batch."
    )
    batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="How long a Generate waits for others (other experiments) to share its "
        "batch, counted from the oldest waiting one.",
    )
    seed: int = Field(default=0, description="Sampling seed of requests without their own.")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        default="raw_logprobs",
        description="Returned logprobs: of the model's raw distribution (what the trainer "
        "recomputes) or after temperature/top-k/top-p.",
    )
    memory_versions: int = Field(
        default=32,
        ge=1,
        description="Published versions held in memory for the rollout side (superseded "
        "ones dropped first); older ones are served from the node cache.",
    )
    alias_ttl_s: float = Field(
        default=2.0, ge=0, description="How long a resolved @latest / @alias is reused."
    )
    preload: bool = Field(
        default=True,
        description="Load new versions announced by the registry's watch stream (versions "
        "saved on this node are always attached at once, from memory).",
    )
    watch: bool = Field(default=True, description="Subscribe to the registry's WatchAdapters.")
    verify_local_sha256: bool = Field(
        default=True, description="Hash file:// versions once before their first load."
    )
    allowed_adapter_roots: list[str] = Field(
        default_factory=list,
        description="More directories whose file:// versions are loaded in place.",
    )
    max_pending_sequences: int = Field(
        default=4096, ge=1, description="Rollout sequences admitted and unfinished at once."
    )
    max_n: int = Field(default=64, ge=1, description="Largest samples-per-prompt accepted.")
    default_max_tokens: int = Field(
        default=64, ge=1, description="max_tokens of requests that leave it 0."
    )

    def trainer_settings(self, **overrides: object) -> TrainerSettings:
        """The trainer's own settings for this node (``overrides`` win).

        Every trainer field is passed explicitly (NodeSettings has them all, a test
        checks it), so no ``LORAFLEET_TRAINER_*`` variable of the node's
        environment leaks in."""
        mine = type(self).model_fields
        values: dict[str, object] = {
            name: getattr(self, name) for name in TrainerSettings.model_fields if name in mine
        }
        if not self.torch_threads:
            # The trainer's own 0 leaves half the cores to a separate rollout engine;
            # here the rollout shares the model and takes turns with training.
            values["torch_threads"] = usable_cores()
        values.update(overrides)
        return TrainerSettings(**values)
