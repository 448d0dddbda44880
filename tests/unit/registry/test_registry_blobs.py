"""LocalBlobStore: all-or-nothing writes checked against their sha256."""

from __future__ import annotations

import hashlib
import io

import pytest

from lorafleet.core.errors import DataLoss, NotFound
from lorafleet.registry.blobs import LocalBlobStore, version_prefix


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_put_open_delete(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    prefix = version_prefix("exp-1", 3, "a" * 32)
    assert prefix == "adapters/exp-1/00000003-aaaaaaaaaaaa"
    await store.put(f"{prefix}/x.json", io.BytesIO(b"hello"), sha(b"hello"))
    with await store.open(f"{prefix}/x.json") as f:
        assert f.read() == b"hello"
    uri = store.uri_for(prefix)
    assert store.prefix_of(uri) == prefix
    assert store.prefix_of("s3://bucket/" + prefix) is None
    await store.delete_prefix(prefix)
    with pytest.raises(NotFound):
        await store.open(f"{prefix}/x.json")


async def test_digest_mismatch_leaves_nothing(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(DataLoss) as exc:
        await store.put("adapters/a/1/x", io.BytesIO(b"hello"), sha(b"other"))
    assert exc.value.reason == "DIGEST_MISMATCH"
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


async def test_put_local_file_moves_it(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    staged = tmp_path / "staged"
    staged.write_bytes(b"data")
    await store.put_local_file("adapters/a/1/f", staged, sha(b"data"))
    assert not staged.exists()
    assert (tmp_path / "blobs" / "adapters/a/1/f").read_bytes() == b"data"
