"""Where built models live, and loading any HF causal LM directory.

``ensure_tiny_model()`` builds the tiny model once per cache directory and returns
its path; concurrent callers (a test session and a demo, two services of a node)
serialise on a file lock and the build lands atomically (built in a temporary
directory next to the final one, then renamed), so nobody ever sees half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "tiny-v2"
"""Cache key of the tiny model; bump it whenever the recipe changes the bytes."""

CACHE_ENV = "LORAFLEET_CACHE_DIR"

BUILD_INFO_FILE = "lorafleet_build.json"
"""Written last by a build: per-task base accuracy and the recipe (no timings)."""


def default_cache_dir() -> Path:
    """``$LORAFLEET_CACHE_DIR``, else ``~/.cache/lorafleet``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lorafleet"


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """Where the tiny model is (or will be) in the cache; builds nothing."""
    return Path(cache_dir or default_cache_dir()) / "models" / TINY_MODEL_NAME


def is_built(model_dir: Path) -> bool:
    # The build-info file is written last, and the directory appears only by rename.
    return (Path(model_dir) / BUILD_INFO_FILE).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_tiny_model(cache_dir: Path | None = None, *, log: Any = None) -> Path:
    """Path of the cached tiny model, building it first if it is not there."""
    final = tiny_model_path(cache_dir)
    if is_built(final):
        return final
    with _file_lock(final.parent / f".{final.name}.lock"):
        if is_built(final):  # another process built it while we waited
            return final
        from lorafleet.models.tiny import build_tiny_model

        # Builders hold the lock, so any build directory seen now is a killed one's.
        for stale in final.parent.glob(f".{final.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
        try:
            build_tiny_model(tmp, seed=0, log=log)
            os.chmod(tmp, 0o755)
            if final.exists():  # a partial leftover without build info
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_model(path: str | Path, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from any HF causal LM directory, in eval mode.

    The same call loads the tiny model here and Qwen on a GPU node.
    ``dtype`` defaults to ``torch.float32``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
