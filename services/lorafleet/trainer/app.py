"""Wires the trainer service from its settings.

Start order: load the base model once (the slow part: it then stays hot for the
life of the process, whatever adapters come and go), then the fusing queue, the
registry client and the servicer; the server reports SERVING only after
``build_app`` returns, so no RPC ever waits for the model.

Shutdown order (after the server stopped taking and finishing RPCs): close the
fusing queue (waiting requests get UNAVAILABLE), then the registry channel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from lorafleet.client.registry import AsyncRegistryClient
from lorafleet.core.app import ServiceApp
from lorafleet.core.config import ConfigError
from lorafleet.core.idempotency import InMemoryIdempotencyStore
from lorafleet.trainer import metrics as trainer_metrics
from lorafleet.trainer.config import TrainerSettings, usable_cores
from lorafleet.trainer.fencing import FENCE_JOURNAL_NAME, AdapterFences, FenceJournal
from lorafleet.trainer.servicer import TrainerServicer, servicer_binding
from lorafleet.trainer.storage import AdapterCache, StateStore

log = structlog.get_logger(__name__)

TINY_MODEL_NAME = "tiny"


@dataclass
class TrainerRuntime:
    """Everything ``build_app`` wires, for callers (tests, benchmarks, the
    co-located node) that also want the domain objects."""

    engine: object  # lorafleet.lora.engine.TrainEngine (torch imported lazily)
    queue: object  # lorafleet.lora.fusing.FusingQueue
    registry: AsyncRegistryClient
    servicer: TrainerServicer
    app: ServiceApp


def resolve_model_path(model_path: str) -> tuple[str, str]:
    """(base model directory, default name): empty means the project's tiny model,
    built on first use into its cache."""
    if model_path:
        return model_path, model_path
    try:
        from lorafleet.models.cache import ensure_tiny_model  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ConfigError(
            "model_path is empty and the tiny model builder (lorafleet.models.cache) is not "
            "available; set LORAFLEET_TRAINER_MODEL_PATH",
            reason="NO_MODEL",
        ) from exc
    return str(ensure_tiny_model()), TINY_MODEL_NAME


def default_torch_threads(device: str) -> int | None:
    """Half the usable cores on a CPU device (the rollout engine has the rest);
    None (torch's own choice) on an accelerator."""
    if not device.startswith("cpu"):
        return None
    return max(1, usable_cores() // 2)


async def build_runtime(settings: TrainerSettings) -> TrainerRuntime:
    import torch

    from lorafleet.lora.engine import TrainEngine
    from lorafleet.lora.fusing import FusingQueue

    threads = settings.torch_threads or default_torch_threads(settings.device)
    if threads:
        torch.set_num_threads(threads)
    model_path, default_name = await asyncio.to_thread(resolve_model_path, settings.model_path)
    engine = await asyncio.to_thread(
        TrainEngine.from_pretrained,
        model_path,
        dtype=getattr(torch, settings.dtype),
        device=settings.device,
        max_adapters=settings.max_adapters,
        max_rank=settings.max_rank,
        batch_invariant=settings.batch_invariant,
        share_prompts=settings.share_prompts,
        micro_batch_tokens=settings.micro_batch_tokens,
    )
    base_model_name = settings.base_model_name or default_name
    # Written into every adapter_config.json: a stable name, not this machine's path.
    engine.base_model = base_model_name
    queue = FusingQueue(
        engine,
        max_wait_ms=settings.fuse_max_wait_ms,
        max_batch_tokens=settings.fuse_max_batch_tokens,
        on_batch=trainer_metrics.observe_fused_batch,
        fuse=settings.fuse if settings.fuse is not None else not engine.batch_invariant,
        priority=engine.steps_taken if settings.train_order == "fewest_steps_first" else None,
    )
    trainer_metrics.track_engine(engine)
    cache = AdapterCache(settings.cache_path)
    cache.root.mkdir(parents=True, exist_ok=True)
    states = StateStore(
        settings.state_path,
        max_bytes=settings.max_state_bytes,
        keep_last=settings.state_keep_last,
    )
    registry = AsyncRegistryClient(settings.registry_address, timeout_s=settings.registry_timeout_s)
    servicer = TrainerServicer(
        engine,
        queue,
        registry,
        cache,
        states,
        InMemoryIdempotencyStore(
            max_entries=settings.idempotency_max_entries, ttl_s=settings.idempotency_ttl_s
        ),
        node_id=settings.node_id,
        base_model_name=base_model_name,
        # Beside the state checkpoints: where a restarted trainer finds them.
        fences=AdapterFences(FenceJournal(settings.state_path / FENCE_JOURNAL_NAME)),
    )
    app = ServiceApp(bindings=[servicer_binding(servicer)])
    app.on_shutdown.append(queue.close)
    app.on_shutdown.append(registry.close)
    log.info(
        "trainer_ready",
        model_path=model_path,
        base_model=base_model_name,
        node_id=settings.node_id,
        adapter_cache_dir=str(cache.root),
        state_dir=str(states.root),
        slots=settings.max_adapters,
        max_rank=settings.max_rank,
        base_model_bytes=servicer.base_model_bytes,
    )
    return TrainerRuntime(engine, queue, registry, servicer, app)


async def build_app(settings: TrainerSettings) -> ServiceApp:
    return (await build_runtime(settings)).app
