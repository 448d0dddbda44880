"""Stored bytes that no longer match their sha256 are DATA_LOSS, never served."""

from __future__ import annotations

import pytest
from registry_harness import blob_files

from lorafleet.core.errors import DataLoss
from lorafleet.registry.testing import write_adapter

WEIGHTS = "adapter_model.safetensors"


def flip_byte(path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def test_flipped_byte_in_uploaded_blob_is_data_loss(registry, adapter, tmp_path):
    source = write_adapter(tmp_path / "src", seed=3)
    await registry.client.upload_version("exp-1", source, expected_parent_version=0)
    (stored,) = [p for p in blob_files(registry.settings) if p.name == WEIGHTS]
    flip_byte(stored)
    dest = tmp_path / "dl"
    with pytest.raises(DataLoss) as exc:
        await registry.client.download_version("exp-1", 1, dest)
    assert exc.value.reason == "BLOB_CORRUPT"
    assert not dest.exists() or list(dest.iterdir()) == []


async def test_corrupt_copy_is_skipped_for_an_intact_one(registry, adapter, tmp_path):
    node_copy = write_adapter(registry.settings.file_roots["node-a"] / "v1", seed=4)
    original = (node_copy / WEIGHTS).read_bytes()
    await registry.client.publish_version("exp-1", node_copy, expected_parent_version=0)
    await registry.runtime.registry.settle()
    (durable,) = [p for p in blob_files(registry.settings) if p.name == WEIGHTS]
    assert durable.read_bytes() == original

    flip_byte(durable)
    out = await registry.client.download_version("exp-1", 1, tmp_path / "dl")
    assert (out / WEIGHTS).read_bytes() == original

    flip_byte(node_copy / WEIGHTS, offset=-3)
    with pytest.raises(DataLoss) as exc:
        await registry.client.download_version("exp-1", 1, tmp_path / "dl2")
    assert exc.value.reason == "BLOB_CORRUPT"
