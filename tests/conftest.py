"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model directory, built at most once per machine.

    The same cache the services use when they start with an empty model_path
    (``$LORAFLEET_CACHE_DIR``, else ``~/.cache/lorafleet``), so a cluster
    started by a test never builds a second copy. Session-scoped because a
    build costs about two minutes on 2 cores.
    """
    from lorafleet.models.cache import ensure_tiny_model

    return ensure_tiny_model()
