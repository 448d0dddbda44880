"""Manifest digest, declared-file checks, request field checks, settings."""

from __future__ import annotations

import hashlib

import pytest

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.client.registry import manifest_sha256 as client_manifest
from lorafleet.client.registry import parse_selector
from lorafleet.core.config import ConfigError, load_settings
from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.registry import fields
from lorafleet.registry.config import RegistrySettings
from lorafleet.registry.manifest import check_declared_files, manifest_sha256
from lorafleet.registry.types import FileDigest

CONFIG = FileDigest("adapter_config.json", "a" * 64, 10)
WEIGHTS = FileDigest("adapter_model.safetensors", "b" * 64, 100)


def test_manifest_digest_is_the_documented_one_and_order_free():
    expected = hashlib.sha256(
        f"adapter_config.json\t{'a' * 64}\t10\n"
        f"adapter_model.safetensors\t{'b' * 64}\t100\n".encode()
    ).hexdigest()
    assert manifest_sha256([WEIGHTS, CONFIG]) == expected
    protos = [
        adapter_pb2.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes)
        for f in (CONFIG, WEIGHTS)
    ]
    assert client_manifest(protos) == expected


@pytest.mark.parametrize(
    "files, error, reason",
    [
        ([CONFIG], InvalidArgument, "MISSING_FILE"),
        ([CONFIG, WEIGHTS, CONFIG], InvalidArgument, "DUPLICATE_FILE"),
        ([CONFIG, FileDigest("adapter_model.bin", "b" * 64, 1)], InvalidArgument, "PICKLE_REFUSED"),
        (
            [CONFIG, WEIGHTS, FileDigest("README.md", "c" * 64, 1)],
            InvalidArgument,
            "UNEXPECTED_FILE",
        ),
        (
            [CONFIG, FileDigest("../adapter_model.safetensors", "b" * 64, 1)],
            InvalidArgument,
            "UNEXPECTED_FILE",
        ),
        ([CONFIG, FileDigest(WEIGHTS.name, "B" * 64, 1)], InvalidArgument, "INVALID_SHA256"),
        ([CONFIG, FileDigest(WEIGHTS.name, "b" * 64, 0)], InvalidArgument, "INVALID_SIZE"),
        (
            [CONFIG, FileDigest(WEIGHTS.name, "b" * 64, 10**6)],
            ResourceExhausted,
            "VERSION_TOO_LARGE",
        ),
        (
            [FileDigest(CONFIG.name, "a" * 64, 10**5), WEIGHTS],
            ResourceExhausted,
            "CONFIG_TOO_LARGE",
        ),
    ],
)
def test_declared_files(files, error, reason):
    with pytest.raises(error) as exc:
        check_declared_files(files, max_version_bytes=1000, max_config_bytes=1000)
    assert exc.value.reason == reason


def test_page_tokens_are_bound_to_their_listing():
    token = fields.encode_page_token("versions", "exp-1:0", 7)
    assert fields.decode_page_token(token, "versions", "exp-1:0") == 7
    assert fields.decode_page_token("", "versions", "exp-1:0") is None
    for bad in (token + "x", "!!!", fields.encode_page_token("versions", "exp-2:0", 7)):
        with pytest.raises(InvalidArgument) as exc:
            fields.decode_page_token(bad, "versions", "exp-1:0")
        assert exc.value.reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize(
    "alias, reason",
    [("latest", "ALIAS_RESERVED"), ("3", "INVALID_ALIAS"), ("Best", "INVALID_ALIAS")],
)
def test_alias_rules(alias, reason):
    with pytest.raises(InvalidArgument) as exc:
        fields.user_alias(alias)
    assert exc.value.reason == reason


def test_selector_strings():
    assert parse_selector("exp").WhichOneof("version_selector") is None
    assert parse_selector("exp@3").version == 3
    assert parse_selector("exp@best").alias == "best"
    assert parse_selector("exp@latest").alias == "latest"


def test_settings_from_env_and_forbidden_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_REGISTRY_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LORAFLEET_REGISTRY_FILE_ROOTS", '{"node-0": "/var/cache/lf"}')
    monkeypatch.setenv("LORAFLEET_REGISTRY_KEEP_LAST_VERSIONS", "3")
    settings = load_settings(RegistrySettings)
    assert settings.keep_last_versions == 3
    assert settings.file_roots == {"node-0": __import__("pathlib").Path("/var/cache/lf")}
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'd' / 'registry.db'}"
    assert settings.resolved_durable_url == (tmp_path / "d" / "blobs").as_uri()
    with pytest.raises(ConfigError):
        load_settings(RegistrySettings, keep_last=3)
