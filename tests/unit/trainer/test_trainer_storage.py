"""Where the trainer writes: ids safe as directory names, file:// URIs, state
checkpoints verified by sha256, version directories placed atomically."""

from __future__ import annotations

import hashlib

import pytest

from lorafleet.core.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from lorafleet.trainer.config import STATE_SUBDIR, TrainerSettings
from lorafleet.trainer.storage import AdapterCache, StateStore, check_id, local_path


@pytest.mark.parametrize("bad", ["", "Exp", "../x", "a/b", ".hidden", "-x", "x" * 64])
def test_ids_must_be_safe_directory_names(bad):
    with pytest.raises(InvalidArgument) as e:
        check_id(bad, "adapter_id")
    assert e.value.reason == "INVALID_ADAPTER_ID"


def test_good_ids_pass():
    assert check_id("exp-1", "adapter_id") == "exp-1"


def test_local_path_accepts_only_absolute_file_uris(tmp_path):
    assert local_path(tmp_path.as_uri()) == tmp_path
    for uri, reason in [
        ("s3://b/k", "UNSUPPORTED_URI_SCHEME"),
        ("file://host/x", "INVALID_URI"),
        ("relative/path", "UNSUPPORTED_URI_SCHEME"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            local_path(uri)
        assert e.value.reason == reason


def test_state_round_trip_and_digest_check(tmp_path):
    store = StateStore(tmp_path / "states", max_bytes=1024)
    data = b"state bytes"
    saved = store.write("exp", 7, data)
    assert saved.sha256 == hashlib.sha256(data).hexdigest() and saved.size_bytes == len(data)
    assert saved.uri.startswith("file:///") and "step-00000007" in saved.uri
    assert store.write("exp", 7, data) == saved  # same state, same file
    assert store.read(saved.uri, saved.sha256.upper()) == data
    with pytest.raises(DataLoss) as e:
        store.read(saved.uri, "0" * 64)
    assert e.value.reason == "STATE_DIGEST_MISMATCH"
    with pytest.raises(NotFound) as e:
        store.read((tmp_path / "nope").as_uri(), saved.sha256)
    assert e.value.reason == "STATE_NOT_FOUND"
    big = store.write("exp", 8, b"x" * 2048)
    with pytest.raises(ResourceExhausted) as e:
        store.read(big.uri, big.sha256)
    assert e.value.reason == "STATE_TOO_LARGE"
    assert [p.name for p in (tmp_path / "states" / "exp").iterdir() if p.name.startswith(".")] == []


def test_version_dirs_are_renamed_into_place(tmp_path):
    cache = AdapterCache(tmp_path / "cache")
    staging = cache.staging_dir("exp", 3)
    (staging / "adapter_config.json").write_text("{}")
    final = cache.version_dir("exp", 3)
    assert final == tmp_path / "cache" / "exp" / "v3"
    cache.commit(staging, final)
    assert (final / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v3"]


def test_relative_dirs_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = TrainerSettings(adapter_cache_dir="var/node-0/adapters")
    # The local cluster's pairing: the registry's default root "var" (cwd = run dir).
    assert settings.cache_path == tmp_path / "var" / "node-0" / "adapters"
    assert settings.cache_path.is_relative_to(tmp_path / "var")
    assert settings.state_path == settings.cache_path / STATE_SUBDIR
    assert TrainerSettings(state_dir="ckpt").state_path == tmp_path / "ckpt"


def test_old_checkpoints_are_pruned(tmp_path):
    store = StateStore(tmp_path, max_bytes=1024, keep_last=2)
    saved = [store.write("exp", step, f"state {step}".encode()) for step in range(1, 6)]
    names = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert [n.split("-")[1] for n in names] == ["00000004", "00000005"]
    assert store.read(saved[-1].uri, saved[-1].sha256) == b"state 5"
    # Rewriting an older step (a resumed run) keeps the file just written.
    again = store.write("exp", 2, b"state 2")
    assert store.read(again.uri, again.sha256) == b"state 2"
    keep_all = StateStore(tmp_path / "all", max_bytes=1024)
    for step in range(5):
        keep_all.write("exp", step, bytes([step]))
    assert len(list((tmp_path / "all" / "exp").iterdir())) == 5
