"""The adapter manager: which adapter versions the engine holds, and how they get there.

Resolution. A request names ``adapter@version``, ``adapter@alias`` or
``adapter@latest``; an :class:`AdapterResolver` (the registry, in production)
turns that into an :class:`~lorafleet.rollout.types.AdapterRef`. Fixed versions
are immutable, so their refs are cached for good (LRU-bounded); ``latest`` and
aliases are cached for ``alias_ttl_s`` and replaced as soon as the registry's
watch stream announces a new version. When the registry cannot be reached, a
stale alias answer is served rather than failing the rollout (logged).

Loading by reference. A ``file://`` ref inside the node-local cache (or another
allowed root) is loaded in place: the trainer wrote it there, nothing is copied.
Anything else (``s3://``, a ``file://`` of another machine, a local copy that no
longer matches its digest) is downloaded through the registry into
``<cache>/.rollout-downloads/`` and verified against the manifest sha256 before
the engine sees it. A version's files are hashed once per process.

Naming. The engine knows a version as ``"<adapter_id>@<version>"`` with an int id
unique per (adapter, version) for the life of the process: vLLM keys its prefix
cache by LoRA name and path, so blocks computed under one version can never be
served to another.

Slots and eviction. At most ``engine.max_cpu_loras`` versions are loaded. When
a load needs room, the victim is an unpinned (no request in flight) version,
preferring superseded ones (an older version of an adapter whose newer version
is loaded), then least recently used. An evicted version is just not loaded: the
next request for it reloads it from its ref, so a READY version never answers
NOT_FOUND because it was evicted. (vLLM additionally keeps its own LRU over
``max_loras`` active slots inside a batch.)

Preloading. The manager subscribes to the resolver's watch stream; a new version
of an adapter this node has served is loaded right away, so the first request
naming it finds it ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import structlog

from lorafleet.core.errors import (
    DataLoss,
    FailedPrecondition,
    LorafleetError,
    ResourceExhausted,
    Unavailable,
)
from lorafleet.rollout import metrics
from lorafleet.rollout.engine import Engine
from lorafleet.rollout.types import (
    CONFIG_FILE,
    LATEST,
    WEIGHTS_FILE,
    AdapterRef,
    AdapterSelection,
    EngineAdapter,
    FileDigest,
    LoadedVersion,
)

log = structlog.get_logger(__name__)

DOWNLOADS_DIR = ".rollout-downloads"
_HASH_CHUNK = 1 << 20
# Attempts to pin a version that concurrent loads keep evicting before giving up
# (only reachable when every slot is pinned by in-flight requests).
_PIN_ATTEMPTS = 5


class AdapterResolver(Protocol):
    """Where adapter versions are looked up (the registry, or a named fake)."""

    async def resolve(self, selection: AdapterSelection) -> AdapterRef:
        """The READY version ``selection`` names.

        Raises:
            NotFound: unknown adapter, version or alias.
            Unavailable: the resolver cannot be reached.
        """
        ...

    async def download(self, ref: AdapterRef, dest_dir: Path) -> None:
        """Write the version's files into ``dest_dir`` (created)."""
        ...

    def watch(self) -> AsyncIterator[AdapterRef]:
        """Newly READY versions of every adapter, as they are published."""
        ...

    async def close(self) -> None: ...


# -- digests ----------------------------------------------------------------------------


