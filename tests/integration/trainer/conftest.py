"""Fixtures of the trainer tests: a small random Llama for the API tests (the RL
test uses the project's pre-trained tiny model, ``tiny_model_dir`` in
tests/conftest.py).

Session-scoped models: writing/building them takes a moment and every test only
reads them (each trainer loads its own copy, so no test sees another's adapters).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainer_harness import write_llama  # noqa: E402


@pytest.fixture(scope="session")
def trainer_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("trainer_llama"))
