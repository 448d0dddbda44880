"""Malformed, hostile and oversized publishes: refused with a reason, nothing stored."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
from registry_harness import SPEC, blob_files, make_settings, staging_files, start_registry

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.client.registry import digest_directory, manifest_sha256
from lorafleet.core.errors import DataLoss, InvalidArgument, ResourceExhausted
from lorafleet.registry.testing import adapter_config, write_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_VERSION_BYTES = 1 << 20


@pytest.fixture
async def registry(tmp_path):
    running = await start_registry(
        make_settings(tmp_path, max_tensors=16, max_version_bytes=MAX_VERSION_BYTES)
    )
    await running.client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
    try:
        yield running
    finally:
        await running.stop()


def raw_safetensors(header: dict | bytes, data: bytes = b"", *, claimed_len: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if claimed_len is None else claimed_len) + body + data


def good_header(rank: int = 4) -> tuple[dict, bytes]:
    header, offset = {}, 0
    for module in ("q_proj", "v_proj"):
        for which, shape in (("A", [rank, 32]), ("B", [32, rank])):
            size = shape[0] * shape[1] * 4
            name = f"base_model.model.model.layers.0.self_attn.{module}.lora_{which}.weight"
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    return header, b"\0" * offset


def version_dir(registry, name: str) -> Path:
    """A valid version in node-a's root, to be spoiled by each case."""
    return write_adapter(registry.settings.file_roots["node-a"] / name)


def set_weights(directory: Path, content: bytes) -> Path:
    (directory / WEIGHTS).write_bytes(content)
    return directory


def case_header_too_large(reg):
    header, data = good_header()
    return set_weights(version_dir(reg, "c"), raw_safetensors(header, data, claimed_len=1 << 40))


def case_header_not_json(reg):
    return set_weights(version_dir(reg, "c"), raw_safetensors(b"{not json at all}", b""))


def case_header_truncated(reg):
    return set_weights(version_dir(reg, "c"), struct.pack("<Q", 4096) + b"{}")


def case_offsets_past_end(reg):
    header, data = good_header()
    return set_weights(version_dir(reg, "c"), raw_safetensors(header, data[:-16]))


def case_offsets_overlap(reg):
    header, data = good_header()
    first = next(iter(header.values()))
    first["data_offsets"] = [4, 4 + first["data_offsets"][1]]
    return set_weights(version_dir(reg, "c"), raw_safetensors(header, data))


def case_duplicate_tensor_keys(reg):
    header, data = good_header()
    text = json.dumps(header)
    name = next(iter(header))
    entry = json.dumps(header[name])
    text = "{" + f'"{name}": {entry}, ' + text[1:]  # the same name twice
    return set_weights(version_dir(reg, "c"), raw_safetensors(text.encode(), data))


