"""vLLM's CPU engine in one process: its scheduler and its model together.

vLLM-CPU always runs the model in a worker process of its own, beside the engine
core process that schedules: ``vllm/platforms/cpu.py`` rewrites the one-process
executor (``"uni"``) to ``"mp"``, because only for a worker it starts itself can
vLLM set the OpenMP environment (thread count, binding) before torch loads. Every
decode step then crosses a shared-memory queue twice, and the engine core waits
on it.

But the engine core process is itself spawned from the rollout service's
process, and inherits its environment. So the rollout service gives it the
thread count vLLM would give the worker, and asks for the one-process executor
after vLLM's platform check. (vLLM also pins the worker's threads to its cores;
the one process is not pinned, so its other threads, ZeroMQ's and the output
serializer's, can use the core vLLM reserves for the engine core.)

Measured on 2 cores, 8 experiments of 40 steps on the benchmark's stack, two
pairs of runs with tcmalloc and two without, the same accuracies bit for bit:
the rollout service used 17-21% less CPU for experiments one after another and
5-9% less for experiments at once (relative to the trainer's CPU, which did the
same work, because the machine's speed drifted by up to 15% between runs).
Makespans moved within that drift; in two more pairs, 60 steps all at once,
145.1 and 146.5 s became 140.4 and 144.0 s.

GPU engines with one device already run in one process; nothing changes there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

ONE_PROCESS = "uni"
"""vLLM's name of the executor that runs the model in the engine core process."""


def use_one_process(config: Any) -> bool:
    """Switch a CPU engine's config to the one-process executor; False (config
    unchanged) when the engine spans several devices or ranks."""
    parallel = config.parallel_config
    if parallel.world_size != 1 or parallel.data_parallel_size != 1:
        return False
    parallel.distributed_executor_backend = ONE_PROCESS
    return True


def worker_threads(config: Any) -> int | None:
    """The OpenMP threads vLLM would give its CPU worker (its cores less those it
    reserves for the engine core, per ``VLLM_CPU_OMP_THREADS_BIND``); None when
    vLLM leaves threads alone (``nobind``) or this vLLM computes them elsewhere."""
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except ImportError:
        return None
    manager = OMPProcessManager(config)
    lists = getattr(manager, "cpu_lists", None)
    if getattr(manager, "skip_setup", True) or not lists:
        return None
    return len(lists[0])


@contextlib.contextmanager
def engine_threads(threads: int | None) -> Iterator[None]:
    """``OMP_NUM_THREADS`` for the engine process spawned inside the block (it
    reads the variable when it imports torch); a value set by the user wins."""
    if threads is None or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
