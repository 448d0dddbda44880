"""The model cache: default location, build once under a lock, atomic appearance."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorafleet.models import cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path
    assert cache.tiny_model_path() == tmp_path / "models" / cache.TINY_MODEL_NAME
    monkeypatch.delenv("LORAFLEET_CACHE_DIR")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "lorafleet"


def test_concurrent_callers_build_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiny = pytest.importorskip("lorafleet.models.tiny")
    calls: list[Path] = []

    def fake_build(out_dir: Path, *, seed: int, log: object = None) -> None:
        calls.append(out_dir)
        # Slow enough that the other caller is waiting on the lock meanwhile.
        time.sleep(0.3)
        assert not cache.is_built(cache.tiny_model_path(tmp_path))
        (out_dir / "model.safetensors").write_bytes(b"weights")
        (out_dir / cache.BUILD_INFO_FILE).write_text("{}")

    monkeypatch.setattr(tiny, "build_tiny_model", fake_build)
    killed = cache.tiny_model_path(tmp_path).parent / f".{cache.TINY_MODEL_NAME}.build-dead"
    killed.mkdir(parents=True)  # what a build killed mid-way leaves behind
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.ensure_tiny_model(tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = cache.tiny_model_path(tmp_path)
    assert len(calls) == 1 and calls[0] != final and calls[0].parent == final.parent
    assert results == [final] * 3
    assert (final / "model.safetensors").read_bytes() == b"weights"
    # No temporary build directories are left behind.
    assert sorted(p.name for p in final.parent.iterdir() if p.is_dir()) == [final.name]


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiny = pytest.importorskip("lorafleet.models.tiny")

    def broken_build(out_dir: Path, *, seed: int, log: object = None) -> None:
        (out_dir / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "build_tiny_model", broken_build)
    with pytest.raises(RuntimeError, match="boom"):
        cache.ensure_tiny_model(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []
