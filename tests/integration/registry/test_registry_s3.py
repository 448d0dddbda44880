"""The durable store on a real S3-compatible server (moto in server mode)."""

from __future__ import annotations

import pytest
from registry_harness import SPEC, make_settings, start_registry

from lorafleet.core.errors import DataLoss
from lorafleet.registry.testing import write_adapter

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "lorafleet-test"


@pytest.fixture
def s3_endpoint(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def objects(s3, prefix=""):
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


async def test_s3_durable_store(s3_endpoint, tmp_path):
    settings = make_settings(
        tmp_path, durable_url=f"s3://{BUCKET}/registry", s3_endpoint_url=s3_endpoint
    )
    running = await start_registry(settings)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    try:
        client = running.client
        await client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        uploaded = write_adapter(tmp_path / "up", seed=1)
        v1 = await client.upload_version("exp-1", uploaded, expected_parent_version=0)
        assert v1.ref.uri.startswith(f"s3://{BUCKET}/registry/adapters/exp-1/00000001-")

        by_ref = write_adapter(settings.file_roots["node-a"] / "v2", seed=2)
        await client.publish_version("exp-1", by_ref, expected_parent_version=1)
        await running.runtime.registry.settle()
        v2 = await client.get_version("exp-1", 2)
        assert v2.uris[1].startswith(f"s3://{BUCKET}/registry/adapters/exp-1/00000002-")
        assert len(objects(s3)) == 4

        for version, source in ((1, uploaded), (2, by_ref)):
            out = await client.download_version("exp-1", version, tmp_path / f"dl{version}")
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                assert (out / name).read_bytes() == (source / name).read_bytes()

        key = next(
            k
            for k in objects(s3, "registry/adapters/exp-1/00000001-")
            if k.endswith(".safetensors")
        )
        body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[-5] ^= 0xFF
        s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
        with pytest.raises(DataLoss) as exc:
            await client.download_version("exp-1", 1, tmp_path / "corrupt")
        assert exc.value.reason == "BLOB_CORRUPT"

        await client.publish_version(
            "exp-1",
            write_adapter(settings.file_roots["node-a"] / "v3", seed=3),
            expected_parent_version=2,
        )
        await client.delete_version("exp-1", 1)
        assert objects(s3, "registry/adapters/exp-1/00000001-") == []
    finally:
        await running.stop()
