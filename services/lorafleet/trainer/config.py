"""Trainer settings (env prefix ``LORAFLEET_TRAINER_``).

Pairing with the registry (publish by reference)
------------------------------------------------
SaveVersion writes each version into ``<adapter_cache_dir>/<adapter_id>/v<N>/`` and
publishes it to the registry as an absolute ``file://`` URI. The registry reads it
only from inside one of its ``file_roots`` (registry setting, node id -> directory),
so the registry must list this trainer's cache directory (or a parent of it):

    # trainer on node-0
    LORAFLEET_TRAINER_NODE_ID=node-0
    LORAFLEET_TRAINER_ADAPTER_CACHE_DIR=/var/cache/lorafleet/adapters
    # registry (same machine or a shared mount)
    LORAFLEET_REGISTRY_FILE_ROOTS='{"node-0": "/var/cache/lorafleet/adapters"}'

Relative paths are resolved against each process's working directory. The local
cluster (``lorafleet.cluster.topology``) starts every process with the cluster run
directory as cwd, the trainer of node i with ``adapter_cache_dir =
var/node-<i>/adapters`` and the registry with its default ``file_roots =
{"local": "var"}``: both resolve inside ``<run dir>/var``, so the pairing holds
with no extra setting (the trainer always sends absolute URIs). Use the same id
for ``node_id`` here and in the registry's ``file_roots`` to let the registry's
ResolveVersion prefer this node's ``file://`` copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings

STATE_SUBDIR = ".trainer-state"
"""Default home of SaveState checkpoints inside the adapter cache; adapter ids
never start with a dot, so it cannot clash with an adapter's directory."""


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_TRAINER_", extra="forbid")

    model_path: str = Field(
        default="",
        description="HF model directory of the base model; empty = the project's tiny model "
        "(built on first use by lorafleet.models.cache.ensure_tiny_model).",
    )
    base_model_name: str = Field(
        default="",
        description="Name of the base model as reported by GetTrainerStatus, written into "
        "adapter_config.json (base_model_name_or_path) and used when SaveVersion has to "
        'create the registry adapter. Empty = model_path ("tiny" for the tiny model).',
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Dtype of the frozen base weights. float32 keeps the trainer's logprobs "
        "within ~1e-7 of the rollout engine on CPU; bfloat16 is the usual choice on GPU.",
    )
    device: str = Field(
        default="cpu", description="torch device of the base model and adapters (cpu, cuda)."
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads (torch.set_num_threads); 0 = auto: on a CPU "
        "device half the cores this process may use (at least 1), the other half being the "
        "co-located rollout engine's; on a GPU, torch's default. Threads beyond the cores "
        "left over spin against the engine's (measured on 2 cores, 8 concurrent "
        "experiments: 2 threads 81.5 s, 1 thread 70.3 s; 1 experiment: no difference).",
    )
    batch_invariant: bool | None = Field(
        default=None,
        description="Fused passes never put two requests in one micro-batch, so every "
        "adapter's update is bit-identical to training it alone. Unset: on for a CPU "
        "device (free there), off on GPUs (mixed micro-batches fill the device).",
    )
    micro_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Padded tokens of one forward/backward inside a fused pass, which bounds "
        "the pass's activation memory. Unset: 1024 on CPU, 16384 on GPUs (on an H200, "
        "Qwen2.5-0.5B architecture in bf16: peak 42 GiB, within 2% of the speed of 32768 at "
        "82 GiB; benchmarks/README.md, GPU checks). A pass that runs out of device memory "
        "fails with RESOURCE_EXHAUSTED TRAIN_PASS_OUT_OF_MEMORY, naming this setting.",
    )
    share_prompts: bool = Field(
        default=True,
        description="Samples of a request that repeat a prompt (GRPO groups) run that prompt "
        "once, their completions attending to its cached keys and values: the same gradient "
        "on fewer tokens (tiny model, 16 prompts x 8 samples: 25% less time per step). Not "
        "used by passes with a KL term or LoRA dropout.",
    )
    node_id: str = Field(
        default="local",
        description="This node's id, as the registry's file_roots names it: CreateAdapter "
        "from_version asks the registry for this node's file:// copy (loaded in place).",
    )
    registry_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the AdapterRegistryService."
    )
    registry_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of each unary call to the registry."
    )
    adapter_cache_dir: str = Field(
        default="var/node/adapters",
        description="Node-local adapter cache shared with the rollout service (tmpfs in "
        "production). Versions are written to <dir>/<adapter_id>/v<N>/; the registry's "
        "file_roots must contain this directory (see the module docstring).",
    )
    state_dir: str = Field(
        default="",
        description="Where SaveState writes optimizer checkpoints (one safetensors file "
        f"each). Empty = <adapter_cache_dir>/{STATE_SUBDIR}.",
    )
    state_keep_last: int = Field(
        default=3,
        ge=0,
        description="SaveState checkpoints kept per adapter (the newest steps); older ones "
        "are deleted when a new one is written. 0 keeps every checkpoint.",
    )
    max_adapters: int = Field(default=8, ge=1, description="Adapter slots on this trainer.")
    max_rank: int = Field(default=16, ge=1, description="Largest LoRA rank accepted.")
    fuse: bool | None = Field(
        default=None,
        description="Run concurrent train requests of different adapters in one fused "
        "pass. Unset: on, except where passes are batch-invariant (the CPU default), since "
        "there a fused pass costs what its requests cost one by one and only makes each "
        "wait for the last; each request then runs alone and returns when its pass ends.",
    )
    train_order: Literal["fewest_steps_first", "arrival"] = Field(
        default="fewest_steps_first",
        description="Which waiting train request goes next: the one of the adapter with "
        "the fewest optimizer steps, so an experiment that fell behind catches up and "
        "concurrent experiments finish together, or arrival order. An adapter's own "
        "requests always keep their order. Steps are divided by the request's fair-share "
        "weight (TrainStepRequest.weight), so an experiment of weight 2 may run up to twice as "
        "many steps as one of weight 1 when training is the bottleneck. Measured on 2 "
        "cores, 8 experiments at once, against fused passes in arrival order: 60 steps "
        "63.0 and 65.5 s -> 58.2 and 58.0 s, 180 steps 168.3 and 175.5 s -> 166.0 and "
        "170.0 s (unfused in arrival order gained nothing).",
    )
    fuse_max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long a train request waits for requests of other adapters to "
        "fuse with (counted from the oldest waiting one; with fuse on).",
    )
    fuse_max_batch_tokens: int = Field(
        default=65536,
        ge=1,
        description="Token budget (padded tokens) of one fused forward/backward.",
    )
    max_state_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Largest state checkpoint LoadState reads.",
    )
    idempotency_max_entries: int = Field(
        default=10_000,
        ge=1,
        description="request_id answers remembered for replay (in memory: the trainer has "
        "no durable database; a restarted trainer is restored by the scheduler).",
    )
    idempotency_ttl_s: float = Field(
        default=3600.0, gt=0, description="How long a request_id answer is remembered."
    )

    @property
    def cache_path(self) -> Path:
        """``adapter_cache_dir`` made absolute (against the working directory)."""
        return Path(self.adapter_cache_dir).expanduser().absolute()

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser().absolute()
        return self.cache_path / STATE_SUBDIR


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
