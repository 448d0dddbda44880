"""Wires the rollout service from its settings.

Start order: the engine first (before any gRPC channel exists: vLLM spawns its
workers, and nothing of ours should be half-open in the parent while it does),
then the registry client and the adapter watch, and only then does the server
report SERVING (``serve_app`` starts it after ``build_app`` returns).

Shutdown order (after the server stopped taking and finishing RPCs): stop the
watch and in-flight preloads, close the registry channel, then stop the engine
(its worker processes exit with it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import structlog

from lorafleet.core.app import ServiceApp
from lorafleet.core.config import ConfigError
from lorafleet.core.idempotency import InMemoryIdempotencyStore
from lorafleet.rollout.adapters import AdapterManager
from lorafleet.rollout.config import RolloutSettings
from lorafleet.rollout.engine import Engine
from lorafleet.rollout.server import RolloutServicer, servicer_binding
from lorafleet.rollout.service import RolloutService

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class RolloutRuntime:
    """Everything ``build_app`` wires, for callers (benchmarks, the co-located
    node) that also want the domain objects."""

    engine: Engine
    adapters: AdapterManager
    rollout: RolloutService
    app: ServiceApp


def resolve_model_path(model_path: str) -> str:
    """The base model directory; empty means the project's tiny model (built on
    first use into its cache)."""
    if model_path:
        return model_path
    from lorafleet.models.cache import ensure_tiny_model

    return str(ensure_tiny_model())


def make_engine(settings: RolloutSettings, model_path: str) -> Engine:
    if settings.engine == "vllm":
        from lorafleet.rollout.vllm_engine import VllmEngine

        return VllmEngine(
            model_path=model_path,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_gib=settings.kv_cache_gib,
            dtype=settings.dtype,
            seed=settings.seed,
            enforce_eager=settings.enforce_eager,
            max_num_seqs=settings.max_num_seqs,
            logprobs_mode=settings.logprobs_mode,
            health_check_interval_s=settings.health_check_interval_s,
            spin_ms=settings.engine_spin_ms,
            preload_tcmalloc=settings.preload_tcmalloc,
            cpu_one_process=settings.cpu_one_process_engine,
            share_prompt_rows=settings.share_prompt_rows,
        )
    try:
        from lorafleet.rollout.torch_engine import (  # type: ignore[import-not-found]
            TorchEngine,
        )
    except ImportError as exc:
        raise ConfigError(
            "engine 'torch' is not available in this build", reason="ENGINE_UNAVAILABLE"
        ) from exc
    return TorchEngine.from_settings(settings, model_path)  # type: ignore[no-any-return]


async def build_runtime(settings: RolloutSettings) -> RolloutRuntime:
    from lorafleet.client.registry import AsyncRegistryClient
    from lorafleet.rollout.resolvers import RegistryResolver

    model_path = await asyncio.to_thread(resolve_model_path, settings.model_path)
    engine = make_engine(settings, model_path)
    await engine.start()
    try:
        cache_dir = Path(settings.adapter_cache_dir).absolute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        client = AsyncRegistryClient(
            settings.registry_address, timeout_s=settings.registry_timeout_s
        )
        adapters = AdapterManager(
            RegistryResolver(client, node_id=settings.node_id),
            engine,
            cache_dir=cache_dir,
            allowed_roots=[Path(p) for p in settings.allowed_adapter_roots],
            alias_ttl_s=settings.alias_ttl_s,
            verify_local_sha256=settings.verify_local_sha256,
            preload=settings.preload,
            watch=settings.watch,
        )
        await adapters.start()
    except BaseException:
        await engine.close()
        raise
    rollout = RolloutService(
        engine,
        adapters,
        base_model=model_path,
        max_pending_sequences=settings.max_pending_sequences,
        max_n=settings.max_n,
        default_max_tokens=settings.default_max_tokens,
    )
    servicer = RolloutServicer(rollout, InMemoryIdempotencyStore())

    async def shutdown() -> None:
        await adapters.close()
        await engine.close()

    app = ServiceApp(bindings=[servicer_binding(servicer)], on_shutdown=[shutdown])
    log.info(
        "rollout_ready",
        engine=settings.engine,
        model=model_path,
        registry=settings.registry_address,
        adapter_cache_dir=str(cache_dir),
    )
    return RolloutRuntime(engine=engine, adapters=adapters, rollout=rollout, app=app)


async def build_app(settings: RolloutSettings) -> ServiceApp:
    return (await build_runtime(settings)).app
