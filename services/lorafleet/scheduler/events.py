"""In-process fan-out of experiment events to WatchExperiment streams.

The store is the history; this hub only carries what happens while a watcher
is connected. Watchers subscribe first and then replay the store, so nothing
falls between the two (duplicates are dropped by step number).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb

# A watcher that stops reading loses its oldest events rather than growing the
# scheduler's memory without bound; it can always reconnect with from_step.
MAX_QUEUED_EVENTS = 10_000


class EventHub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[pb.WatchExperimentResponse]]] = defaultdict(
            set
        )

    def subscribe(self, experiment_id: str) -> asyncio.Queue[pb.WatchExperimentResponse]:
        queue: asyncio.Queue[pb.WatchExperimentResponse] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._subscribers[experiment_id].add(queue)
        return queue

    def unsubscribe(
        self, experiment_id: str, queue: asyncio.Queue[pb.WatchExperimentResponse]
    ) -> None:
        self._subscribers[experiment_id].discard(queue)
        if not self._subscribers[experiment_id]:
            del self._subscribers[experiment_id]

    def publish(self, experiment_id: str, event: pb.WatchExperimentResponse) -> None:
        for queue in list(self._subscribers.get(experiment_id, ())):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
