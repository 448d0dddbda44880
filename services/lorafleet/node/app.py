"""Wires the co-located node: TrainerService and RolloutService in one process,
on one in-memory base model.

Start order: the trainer runtime first (it loads the base model, once: the only
model load of the node), then the torch rollout engine on that same module
(``model``, routing state and lock shared), the rollout side's registry client
and adapter manager; the server reports both services SERVING only after
``build_app`` returns.

Shutdown order (after the server stopped taking and finishing RPCs): the rollout
side first (stop the watch and preloads, close its registry channel, detach the
rollout versions from the shared layers), then the trainer's own shutdown (fusing
queue, registry channel).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import structlog

from lorafleet.core.app import ServiceApp
from lorafleet.core.idempotency import InMemoryIdempotencyStore
from lorafleet.node import metrics as node_metrics
from lorafleet.node.adapters import NodeAdapterManager
from lorafleet.node.config import NodeSettings
from lorafleet.node.memory import MemoryVersions
from lorafleet.node.trainer import NodeTrainerServicer, SnapshottingEngine, engine_lock
from lorafleet.rollout.resolvers import ref_from_pb
from lorafleet.rollout.server import RolloutServicer
from lorafleet.rollout.server import servicer_binding as rollout_binding
from lorafleet.rollout.service import RolloutService
from lorafleet.trainer import app as trainer_app
from lorafleet.trainer.servicer import process_memory_bytes
from lorafleet.trainer.servicer import servicer_binding as trainer_binding

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class NodeRuntime:
    """Everything ``build_app`` wires (for tests and benchmarks)."""

    trainer: trainer_app.TrainerRuntime
    engine: object  # lorafleet.rollout.torch_engine.TorchEngine (torch imported lazily)
    memory: MemoryVersions
    adapters: NodeAdapterManager
    rollout: RolloutService
    app: ServiceApp


async def build_runtime(settings: NodeSettings) -> NodeRuntime:
    from lorafleet.client.registry import AsyncRegistryClient
    from lorafleet.rollout.adapters import AdapterManager
    from lorafleet.rollout.resolvers import RegistryResolver
    from lorafleet.rollout.torch_engine import TorchEngine

    model_path, default_name = await asyncio.to_thread(
        trainer_app.resolve_model_path, settings.model_path
    )
    trainer = await trainer_app.build_runtime(
        settings.trainer_settings(
            model_path=model_path, base_model_name=settings.base_model_name or default_name
        )
    )
    train_engine = trainer.engine
    memory = MemoryVersions(settings.node_id, capacity=settings.memory_versions)
    # The servicer saves versions through this wrapper, which keeps each snapshot.
    trainer.servicer.engine = SnapshottingEngine(train_engine, memory)  # type: ignore[assignment]
    engine = TorchEngine(
        model_path=model_path,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        device=settings.device,
        seed=settings.seed,
        max_num_seqs=settings.max_num_seqs,
        batch_wait_ms=settings.batch_wait_ms,
        logprobs_mode=settings.logprobs_mode,
        model=train_engine.model,  # type: ignore[attr-defined]
        routing_state=train_engine.lora.state,  # type: ignore[attr-defined]
        lock=engine_lock(train_engine),  # type: ignore[arg-type]
        memory=memory,
    )
    try:
        await engine.start()
        cache_dir = Path(settings.adapter_cache_dir).absolute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        inner = AdapterManager(
            RegistryResolver(
                AsyncRegistryClient(
                    settings.registry_address, timeout_s=settings.registry_timeout_s
                ),
                node_id=settings.node_id,
            ),
            engine,
            cache_dir=cache_dir,
            allowed_roots=[Path(p) for p in settings.allowed_adapter_roots],
            alias_ttl_s=settings.alias_ttl_s,
            verify_local_sha256=settings.verify_local_sha256,
            preload=settings.preload,
            watch=settings.watch,
        )
        adapters = NodeAdapterManager(inner, memory)
        await adapters.start()
    except BaseException:
        await engine.close()
        await trainer.app.shutdown()
        raise
    rollout = RolloutService(
        engine,
        adapters,  # type: ignore[arg-type]
        base_model=trainer.servicer.base_model_name,
        max_pending_sequences=settings.max_pending_sequences,
        max_n=settings.max_n,
        default_max_tokens=settings.default_max_tokens,
    )

    async def hand_over(ref_pb: object) -> None:
        """A version the registry accepted: serve it from memory from now on."""
        version = memory.publish(ref_from_pb(ref_pb))
        if version is not None:
            node_metrics.MEMORY_HANDOVERS.inc()
            adapters.preload(version.ref)

    node_metrics.track(memory, adapters, process_memory_bytes)
    trainer_servicer = NodeTrainerServicer(trainer.servicer, hand_over)
    rollout_servicer = RolloutServicer(rollout, InMemoryIdempotencyStore())

    async def shutdown_rollout() -> None:
        await adapters.close()
        await engine.close()

    app = ServiceApp(
        bindings=[
            rollout_binding(rollout_servicer),
            trainer_binding(trainer_servicer),  # type: ignore[arg-type]
        ],
        on_shutdown=[shutdown_rollout, *trainer.app.on_shutdown],
    )
    log.info(
        "node_ready",
        model=model_path,
        node_id=settings.node_id,
        registry=settings.registry_address,
        adapter_cache_dir=str(cache_dir),
        trainer_slots=settings.max_adapters,
        rollout_max_loras=settings.max_loras,
    )
    return NodeRuntime(
        trainer=trainer, engine=engine, memory=memory, adapters=adapters, rollout=rollout, app=app
    )


async def build_app(settings: NodeSettings) -> ServiceApp:
    return (await build_runtime(settings)).app
