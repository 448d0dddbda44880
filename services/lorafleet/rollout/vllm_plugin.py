"""A vLLM general plugin (entry point ``vllm.general_plugins``, loaded by vLLM in
every engine process): how long an engine process spins after a message.

vLLM's engine core and its worker talk over a shared-memory ring buffer. After
each message a reader keeps polling the buffer (``sched_yield`` in a loop) for
one second before it sleeps until notified. On a GPU node that costs one host
core per process, which nobody misses. On a CPU node it is the node: while the
worker computes a decode step the engine core spins on the other core, and for a
second after every batch the worker spins too, taking the cores the co-located
trainer needs. Measured on 2 cores (tiny model, 30 GRPO steps): 8 concurrent
experiments 100 s -> 81 s, one experiment 12.9 s -> 10.6 s with a 5 ms spin,
same results (the change is in waiting, not in computing). A 0 ms spin sends
every read through the notification socket and was 10x slower.

A short spin needs a short recheck too. A reader whose spin has run out parks
on a ZeroMQ PUB/SUB notification, which is best-effort (the writer's socket
drops a ping while the previous one is still queued); vLLM's safety net re-reads
the buffer every 5 s (``SHM_READER_RECHECK_INTERVAL_MS``). With a 1 s spin a
reader rarely parks mid-batch, so the loss rarely shows; with a 5 ms spin it
parks between every two decode steps, and a lost ping stalled the whole engine
for 5 s: measured on 2 cores, up to 3 such stalls per 40-step experiment alone,
and the machine idle while 8 concurrent experiments waited. So the plugin also
caps a parked reader's wait at :data:`RECHECK_MS`; each wake is one flag check.

On CPU the rollout service runs the engine in one process by default
(lorafleet.rollout.engine_process), which has no such queue; this plugin matters
there only with ``cpu_one_process_engine`` off, and on GPU nodes.

The rollout service sets :data:`SPIN_ENV` (``RolloutSettings.engine_spin_ms``)
before it starts the engine, whose processes inherit it. Unset, vLLM keeps its
own behaviour. This module must stay importable without vLLM's heavy parts
(vLLM imports it during its own start-up).
"""

from __future__ import annotations

import logging
import os
from typing import Any

SPIN_ENV = "LORAFLEET_VLLM_SPIN_MS"
# How long a parked reader sleeps before it re-reads the buffer's written flag,
# whether or not a notification came: the worst delay of a lost notification.
# 100 wakes a second of an idle reader cost well under 1% of a core.
RECHECK_MS = 10

log = logging.getLogger(__name__)


def register() -> None:
    """Entry point: shorten the shared-memory readers' spin, and their recheck
    interval with it, when SPIN_ENV is set."""
    value = os.environ.get(SPIN_ENV, "")
    if not value:
        return
    spin_s = float(value) / 1000.0
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None:
        log.warning("this vLLM has no SpinCondition; %s ignored", SPIN_ENV)
        return
    recheck = getattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", None)
    if recheck is None:
        log.warning("this vLLM has no SHM_READER_RECHECK_INTERVAL_MS; a lost notification "
                    "may stall its engine")
    elif recheck > RECHECK_MS:
        shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = RECHECK_MS
    original = condition.__init__
    if getattr(original, "lorafleet_spin_s", None) == spin_s:
        return  # already patched in this process
    original = getattr(original, "lorafleet_original", original)

    def init(self: Any, is_reader: bool, context: Any, notify_address: str,
             busy_loop_s: float = 1) -> None:
        original(self, is_reader, context, notify_address, busy_loop_s=spin_s)

    init.lorafleet_spin_s = spin_s  # type: ignore[attr-defined]
    init.lorafleet_original = original  # type: ignore[attr-defined]
    condition.__init__ = init
