"""The registry process SIGKILLed in the middle of an upload, then restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from registry_harness import SPEC

from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.client.registry import AsyncRegistryClient, digest_directory
from lorafleet.core.errors import LorafleetError
from lorafleet.registry.testing import layers_for_bytes, write_adapter

SERVICES_DIR = Path(__file__).resolve().parents[3] / "services"
CHUNK = 64 * 1024


class RegistryProcess:
    """`python -m lorafleet.registry --port 0`, its port read from the
    `server_started` JSON log line."""

    def __init__(self, data_dir: Path, node_root: Path) -> None:
        self.env = {
            **os.environ,
            "PYTHONPATH": str(SERVICES_DIR),
            "LORAFLEET_REGISTRY_DATA_DIR": str(data_dir),
            "LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps({"node-a": str(node_root)}),
            "LORAFLEET_REGISTRY_LOG_FORMAT": "json",
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self) -> str:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lorafleet.registry",
            "--port",
            "0",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None

        async def port() -> int:
            async for raw in self.proc.stderr:  # type: ignore[union-attr]
                line = raw.decode().strip()
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("event") == "server_started":
                    return int(event["port"])
            raise AssertionError(f"registry exited before serving: {self.lines}")

        found = await asyncio.wait_for(port(), 30)
        # Keep draining stderr so the child never blocks on a full pipe.
        self._drain = asyncio.create_task(self._read_rest())
        return f"127.0.0.1:{found}"

    async def _read_rest(self) -> None:
        async for raw in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(raw.decode().strip())

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await self.proc.wait()
            await self._drain


@pytest.fixture
async def processes():
    started: list[RegistryProcess] = []
    yield started
    for proc in started:
        await proc.kill()


async def test_sigkill_mid_upload_then_retry_yields_one_version(processes, tmp_path):
    data_dir, node_root = tmp_path / "registry", tmp_path / "nodes"
    node_root.mkdir()
    layers = layers_for_bytes(
        4 << 20, rank=4, target_modules=SPEC["target_modules"], hidden=512, intermediate=1024
    )
    source = write_adapter(tmp_path / "src", layers=layers, hidden=512, intermediate=1024, seed=5)
    files, _ = digest_directory(source)
    request_id = "upload-crash-1"
    header = pb.UploadVersionHeader(
        request_id=request_id, adapter_id="exp-1", expected_parent_version=0, files=files
    )
    half_sent = asyncio.Event()

    async def stalling_upload():
        yield pb.UploadVersionRequest(header=header)
        for f in files:
            data = (source / f.name).read_bytes()
            for offset in range(0, len(data), CHUNK):
                if f.name.endswith(".safetensors") and offset >= len(data) // 2:
                    half_sent.set()
                    await asyncio.Event().wait()  # the "client" stalls here; the server dies
                yield pb.UploadVersionRequest(
                    chunk=pb.FileChunk(
                        file_name=f.name, offset=offset, data=data[offset : offset + CHUNK]
                    )
                )

    first = RegistryProcess(data_dir, node_root)
    processes.append(first)
    async with AsyncRegistryClient(await first.start()) as client:
        await client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        upload = asyncio.ensure_future(
            client._unary(client.stub.UploadVersion, stalling_upload(), 60)
        )
        await asyncio.wait_for(half_sent.wait(), 20)
        staged = data_dir / "staging"
        for _ in range(200):  # the server has written part of the upload
            partial = [p for p in staged.rglob("*.safetensors") if p.stat().st_size > 0]
            if partial:
                break
            await asyncio.sleep(0.05)
        assert partial, "upload never reached the staging area"
        pending = await client.list_versions("exp-1", include_inactive=True)
        assert [(v.version, v.state) for v in pending] == [(1, pb.VERSION_STATE_PENDING)]

        await first.kill(signal.SIGKILL)
        with pytest.raises(LorafleetError):
            await upload

    second = RegistryProcess(data_dir, node_root)
    processes.append(second)
    async with AsyncRegistryClient(await second.start()) as client:
        # No READY partial version; the PENDING row and the staged bytes are gone.
        assert await client.list_versions("exp-1", include_inactive=True) == []
        assert (await client.get_adapter("exp-1")).latest_version == 0
        assert [p for p in (data_dir / "staging").rglob("*")] == []
        assert [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] == []
        assert second.events("pending_publishes_recovered")[0]["count"] == 1

        retried = await client.upload_version(
            "exp-1", source, expected_parent_version=0, request_id=request_id, chunk_size=CHUNK
        )
        again = await client.upload_version(
            "exp-1", source, expected_parent_version=0, request_id=request_id
        )
        assert retried.version.version == 1 and retried.version.state == pb.VERSION_STATE_READY
        assert again == retried
        versions = await client.list_versions("exp-1", include_inactive=True)
        assert [(v.version, v.state) for v in versions] == [(1, pb.VERSION_STATE_READY)]
        out = await client.download_version("exp-1", 1, tmp_path / "dl")
        assert (out / "adapter_model.safetensors").read_bytes() == (
            source / "adapter_model.safetensors"
        ).read_bytes()
