"""In-memory adapter versions of the co-located node: ``mem://`` references.

When the node's trainer saves a version, it takes one snapshot of the adapter's
live tensors (detached copies, under the trainer engine's lock, so no training
step can be half-applied in it), writes the PEFT files for the registry from
that snapshot, and :meth:`MemoryVersions.stash` keeps it under the files'
manifest sha256. Once the registry has numbered the version,
:meth:`MemoryVersions.publish` files the snapshot as
``mem://<node id>/<adapter id>/<version>``: the rollout engine resolves that URI
to the very same tensors (:meth:`MemoryVersions.get`), so the version it serves
is byte for byte the version the registry holds, and nothing is read from disk
or copied on the rollout side.

What is shared and what is copied:

- base model: one torch module, shared by the trainer and the rollout engine;
- trainer's live adapter parameters: never seen by rollout (they keep training);
- a published version: one snapshot copy, taken once at SaveVersion, shared by
  the PEFT file writer (transiently) and by the rollout engine's layers (as
  ``nn.Parameter`` views while the version is loaded there).

Immutability: nothing holds a snapshot's tensors for writing (the trainer's
parameters are other tensors; the engine attaches views without gradients).
Each snapshot records its tensors' in-place version counters when stashed;
:meth:`Snapshot.intact` (and the engine, before every batch) verifies them, so
an accidental in-place write to a published version fails its requests with
DATA_LOSS instead of serving weights that are not the version's.

Retention: at most ``capacity`` versions are kept here (superseded versions are
dropped first, then the oldest). Dropping only ends the memory path for that
version: the engine keeps the tensors it has attached alive by reference, and a
version loaded later again comes from the node cache or the registry.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from lorafleet.rollout.torch_engine import MEMORY_SCHEME, AdapterWeights
from lorafleet.rollout.types import AdapterRef

if TYPE_CHECKING:
    import torch

    from lorafleet.lora.spec import LoraSpec

log = structlog.get_logger(__name__)

SOURCE = "memory"


def memory_uri(node_id: str, adapter_id: str, version: int) -> str:
    return f"{MEMORY_SCHEME}{node_id}/{adapter_id}/{version}"


def is_memory_uri(uri: str) -> bool:
    return uri.startswith(MEMORY_SCHEME)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One adapter's tensors at one instant, never written again."""

    spec: LoraSpec
    tensors: Mapping[str, torch.Tensor]
    """Read-only mapping, by ``<module path>.lora_A.weight`` / ``.lora_B.weight``."""
    sha256: str
    """Manifest digest of the PEFT files written from these tensors."""
    counters: tuple[tuple[str, int], ...]
    """In-place version counter of each tensor when stashed."""

    @classmethod
    def take(cls, spec: LoraSpec, tensors: Mapping[str, torch.Tensor], sha256: str) -> Snapshot:
        frozen = types.MappingProxyType(dict(tensors))
        counters = tuple((name, t._version) for name, t in sorted(frozen.items()))
        return cls(spec=spec, tensors=frozen, sha256=sha256, counters=counters)

    def intact(self) -> bool:
        return all(self.tensors[name]._version == v for name, v in self.counters)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclasses.dataclass(frozen=True)
class MemoryVersion:
    ref: AdapterRef
    """The registry's ref with ``uri`` replaced by the ``mem://`` one."""
    registry_uri: str
    """Where the registry has the version (the node cache's ``file://``)."""
    snapshot: Snapshot
    published_at: float


class MemoryVersions:
    """The node's published versions held in memory; a rollout ``MemorySource``.

    Thread-safe: the trainer stashes from a worker thread, the event loop
    publishes and looks up.
    """

    def __init__(self, node_id: str, *, capacity: int = 32, pending_capacity: int = 16) -> None:
        if capacity < 1 or pending_capacity < 1:
            raise ValueError("capacity and pending_capacity must be >= 1")
        self.node_id = node_id
        self.capacity = capacity
        self._pending_capacity = pending_capacity
        self._pending: OrderedDict[str, Snapshot] = OrderedDict()
        self._versions: OrderedDict[tuple[str, int], MemoryVersion] = OrderedDict()
        self._by_uri: dict[str, MemoryVersion] = {}
        self._lock = threading.Lock()
        self.published = 0
        self.dropped = 0

    # -- trainer side --------------------------------------------------------------------

    def stash(self, sha256: str, spec: LoraSpec, tensors: Mapping[str, torch.Tensor]) -> Snapshot:
        """Keep a snapshot whose files (manifest ``sha256``) are about to be published.

        ``tensors`` must be this snapshot's own (fresh copies nobody else writes).
        Bounded: snapshots whose publish never happened (registry refused) age out.
        """
        snapshot = Snapshot.take(spec, tensors, sha256)
        with self._lock:
            self._pending[sha256] = snapshot
            self._pending.move_to_end(sha256)
            while len(self._pending) > self._pending_capacity:
                self._pending.popitem(last=False)
        return snapshot

    def publish(self, ref: AdapterRef) -> MemoryVersion | None:
        """File the stashed snapshot of ``ref`` (as the registry numbered it) under
        its ``mem://`` URI. None when no snapshot with that digest was stashed (a
        replayed SaveVersion, or files this process did not write)."""
        key = ref.key
        with self._lock:
            existing = self._versions.get(key)
            if existing is not None:
                return existing
            snapshot = self._pending.pop(ref.sha256, None) if ref.sha256 else None
            if snapshot is None:
                return None
            uri = memory_uri(self.node_id, ref.adapter_id, ref.version)
            version = MemoryVersion(
                ref=dataclasses.replace(ref, uri=uri, rank=snapshot.spec.rank,
                                        alpha=float(snapshot.spec.alpha)),
                registry_uri=ref.uri,
                snapshot=snapshot,
                published_at=time.time(),
            )
            self._versions[key] = version
            self._by_uri[uri] = version
            self.published += 1
            self._trim()
        log.info(
            "version_held_in_memory",
            adapter=ref.adapter_id,
            version=ref.version,
            uri=uri,
            bytes=snapshot.nbytes,
            held=len(self._versions),
        )
        return version

    def _trim(self) -> None:
        while len(self._versions) > self.capacity:
            newest: dict[str, int] = {}
            for adapter_id, version in self._versions:
                newest[adapter_id] = max(newest.get(adapter_id, 0), version)
            superseded = [k for k in self._versions if k[1] < newest[k[0]]]
            victim = superseded[0] if superseded else next(iter(self._versions))
            dropped = self._versions.pop(victim)
            self._by_uri.pop(dropped.ref.uri, None)
            self.dropped += 1

    # -- rollout side --------------------------------------------------------------------

    def get(self, uri: str) -> AdapterWeights | None:
        """``MemorySource``: the tensors of a ``mem://`` URI (shared, not copied)."""
        with self._lock:
            version = self._by_uri.get(uri)
        if version is None:
            return None
        return AdapterWeights(
            spec=version.snapshot.spec, tensors=version.snapshot.tensors, source=SOURCE
        )

    def lookup(self, adapter_id: str, version: int) -> MemoryVersion | None:
        with self._lock:
            return self._versions.get((adapter_id, version))

    def latest(self, adapter_id: str) -> MemoryVersion | None:
        with self._lock:
            held = [v for k, v in self._versions.items() if k[0] == adapter_id]
        return max(held, key=lambda v: v.ref.version) if held else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)

    def nbytes(self) -> int:
        with self._lock:
            return sum(v.snapshot.nbytes for v in self._versions.values())
