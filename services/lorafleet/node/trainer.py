"""The trainer side of the co-located node, by composition over the trainer service.

The node runs the unchanged :class:`~lorafleet.trainer.servicer.TrainerServicer`
with two wrappers:

- :class:`SnapshottingEngine` stands in for the ``TrainEngine`` the servicer
  saves versions with: ``save_peft`` takes the adapter's snapshot once (under
  the engine lock), writes the PEFT files from it, and stashes it in
  :class:`~lorafleet.node.memory.MemoryVersions` under the files' sha256;
  everything else is the real engine;
- :class:`NodeTrainerServicer` forwards every RPC to the servicer and, after a
  SaveVersion the registry accepted, hands the version to the rollout side
  (``on_version``): the snapshot is filed under ``mem://`` and attached to the
  rollout engine in the background. SaveVersion still writes the files to the
  node cache and publishes them by reference, so other consumers can fetch it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.peft_io import save_peft_adapter
from lorafleet.lora.types import SavedAdapter
from lorafleet.node.memory import MemoryVersions
from lorafleet.trainer.servicer import TrainerServicer


def engine_lock(engine: TrainEngine) -> threading.RLock:
    """The lock the trainer engine holds around all torch work on its model.

    ``TrainEngine`` keeps it private (``_lock``); a public ``lock`` is preferred
    when it exists. The rollout engine on the shared model takes the same lock.
    """
    lock = getattr(engine, "lock", None)
    if lock is None:
        lock = engine._lock
    return lock  # type: ignore[no-any-return]


class SnapshottingEngine:
    """A ``TrainEngine`` whose ``save_peft`` also keeps the version's snapshot."""

    def __init__(self, engine: TrainEngine, memory: MemoryVersions) -> None:
        self._engine = engine
        self._memory = memory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def save_peft(self, name: str, directory: str | os.PathLike[str]) -> SavedAdapter:
        # What TrainEngine.save_peft does, with the snapshot kept: detached copies
        # taken under the lock (a training step is never half in them); the file
        # is then written outside it, so training goes on meanwhile.
        with engine_lock(self._engine):
            spec = self._engine.adapter_info(name).spec
            tensors = self._engine.lora.adapter_state_dict(name)
        saved = save_peft_adapter(directory, tensors, spec, self._engine.base_model)
        self._memory.stash(saved.sha256, spec, tensors)
        return saved


class NodeTrainerServicer:
    """The TrainerService of the node: the trainer's servicer, plus the hand-over
    of every saved version to the rollout side."""

    def __init__(
        self, inner: TrainerServicer, on_version: Callable[[Any], Awaitable[None]]
    ) -> None:
        self._inner = inner
        self._on_version = on_version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def SaveVersion(self, request: Any, context: Any) -> Any:
        response = await self._inner.SaveVersion(request, context)
        await self._on_version(response.ref)
        return response
