"""The rollout side's adapter manager on the co-located node.

Versions the node's own trainer published are served from memory
(:class:`~lorafleet.node.memory.MemoryVersions`): the engine attaches the
published snapshot's tensors, with no file read and no copy. Every other version
(published elsewhere, or no longer held in memory) goes through the regular
:class:`~lorafleet.rollout.adapters.AdapterManager` (the node cache's
``file://`` in place, or a verified download), exactly as on a rollout-only
node. Requests see one manager either way (the interface ``RolloutService``
uses: ``use``, ``load``, ``unload``, ``list_loaded``).

Resolution: a fixed version held in memory needs no registry round trip (a
published version is immutable); ``@latest`` is the newer of the registry's
answer (cached by the inner manager) and the newest version held in memory,
so the first request after a SaveVersion on this node already sees it, and
the node keeps serving from memory while the registry is unreachable.

Slots: memory versions count against the engine's ``max_cpu_loras`` together
with the inner manager's; when room is needed the victim is an unpinned
memory version (superseded first, then least recently used). The inner manager
evicts only its own, so the two together may briefly hold more than
``max_cpu_loras`` when every memory version is pinned (the torch engine has no
hard slot limit; adapters cost memory only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from lorafleet.core.errors import FailedPrecondition, LorafleetError, Unavailable
from lorafleet.node.memory import SOURCE, MemoryVersions, is_memory_uri
from lorafleet.rollout import metrics as rollout_metrics
from lorafleet.rollout.adapters import AdapterManager
from lorafleet.rollout.types import (
    LATEST,
    AdapterRef,
    AdapterSelection,
    EngineAdapter,
    LoadedVersion,
)

log = structlog.get_logger(__name__)

# Engine ids of memory versions, far from the inner manager's (which count from 1).
MEMORY_ENGINE_ID_BASE = 1 << 40
_ATTEMPTS = 5


class _Gone(Exception):
    """The memory snapshot was dropped before it could be attached."""


@dataclass
class _Entry:
    adapter: EngineAdapter
    load_ms: float
    last_used: int
    pins: int = 0


class NodeAdapterManager:
    def __init__(self, inner: AdapterManager, memory: MemoryVersions) -> None:
        self.inner = inner
        self.engine = inner.engine
        self.memory = memory
        self._loaded: dict[tuple[str, int], _Entry] = {}
        self._loading: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._engine_ids: dict[tuple[str, int], int] = {}
        self._next_id = itertools.count(MEMORY_ENGINE_ID_BASE)
        self._tick = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self.memory_loads = 0
        """Versions attached from memory (never from a file)."""

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        tasks = [*self._background, *self._loading.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.inner.close()

    # -- resolution -------------------------------------------------------------------

    async def resolve(self, selection: AdapterSelection) -> AdapterRef:
        if selection.version is not None:
            held = self.memory.lookup(selection.adapter_id, selection.version)
            if held is not None:
                return held.ref
            return await self.inner.resolve(selection)
        newest = self.memory.latest(selection.adapter_id) if selection.alias == LATEST else None
        try:
            ref = await self.inner.resolve(selection)
        except Unavailable:
            if newest is None:
                raise
            log.warning("adapter_resolve_from_memory", selection=str(selection),
                        version=newest.ref.version)
            return newest.ref
        if newest is not None and newest.ref.version > ref.version:
            return newest.ref
        held = self.memory.lookup(ref.adapter_id, ref.version)
        return held.ref if held is not None else ref

    # -- loading ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, selection: AdapterSelection) -> AsyncIterator[EngineAdapter]:
        ref = await self.resolve(selection)
        entry = await self._acquire(ref, pin=True) if is_memory_uri(ref.uri) else None
        if entry is not None:
            try:
                yield entry.adapter
            finally:
                entry.pins -= 1
            return
        fixed = AdapterSelection(ref.adapter_id, version=ref.version)
        async with self.inner.use(fixed) as adapter:
            yield adapter

    async def load(
        self, target: AdapterSelection | AdapterRef, *, trigger: str = "operator"
    ) -> LoadedVersion:
        if isinstance(target, AdapterSelection):
            ref = await self.resolve(target)
        else:
            held = self.memory.lookup(target.adapter_id, target.version)
            ref = held.ref if held is not None else target
        if is_memory_uri(ref.uri):
            entry = await self._acquire(ref, pin=False, trigger=trigger)
            if entry is not None:
                return self._record(entry, active=True)
            if isinstance(target, AdapterRef) and is_memory_uri(target.uri):
                raise FailedPrecondition(
                    f"{ref.engine_name} is not held in memory on this node",
                    reason="ADAPTER_LOAD_FAILED",
                    metadata={"adapter": ref.engine_name},
                )
            target = AdapterSelection(ref.adapter_id, version=ref.version)
        return await self.inner.load(target, trigger=trigger)

    def preload(self, ref: AdapterRef) -> None:
        """Attach a just-published memory version in the background, so the first
        request naming it finds it ready."""
        task = asyncio.create_task(self._preload(ref), name=f"preload-{ref.engine_name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _preload(self, ref: AdapterRef) -> None:
        try:
            await self._acquire(ref, pin=False, trigger="publish")
        except LorafleetError as exc:
            log.warning("adapter_preload_failed", adapter=ref.engine_name, reason=exc.reason,
                        error=str(exc))
        except Exception:
            log.exception("adapter_preload_failed", adapter=ref.engine_name)

    async def unload(self, adapter_id: str, version: int = 0) -> int:
        keys = [k for k in self._loaded if k[0] == adapter_id and version in (0, k[1])]
        busy = [k for k in keys if self._loaded[k].pins > 0]
        if busy:
            raise FailedPrecondition(
                f"{adapter_id}@{busy[0][1]} is serving requests; unload it when they finish",
                reason="ADAPTER_IN_USE",
                metadata={"adapter": f"{adapter_id}@{busy[0][1]}"},
            )
        for key in keys:
            await self._evict(key, reason="unload")
        return len(keys) + await self.inner.unload(adapter_id, version)

    def list_loaded(self) -> list[LoadedVersion]:
        mine = sorted(self._loaded.values(), key=lambda e: -e.last_used)
        return [
            *self.inner.list_loaded(),
            *(self._record(e, active=i < self.engine.max_loras) for i, e in enumerate(mine)),
        ]

    def is_loaded(self, adapter_id: str, version: int) -> bool:
        return (adapter_id, version) in self._loaded or self.inner.is_loaded(adapter_id, version)

    def memory_loaded(self) -> list[tuple[str, int]]:
        return sorted(self._loaded)

    def _record(self, entry: _Entry, *, active: bool) -> LoadedVersion:
        a = entry.adapter
        return LoadedVersion(
            adapter_id=a.adapter_id,
            version=a.version,
            engine_name=a.name,
            rank=a.rank,
            load_ms=entry.load_ms,
            active=active,
            path=a.path,
            source=SOURCE,
        )

    async def _acquire(
        self, ref: AdapterRef, *, pin: bool, trigger: str = "request"
    ) -> _Entry | None:
        """The loaded entry (pinned if asked); None when the snapshot is gone
        (the caller then takes the file/registry path)."""
        for _ in range(_ATTEMPTS):
            entry = self._loaded.get(ref.key)
            if entry is not None:
                entry.last_used = next(self._tick)
                if pin:
                    entry.pins += 1
                return entry
            task = self._loading.get(ref.key)
            if task is None:
                task = asyncio.create_task(self._load(ref, trigger))
                self._loading[ref.key] = task
                task.add_done_callback(functools.partial(self._load_done, ref.key))
            try:
                await asyncio.shield(task)
            except _Gone:
                return None
        raise Unavailable(
            f"{ref.engine_name} kept being evicted while loading", reason="ADAPTER_SLOTS_BUSY"
        )

    def _load_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled():
            task.exception()

    async def _load(self, ref: AdapterRef, trigger: str) -> None:
        started = time.perf_counter()
        held = self.memory.lookup(ref.adapter_id, ref.version)
        if held is None:
            raise _Gone
        await self._make_room()
        engine_id = self._engine_ids.get(ref.key)
        if engine_id is None:
            engine_id = self._engine_ids[ref.key] = next(self._next_id)
        adapter = EngineAdapter(
            adapter_id=ref.adapter_id,
            version=ref.version,
            engine_id=engine_id,
            path=held.ref.uri,
            rank=held.snapshot.spec.rank,
        )
        await self.engine.add_adapter(adapter)
        load_s = time.perf_counter() - started
        self._loaded[ref.key] = _Entry(adapter, load_s * 1000, next(self._tick))
        self.memory_loads += 1
        # The rollout service's own histogram, so one dashboard panel covers
        # file, download and memory loads alike.
        rollout_metrics.ADAPTER_LOAD_SECONDS.labels(SOURCE, trigger).observe(load_s)
        log.info(
            "adapter_loaded",
            adapter=ref.adapter_id,
            version=ref.version,
            engine_id=engine_id,
            rank=adapter.rank,
            source=SOURCE,
            trigger=trigger,
            uri=adapter.path,
            load_ms=round(load_s * 1000, 2),
        )

    async def _make_room(self) -> None:
        while len(self._loaded) + len(self.inner.list_loaded()) >= self.engine.max_cpu_loras:
            free = [(k, e) for k, e in self._loaded.items() if e.pins == 0]
            if not free:
                return
            newest: dict[str, int] = {}
            for aid, version in self._loaded:
                newest[aid] = max(newest.get(aid, 0), version)
            superseded = [(k, e) for k, e in free if k[1] < newest[k[0]]]
            victim = min(superseded or free, key=lambda item: item[1].last_used)[0]
            await self._evict(victim, reason="lru")

    async def _evict(self, key: tuple[str, int], *, reason: str) -> None:
        entry = self._loaded.pop(key, None)
        if entry is None:
            return
        await self.engine.remove_adapter(entry.adapter)
        log.info("adapter_unloaded", adapter=key[0], version=key[1], reason=reason,
                 source=SOURCE)
