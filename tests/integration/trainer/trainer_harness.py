"""Real trainers (and a real registry) on port 0 for the trainer tests.

In-process servers (``start_trainer``) for API tests; separate processes are
started through ``lorafleet.cluster.local.LocalCluster`` where a test needs a
fresh interpreter (resume).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio

from lorafleet.client.registry import AsyncRegistryClient
from lorafleet.client.trainer import AsyncTrainerClient, sample
from lorafleet.core.server import create_server, start_server
from lorafleet.registry.app import RegistryRuntime
from lorafleet.registry.app import build_runtime as build_registry
from lorafleet.registry.config import RegistrySettings
from lorafleet.trainer.app import TrainerRuntime, build_runtime
from lorafleet.trainer.config import TrainerSettings

# Small enough to start in a moment, big enough for ranks up to 16 on every module.
LLAMA_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=64,
    max_position_embeddings=128,
)


def write_llama(path: Path, seed: int = 1234) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG))
    model.save_pretrained(path)
    return path


@dataclass
class RunningTrainer:
    address: str
    settings: TrainerSettings
    runtime: TrainerRuntime
    server: grpc.aio.Server
    client: AsyncTrainerClient
    stopped: bool = False

    async def stop(self) -> None:
        """Stop the server and the runtime; once (a test may stop it early)."""
        if self.stopped:
            return
        self.stopped = True
        await self.client.close()
        await self.server.stop(grace=None)
        await self.runtime.app.shutdown()


async def start_trainer(settings: TrainerSettings) -> RunningTrainer:
    runtime = await build_runtime(settings)
    server, port, health = await create_server(
        "127.0.0.1:0", runtime.app.bindings, settings=settings
    )
    await start_server(server, health, runtime.app.bindings)
    address = f"127.0.0.1:{port}"
    return RunningTrainer(address, settings, runtime, server, AsyncTrainerClient(address))


@dataclass
class RunningRegistry:
    address: str
    runtime: RegistryRuntime
    server: grpc.aio.Server
    client: AsyncRegistryClient

    async def stop(self) -> None:
        await self.client.close()
        await self.server.stop(grace=None)
        await self.runtime.app.shutdown()


async def start_registry(data_dir: Path, file_roots: dict[str, Path]) -> RunningRegistry:
    settings = RegistrySettings(
        data_dir=data_dir,
        file_roots=file_roots,
        retention_min_age_s=0.0,
        watch_poll_interval_s=0.2,
    )
    runtime = await build_registry(settings)
    server, port, health = await create_server(
        "127.0.0.1:0", runtime.app.bindings, settings=settings
    )
    await start_server(server, health, runtime.app.bindings)
    address = f"127.0.0.1:{port}"
    return RunningRegistry(address, runtime, server, AsyncRegistryClient(address))


@asynccontextmanager
async def trainer_beside_registry(
    tmp_path: Path, model_dir: Path, node_id: str, **settings: Any
) -> AsyncIterator[tuple[RunningTrainer, RunningRegistry, Path]]:
    """A trainer and a registry that may read the trainer's node cache (the
    pairing that publishes by reference); yields both and the cache directory."""
    cache = tmp_path / node_id / "adapters"
    cache.mkdir(parents=True)
    registry = await start_registry(tmp_path / "registry", {node_id: cache})
    trainer = await start_trainer(
        TrainerSettings(
            model_path=str(model_dir),
            adapter_cache_dir=str(cache),
            node_id=node_id,
            registry_address=registry.address,
            **settings,
        )
    )
    try:
        yield trainer, registry, cache
    finally:
        await trainer.stop()
        await registry.stop()


def random_samples(
    rng,
    n: int,
    *,
    vocab: int = 64,
    prompt: int = 4,
    completion: int = 6,
    bad_logprobs: bool = False,
):
    """``n`` policy-gradient samples of random tokens (the trainer does not care
    where they came from); ``bad_logprobs`` gives one logprob too few."""
    out = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(prompt + completion)]
        k = completion - 1 if bad_logprobs else completion
        out.append(
            sample(
                ids,
                prompt_length=prompt,
                logprobs=[-4.3 + 0.3 * rng.random() for _ in range(k)],
                advantage=rng.uniform(-1.0, 1.0),
            )
        )
    return out