def case_rank_disagrees_with_spec(reg):
    # The config claims the spec's rank; the tensors are rank 8.
    d = write_adapter(reg.settings.file_roots["node-a"] / "c", rank=8)
    config = adapter_config(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    (d / CONFIG).write_text(json.dumps(config))
    return d


def case_untargeted_module(reg):
    d = write_adapter(reg.settings.file_roots["node-a"] / "c", target_modules=("q_proj", "k_proj"))
    config = adapter_config(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    (d / CONFIG).write_text(json.dumps(config))
    return d


def case_integer_weights(reg):
    header, data = good_header()
    for entry in header.values():
        entry["dtype"] = "I32"
    return set_weights(version_dir(reg, "c"), raw_safetensors(header, data))


def case_too_many_tensors(reg):
    return write_adapter(reg.settings.file_roots["node-a"] / "c", layers=5)  # 20 tensors


def case_pickle_named_safetensors(reg):
    payload = pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=4)
    return set_weights(version_dir(reg, "c"), payload)


def case_config_mismatch(reg):
    d = version_dir(reg, "c")
    (d / CONFIG).write_text(
        json.dumps(adapter_config(rank=16, alpha=8.0, target_modules=("q_proj", "v_proj")))
    )
    return d


def case_config_dora(reg):
    d = version_dir(reg, "c")
    config = adapter_config(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    config["use_dora"] = True
    (d / CONFIG).write_text(json.dumps(config))
    return d


BY_REFERENCE_CONTENT = [
    (case_header_too_large, ResourceExhausted, "SAFETENSORS_HEADER_TOO_LARGE"),
    (case_header_not_json, InvalidArgument, "SAFETENSORS_BAD_HEADER"),
    (case_header_truncated, InvalidArgument, "SAFETENSORS_TRUNCATED"),
    (case_offsets_past_end, InvalidArgument, "SAFETENSORS_BAD_OFFSETS"),
    (case_offsets_overlap, InvalidArgument, "SAFETENSORS_BAD_OFFSETS"),
    (case_duplicate_tensor_keys, InvalidArgument, "SAFETENSORS_BAD_HEADER"),
    (case_rank_disagrees_with_spec, InvalidArgument, "SHAPE_MISMATCH"),
    (case_untargeted_module, InvalidArgument, "UNTARGETED_MODULE"),
    (case_integer_weights, InvalidArgument, "SAFETENSORS_BAD_DTYPE"),
    (case_too_many_tensors, ResourceExhausted, "TOO_MANY_TENSORS"),
    (case_pickle_named_safetensors, InvalidArgument, "PICKLE_REFUSED"),
    (case_config_mismatch, InvalidArgument, "ADAPTER_CONFIG_MISMATCH"),
    (case_config_dora, InvalidArgument, "ADAPTER_CONFIG_UNSUPPORTED"),
]


async def assert_nothing_stored(registry) -> None:
    assert await registry.client.list_versions("exp-1", include_inactive=True) == []
    assert (await registry.client.get_adapter("exp-1")).latest_version == 0
    await registry.runtime.registry.settle()
    assert blob_files(registry.settings) == []
    assert staging_files(registry.settings) == []


@pytest.mark.parametrize(
    "build, error, reason",
    BY_REFERENCE_CONTENT,
    ids=[c[0].__name__[5:] for c in BY_REFERENCE_CONTENT],
)
async def test_hostile_content_by_reference(registry, build, error, reason):
    directory = build(registry)
    with pytest.raises(error) as exc:
        await registry.client.publish_version("exp-1", directory, expected_parent_version=0)
    assert exc.value.reason == reason, exc.value.message
    await assert_nothing_stored(registry)
    # The adapter is not wedged: a good version still gets number 1.
    good = write_adapter(registry.settings.file_roots["node-a"] / "good")
    response = await registry.client.publish_version("exp-1", good, expected_parent_version=0)
    assert response.version.version == 1


def _valid_request(registry, directory: Path, **overrides) -> dict:
    files, digest = digest_directory(directory)
    return {"uri": directory.as_uri(), "files": files, "sha256": digest, **overrides}


async def _publish_raw(registry, **fields):
    request = pb.PublishVersionRequest(
        request_id="r-" + os.urandom(4).hex(),
        adapter_id="exp-1",
        expected_parent_version=0,
        **fields,
    )
    return await registry.client._unary(registry.client.stub.PublishVersion, request)


async def test_hostile_references(registry, tmp_path):
    root = registry.settings.file_roots["node-a"]
    good = version_dir(registry, "good")
    outside = write_adapter(tmp_path / "outside")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    linked = version_dir(registry, "linked")
    (linked / WEIGHTS).unlink()
    (linked / WEIGHTS).symlink_to(outside / WEIGHTS)

    cases = [
        (f"file://{root}/good/../../outside", "PATH_TRAVERSAL"),
        (outside.as_uri(), "PATH_OUTSIDE_ROOTS"),
        ((root / "escape").as_uri(), "SYMLINK_ESCAPE"),
        (linked.as_uri(), "SYMLINK_REFUSED"),
        ("http://example.com/adapter", "UNSUPPORTED_URI_SCHEME"),
        ("mem://node-a/exp-1/1", "UNSUPPORTED_URI_SCHEME"),
        ("s3://bucket/some/adapter", "UNSUPPORTED_URI_SCHEME"),
        (f"file://otherhost{good}", "INVALID_URI"),
    ]
    for uri, reason in cases:
        with pytest.raises(InvalidArgument) as exc:
            await _publish_raw(registry, **_valid_request(registry, good, uri=uri))
        assert exc.value.reason == reason, (uri, exc.value.message)
    await assert_nothing_stored(registry)


async def test_hostile_declarations(registry):
    good = version_dir(registry, "good")
    files, digest = digest_directory(good)
    pickle_files = [
        adapter_pb2.FileDigest(name="adapter_model.bin", sha256="0" * 64, size_bytes=10),
        files[0],
    ]
    huge = [
        files[0],
        adapter_pb2.FileDigest(name=WEIGHTS, sha256="0" * 64, size_bytes=MAX_VERSION_BYTES),
    ]
    wrong_sha = [
        files[0],
        adapter_pb2.FileDigest(name=WEIGHTS, sha256="1" * 64, size_bytes=files[1].size_bytes),
    ]
    cases = [
        (
            {"files": pickle_files, "sha256": manifest_sha256(pickle_files)},
            InvalidArgument,
            "PICKLE_REFUSED",
        ),
        (
            {"files": files[:1], "sha256": manifest_sha256(files[:1])},
            InvalidArgument,
            "MISSING_FILE",
        ),
        ({"files": [*files, files[0]], "sha256": digest}, InvalidArgument, "DUPLICATE_FILE"),
        ({"sha256": "f" * 64}, InvalidArgument, "MANIFEST_DIGEST_MISMATCH"),
        ({"files": huge, "sha256": manifest_sha256(huge)}, ResourceExhausted, "VERSION_TOO_LARGE"),
        ({"files": wrong_sha, "sha256": manifest_sha256(wrong_sha)}, DataLoss, "DIGEST_MISMATCH"),
    ]
    for overrides, error, reason in cases:
        with pytest.raises(error) as exc:
            await _publish_raw(registry, **_valid_request(registry, good, **overrides))
        assert exc.value.reason == reason, (overrides, exc.value.message)
    await assert_nothing_stored(registry)


async def _upload_raw(registry, files, chunks):
    async def messages():
        yield pb.UploadVersionRequest(
            header=pb.UploadVersionHeader(
                request_id="u-" + os.urandom(4).hex(),
                adapter_id="exp-1",
                expected_parent_version=0,
                files=files,
            )
        )
        for name, offset, data in chunks:
            yield pb.UploadVersionRequest(
                chunk=pb.FileChunk(file_name=name, offset=offset, data=data)
            )

    return await registry.client._unary(registry.client.stub.UploadVersion, messages())


def _digest(name: str, data: bytes) -> adapter_pb2.FileDigest:
    return adapter_pb2.FileDigest(
        name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )


async def test_hostile_uploads(registry, tmp_path):
    good = write_adapter(tmp_path / "good")
    config, weights = (good / CONFIG).read_bytes(), (good / WEIGHTS).read_bytes()
    header, data = good_header()
    bad_weights = raw_safetensors(header, data, claimed_len=len(weights) * 2)
    pickled = pickle.dumps(["not", "tensors"])
    cases = [
        # (declared files, chunks, error, reason)
        (
            [_digest(CONFIG, config), _digest("adapter_model.pt", pickled)],
            [],
            InvalidArgument,
            "PICKLE_REFUSED",
        ),
        (
            [
                _digest(CONFIG, config),
                adapter_pb2.FileDigest(name=WEIGHTS, sha256="0" * 64, size_bytes=1 << 30),
            ],
            [],
            ResourceExhausted,
            "VERSION_TOO_LARGE",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, weights)],
            [(CONFIG, 0, config), (WEIGHTS, 0, weights + b"extra")],
            InvalidArgument,
            "UPLOAD_EXCEEDS_DECLARED_SIZE",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, weights)],
            [(CONFIG, 0, config), ("../../etc/passwd", 0, b"x")],
            InvalidArgument,
            "UNEXPECTED_FILE",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, weights)],
            [(CONFIG, 0, config), (WEIGHTS, 100, weights[100:])],
            InvalidArgument,
            "CHUNK_OUT_OF_ORDER",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, weights)],
            [(CONFIG, 0, config), (WEIGHTS, 0, weights[:100])],
            InvalidArgument,
            "UPLOAD_INCOMPLETE",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, bad_weights)],
            [(CONFIG, 0, config), (WEIGHTS, 0, bad_weights)],
            InvalidArgument,
            "SAFETENSORS_TRUNCATED",
        ),
        (
            [_digest(CONFIG, config), _digest(WEIGHTS, pickled)],
            [(CONFIG, 0, config), (WEIGHTS, 0, pickled)],
            InvalidArgument,
            "PICKLE_REFUSED",
        ),
    ]
    for files, chunks, error, reason in cases:
        with pytest.raises(error) as exc:
            await _upload_raw(registry, files, chunks)
        assert exc.value.reason == reason, exc.value.message
    await assert_nothing_stored(registry)
    response = await registry.client.upload_version("exp-1", good, expected_parent_version=0)
    assert response.version.version == 1
