"""Publish latency: by reference vs by upload, for a 1 MB and a 64 MB adapter.

The registry runs as its own process (``python -m lorafleet.registry``, SQLite +
local blob store, as ``lorafleet up`` starts it); this process is the producer.
For each size, publishes alternate between the two modes repeat by repeat, on
distinct version directories (valid PEFT layout with Llama shapes):

- by reference: the files are already in the node cache; the call carries their
  URI + digests, the registry verifies them in place (hash + header + shapes)
  and commits. The copy to the durable store happens afterwards, in the
  background: its lag is reported separately, it is not publish latency.
- by upload: the same bytes are streamed in 1 MiB chunks; the registry stages,
  hashes, validates, moves them into the durable store and commits.

In both modes the producer already knows the digests (the trainer computes them
while writing), so client-side hashing is not timed. Timings across machines are
not comparable; the ratio measured side by side is the result.

    python benchmarks/registry_publish.py [--out runs/bench/registry_publish.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from lorafleet.client.registry import AsyncRegistryClient, digest_directory  # noqa: E402
from lorafleet.registry.testing import layers_for_bytes, write_adapter  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3-4B-like widths; rank 8. 1 MB: q/v only, 3 layers. 64 MB: all linears, 35 layers.
HIDDEN, INTERMEDIATE, RANK = 2560, 9728, 8
SIZES = {
    "1MB": {"target_bytes": 1 << 20, "targets": ("q_proj", "v_proj")},
    "64MB": {"target_bytes": 64 << 20, "targets": ALL_LINEAR},
}


async def start_registry(data_dir: Path, node_root: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "services"),
        "LORAFLEET_REGISTRY_DATA_DIR": str(data_dir),
        "LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps({"bench-node": str(node_root)}),
        "LORAFLEET_REGISTRY_LOG_FORMAT": "json",
        "LORAFLEET_REGISTRY_LOG_LEVEL": "warning",
        "LORAFLEET_REGISTRY_KEEP_LAST_VERSIONS": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lorafleet.registry",
        "--port",
        "0",
        "--log-level",
        "info",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async for raw in proc.stderr:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "server_started":
            asyncio.get_running_loop().create_task(_drain(proc))
            return proc, f"127.0.0.1:{event['port']}"
    raise RuntimeError("registry exited before serving")


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    async for _ in proc.stderr:
        pass


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(samples),
        "p50_ms": statistics.median(ordered),
        "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


async def bench_size(client, label, spec, reps, node_root, scratch) -> dict:
    layers = layers_for_bytes(
        spec["target_bytes"],
        rank=RANK,
        target_modules=spec["targets"],
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
    )
    adapter_id = f"bench-{label.lower()}"
    await client.create_adapter(
        adapter_id,
        lora={"rank": RANK, "alpha": 16.0, "target_modules": list(spec["targets"])},
        base_model="qwen3-4b-like",
    )
    samples: dict[str, list[float]] = {"reference": [], "upload": []}
    copy_lag_ms: list[float] = []
    size_bytes = 0
    parent = 0
    for rep in range(reps):
        for mode in ("reference", "upload"):
            root = node_root if mode == "reference" else scratch
            directory = write_adapter(
                root / f"{adapter_id}-{mode}-{rep}",
                rank=RANK,
                alpha=16.0,
                target_modules=spec["targets"],
                layers=layers,
                hidden=HIDDEN,
                intermediate=INTERMEDIATE,
                seed=rep * 2 + (mode == "upload"),
            )
            files, digest = digest_directory(directory)  # the producer knows these
            size_bytes = sum(f.size_bytes for f in files)
            start = time.perf_counter()
            if mode == "reference":
                response = await client.publish_version(
                    adapter_id,
                    directory,
                    expected_parent_version=parent,
                    files=files,
                    sha256=digest,
                )
            else:
                response = await client.upload_version(
                    adapter_id, directory, expected_parent_version=parent, files=files
                )
            elapsed_ms = (time.perf_counter() - start) * 1000
            samples[mode].append(elapsed_ms)
            parent = response.version.version
            if mode == "reference":
                while len((await client.get_version(adapter_id, parent)).uris) < 2:
                    await asyncio.sleep(0.005)
                copy_lag_ms.append((time.perf_counter() - start) * 1000 - elapsed_ms)
    ref, up = summary(samples["reference"]), summary(samples["upload"])
    return {
        "size": label,
        "size_bytes": size_bytes,
        "layers": layers,
        "target_modules": list(spec["targets"]),
        "reference": ref,
        "upload": up,
        "upload_over_reference_p50": up["p50_ms"] / ref["p50_ms"],
        "durable_copy_lag_ms": summary(copy_lag_ms),
        "samples_ms": samples,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/registry_publish.json"))
    parser.add_argument("--reps-small", type=int, default=20)
    parser.add_argument("--reps-large", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        tmp_path = Path(tmp)
        node_root, scratch = tmp_path / "node", tmp_path / "producer"
        node_root.mkdir()
        scratch.mkdir()
        proc, address = await start_registry(tmp_path / "registry", node_root)
        try:
            async with AsyncRegistryClient(address, timeout_s=120) as client:
                results = [
                    await bench_size(
                        client, "1MB", SIZES["1MB"], args.reps_small, node_root, scratch
                    ),
                    await bench_size(
                        client, "64MB", SIZES["64MB"], args.reps_large, node_root, scratch
                    ),
                ]
        finally:
            proc.terminate()
            await proc.wait()

    columns = ("size", 6), ("mode", 10), ("n", 3), ("p50 ms", 9), ("mean ms", 9), ("min ms", 8)
    print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'max ms':>8}  upload/ref")
    for r in results:
        for mode in ("reference", "upload"):
            s = r[mode]
            ratio = f"{r['upload_over_reference_p50']:.2f}x" if mode == "upload" else ""
            print(
                f"{r['size']:>6} {mode:>10} {s['n']:>3} {s['p50_ms']:>9.1f} {s['mean_ms']:>9.1f}"
                f" {s['min_ms']:>8.1f} {s['max_ms']:>8.1f}  {ratio}"
            )
        lag = r["durable_copy_lag_ms"]
        print(
            f"{r['size']:>6} {'(copy lag)':>10} {lag['n']:>3} {lag['p50_ms']:>9.1f}"
            "  background, after READY"
        )
    report = {
        "benchmark": "registry_publish",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "registry": "separate process, SQLite (WAL, synchronous=FULL), local blob store",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