def manifest_sha256(files: Iterable[FileDigest]) -> str:
    """The version digest of ``AdapterRef.sha256`` (common/v1/adapter.proto)."""
    lines = "".join(
        f"{f.name}\t{f.sha256}\t{f.size_bytes}\n" for f in sorted(files, key=lambda f: f.name)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def digest_file(path: Path) -> FileDigest:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(name=path.name, sha256=digest.hexdigest(), size_bytes=size)


def digest_directory(directory: Path) -> tuple[tuple[FileDigest, ...], str]:
    """Per-file digests of a PEFT version directory and its manifest digest."""
    files = tuple(digest_file(Path(directory) / name) for name in (CONFIG_FILE, WEIGHTS_FILE))
    return files, manifest_sha256(files)


def directory_matches(directory: Path, ref: AdapterRef) -> bool:
    """True when the files in ``directory`` are exactly the ones ``ref`` describes.

    A ref without a digest cannot be checked (True, with a warning logged once per
    load by the caller); missing files are a mismatch.
    """
    if not ref.sha256:
        return True
    names = [f.name for f in ref.files] or [CONFIG_FILE, WEIGHTS_FILE]
    try:
        actual = tuple(digest_file(Path(directory) / name) for name in names)
    except OSError:
        return False
    if ref.files:
        expected = {f.name: (f.sha256, f.size_bytes) for f in ref.files}
        if any(expected[f.name] != (f.sha256, f.size_bytes) for f in actual):
            return False
    return manifest_sha256(actual) == ref.sha256


def adapter_rank(directory: Path) -> int:
    """The largest LoRA rank in a PEFT ``adapter_config.json`` (``r`` and
    any ``rank_pattern`` override)."""
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(
            f"cannot read {CONFIG_FILE} in {directory}: {exc}", reason="ADAPTER_CONFIG_INVALID"
        ) from None
    ranks = [int(config.get("r", 0) or 0)]
    ranks += [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


# -- the manager ------------------------------------------------------------------------


@dataclass
class _Loaded:
    adapter: EngineAdapter
    load_ms: float
    source: str
    last_used: int
    pins: int = 0


class AdapterManager:
    def __init__(
        self,
        resolver: AdapterResolver,
        engine: Engine,
        *,
        cache_dir: Path,
        allowed_roots: Iterable[Path] = (),
        alias_ttl_s: float = 2.0,
        verify_local_sha256: bool = True,
        preload: bool = True,
        watch: bool = True,
        max_cached_refs: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.engine = engine
        self.cache_dir = Path(cache_dir).absolute()
        self._roots = [os.path.realpath(p) for p in (self.cache_dir, *allowed_roots)]
        self._alias_ttl_s = alias_ttl_s
        self._verify_local = verify_local_sha256
        self._preload = preload
        self._watch_enabled = watch
        self._max_cached_refs = max_cached_refs
        self._clock = clock

        self._fixed: OrderedDict[tuple[str, int], AdapterRef] = OrderedDict()
        self._aliases: dict[tuple[str, str], tuple[AdapterRef, float]] = {}
        self._engine_ids: dict[tuple[str, int], int] = {}
        self._next_engine_id = itertools.count(1)
        self._loaded: dict[tuple[str, int], _Loaded] = {}
        self._loading: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._verified: set[tuple[str, str]] = set()
        self._served: set[str] = set()
        self._tick = itertools.count(1)
        self._epoch = engine.epoch
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._watch_enabled and self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch_loop(), name="adapter-watch")

    async def close(self) -> None:
        tasks = [t for t in (self._watch_task, *self._background, *self._loading.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watch_task = None
        await self.resolver.close()

    # -- resolution -------------------------------------------------------------------

    async def resolve(self, selection: AdapterSelection) -> AdapterRef:
        if selection.version is not None:
            key = (selection.adapter_id, selection.version)
            ref = self._fixed.get(key)
            if ref is not None:
                self._fixed.move_to_end(key)
                metrics.RESOLVE_CACHE.labels("cache").inc()
                return ref
            ref = await self.resolver.resolve(selection)
            metrics.RESOLVE_CACHE.labels("resolver").inc()
            self._remember(ref)
            return ref
        alias_key = (selection.adapter_id, selection.alias)
        cached = self._aliases.get(alias_key)
        if cached is not None and cached[1] > self._clock():
            metrics.RESOLVE_CACHE.labels("cache").inc()
            return cached[0]
        try:
            ref = await self.resolver.resolve(selection)
        except Unavailable:
            if cached is None:
                raise
            # Availability over freshness: the version served is still a READY one
            # and every response names it.
            log.warning(
                "adapter_resolve_stale", selection=str(selection), version=cached[0].version
            )
            metrics.RESOLVE_CACHE.labels("stale").inc()
            return cached[0]
        metrics.RESOLVE_CACHE.labels("resolver").inc()
        self._remember(ref)
        self._aliases[alias_key] = (ref, self._clock() + self._alias_ttl_s)
        return ref

    def _remember(self, ref: AdapterRef) -> None:
        self._fixed[ref.key] = ref
        self._fixed.move_to_end(ref.key)
        while len(self._fixed) > self._max_cached_refs:
            self._fixed.popitem(last=False)

    def _on_new_version(self, ref: AdapterRef) -> None:
        """A version became READY: it is the adapter's latest (unless a newer one was
        already seen: events may be replayed after a reconnect); aliases may have moved."""
        self._remember(ref)
        latest = self._aliases.get((ref.adapter_id, LATEST))
        for key in [k for k in self._aliases if k[0] == ref.adapter_id]:
            del self._aliases[key]
        if latest is None or latest[0].version <= ref.version:
            self._aliases[(ref.adapter_id, LATEST)] = (ref, self._clock() + self._alias_ttl_s)

    # -- loading ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, selection: AdapterSelection) -> AsyncIterator[EngineAdapter]:
        """Resolve, make sure the version is loaded, and keep it pinned (never
        evicted by this manager) while the caller's requests run."""
        ref = await self.resolve(selection)
        self._served.add(ref.adapter_id)
        entry = await self._acquire(ref, trigger="request", pin=True)
        try:
            yield entry.adapter
        finally:
            entry.pins -= 1

    async def load(
        self, target: AdapterSelection | AdapterRef, *, trigger: str = "operator"
    ) -> LoadedVersion:
        """Load a version (operator LoadAdapter, preloads) and return its record."""
        # An explicit ref is loaded as given, but not cached as the answer for its
        # version: requests keep resolving through the registry.
        ref = await self.resolve(target) if isinstance(target, AdapterSelection) else target
        self._served.add(ref.adapter_id)
        entry = await self._acquire(ref, trigger=trigger, pin=False)
        return self._record(entry, active=True)

    async def unload(self, adapter_id: str, version: int = 0) -> int:
        """Unload one version (or every version when ``version`` is 0); the adapter
        is then no longer preloaded. Returns how many versions were unloaded.

        Raises:
            FailedPrecondition: ADAPTER_IN_USE when requests are running on it.
        """
        self._sync_epoch()
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
        if version == 0:
            self._served.discard(adapter_id)
        return len(keys)

    def list_loaded(self) -> list[LoadedVersion]:
        self._sync_epoch()
        by_recency = sorted(self._loaded.values(), key=lambda e: -e.last_used)
        # vLLM keeps the most recently used versions in its active slots.
        return [self._record(e, active=i < self.engine.max_loras) for i, e in enumerate(by_recency)]

    def is_loaded(self, adapter_id: str, version: int) -> bool:
        self._sync_epoch()
        return (adapter_id, version) in self._loaded

    def _record(self, entry: _Loaded, *, active: bool) -> LoadedVersion:
        a = entry.adapter
        return LoadedVersion(
            adapter_id=a.adapter_id,
            version=a.version,
            engine_name=a.name,
            rank=a.rank,
            load_ms=entry.load_ms,
            active=active,
            path=a.path,
            source=entry.source,
        )

    def _sync_epoch(self) -> None:
        if self.engine.epoch != self._epoch:
            # The engine restarted: nothing is loaded in it any more.
            log.info("adapters_reset_after_engine_restart", dropped=len(self._loaded))
            self._loaded.clear()
            self._epoch = self.engine.epoch
            metrics.LOADED_ADAPTERS.set(0)

    async def _acquire(self, ref: AdapterRef, *, trigger: str, pin: bool) -> _Loaded:
        for _ in range(_PIN_ATTEMPTS):
            self._sync_epoch()
            entry = self._loaded.get(ref.key)
            if entry is not None and not os.path.isdir(entry.adapter.path):
                # The files went away under us (cache cleanup): reload from the ref
                # rather than hand the engine a path it would fail on.
                log.warning("adapter_files_vanished", adapter=ref.engine_name)
                await self._evict(ref.key, reason="files_vanished")
                entry = None
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
            await asyncio.shield(task)
        raise ResourceExhausted(
            f"every adapter slot is pinned by running requests; {ref.engine_name} could not stay "
            "loaded",
            reason="ADAPTER_SLOTS_BUSY",
        )

    def _load_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self._loading.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter gets it through the shield

    async def _load(self, ref: AdapterRef, trigger: str) -> None:
        started = time.perf_counter()
        if ref.rank > self.engine.max_lora_rank:
            # Refused before any byte moves.
            raise _rank_error(ref, ref.rank, self.engine.max_lora_rank)
        path, source = await self._materialize(ref)
        rank = await asyncio.to_thread(adapter_rank, path)
        if rank > self.engine.max_lora_rank:
            raise _rank_error(ref, rank, self.engine.max_lora_rank)
        engine_id = self._engine_ids.get(ref.key)
        if engine_id is None:
            engine_id = self._engine_ids[ref.key] = next(self._next_engine_id)
        adapter = EngineAdapter(
            adapter_id=ref.adapter_id,
            version=ref.version,
            engine_id=engine_id,
            path=str(path),
            rank=rank,
        )
        await self._make_room(incoming=ref.key)
        epoch = self.engine.epoch
        await self.engine.add_adapter(adapter)
        load_s = time.perf_counter() - started
        self._sync_epoch()
        if self.engine.epoch != epoch:  # pragma: no cover - restart raced the load
            raise Unavailable("the engine restarted during the load", reason="ENGINE_RESTARTING")
        self._loaded[ref.key] = _Loaded(
            adapter=adapter, load_ms=load_s * 1000, source=source, last_used=next(self._tick)
        )
        metrics.ADAPTER_LOAD_SECONDS.labels(source, trigger).observe(load_s)
        metrics.LOADED_ADAPTERS.set(len(self._loaded))
        log.info(
            "adapter_loaded",
            adapter=ref.adapter_id,
            version=ref.version,
            engine_id=engine_id,
            rank=rank,
            source=source,
            trigger=trigger,
            load_ms=round(load_s * 1000, 2),
        )

    async def _make_room(self, incoming: tuple[str, int]) -> None:
        while len(self._loaded) >= self.engine.max_cpu_loras:
            victim = self._victim(incoming)
            if victim is None:
                # Every slot is pinned: let the engine's own LRU overflow briefly
                # rather than fail a request that will free a slot when done.
                return
            await self._evict(victim, reason="lru")

    def _victim(self, incoming: tuple[str, int]) -> tuple[str, int] | None:
        free = [(k, e) for k, e in self._loaded.items() if e.pins == 0]
        if not free:
            return None
        newest: dict[str, int] = {incoming[0]: incoming[1]}
        for aid, version in self._loaded:
            newest[aid] = max(newest.get(aid, 0), version)
        superseded = [(k, e) for k, e in free if k[1] < newest[k[0]]]
        pool = superseded or free
        return min(pool, key=lambda item: item[1].last_used)[0]

    async def _evict(self, key: tuple[str, int], *, reason: str) -> None:
        entry = self._loaded.pop(key, None)
        if entry is None:
            return
        await self.engine.remove_adapter(entry.adapter)
        metrics.LOADED_ADAPTERS.set(len(self._loaded))
        if reason == "lru":
            metrics.ADAPTER_EVICTIONS.inc()
        log.info("adapter_unloaded", adapter=key[0], version=key[1], reason=reason)

    # -- bytes ------------------------------------------------------------------------

    def _local_path(self, uri: str) -> Path | None:
        """The directory of a file:// URI when it is inside an allowed root."""
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            return None
        real = os.path.realpath(unquote(parts.path))
        for root in self._roots:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return Path(real) if os.path.isdir(real) else None
        return None

    async def _verified_ok(self, directory: Path, ref: AdapterRef) -> bool:
        memo = (str(directory), ref.sha256)
        if memo in self._verified:
            return True
        if not ref.sha256:
            log.warning("adapter_unverified", adapter=ref.engine_name, reason="ref has no sha256")
        ok = await asyncio.to_thread(directory_matches, directory, ref)
        if ok:
            self._verified.add(memo)
        return ok

    async def _materialize(self, ref: AdapterRef) -> tuple[Path, str]:
        """A local directory holding exactly the version's files, and how it got there."""
        local = self._local_path(ref.uri)
        if local is not None:
            if not self._verify_local or await self._verified_ok(local, ref):
                return local, "local"
            log.warning("adapter_local_copy_mismatch", adapter=ref.engine_name, path=str(local))
        dest = self.cache_dir / DOWNLOADS_DIR / ref.adapter_id / f"{ref.version}-{ref.sha256[:16]}"
        if dest.is_dir() and await self._verified_ok(dest, ref):
            return dest, "download"
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            await self.resolver.download(ref, tmp)
            if not await asyncio.to_thread(directory_matches, tmp, ref):
                raise DataLoss(
                    f"downloaded files of {ref.engine_name} do not match its sha256",
                    reason="CHECKSUM_MISMATCH",
                    metadata={"adapter": ref.engine_name},
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                await asyncio.to_thread(shutil.rmtree, dest, True)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                await asyncio.to_thread(shutil.rmtree, tmp, True)
        self._verified.add((str(dest), ref.sha256))
        log.info("adapter_downloaded", adapter=ref.engine_name, path=str(dest))
        return dest, "download"

    # -- watch ------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        backoff_s = 0.5
        while True:
            try:
                async for ref in self.resolver.watch():
                    backoff_s = 0.5
                    self._handle_watch_event(ref)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("adapter_watch_failed", error=repr(exc), retry_in_s=backoff_s)
            # Events may have been missed while disconnected: forget every alias.
            self._aliases.clear()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 10.0)

    def _handle_watch_event(self, ref: AdapterRef) -> None:
        self._on_new_version(ref)
        log.info("adapter_version_announced", adapter=ref.adapter_id, version=ref.version)
        if not self._preload or ref.adapter_id not in self._served:
            return
        if ref.key in self._loaded or ref.key in self._loading:
            return
        task = asyncio.create_task(self._preload_one(ref), name=f"preload-{ref.engine_name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _preload_one(self, ref: AdapterRef) -> None:
        try:
            await self._acquire(ref, trigger="preload", pin=False)
        except LorafleetError as exc:
            metrics.ADAPTER_PRELOADS.labels("failed").inc()
            log.warning(
                "adapter_preload_failed", adapter=ref.engine_name, reason=exc.reason, error=str(exc)
            )
            return
        except Exception:
            metrics.ADAPTER_PRELOADS.labels("failed").inc()
            log.exception("adapter_preload_failed", adapter=ref.engine_name)
            return
        metrics.ADAPTER_PRELOADS.labels("ok").inc()
        log.info("adapter_preloaded", adapter=ref.adapter_id, version=ref.version)


def _rank_error(ref: AdapterRef, rank: int, max_rank: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"{ref.engine_name} has LoRA rank {rank}, above this engine's maximum {max_rank}",
        reason="RANK_ABOVE_ENGINE_MAX",
        metadata={"adapter": ref.engine_name, "rank": str(rank), "max_rank": str(max_rank)},
    )
