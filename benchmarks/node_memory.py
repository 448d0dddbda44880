"""Node memory: separate rollout + trainer processes against the co-located node.

Both layouts serve the same workload, measured as processes exactly as they run
in production (``python -m lorafleet.<service>``, started by ``LocalCluster``):

- separate: a trainer process and a rollout process with the torch engine
  (``LORAFLEET_ROLLOUT_ENGINE=torch``), each loading the base model; versions go
  trainer -> node cache files -> rollout (loaded by reference from the files);
- node: one ``lorafleet.node`` process, one base model shared by both services;
  versions go trainer -> rollout as in-memory references (``mem://``);
- optionally (``--vllm``), the vLLM rollout process (with its engine-core worker
  processes) serving the same versions, for reference.

Workload, the same for each: ``--adapters`` adapters created on the trainer
(rank ``--rank``), one train step each (so AdamW moments exist), one saved
version each, then every version generated with on the rollout side (so each is
loaded and the generation buffers are warm). Then the proportional set size
(PSS, from ``/proc/<pid>/smaps_rollup``: shared pages split among the processes
that map them) of each service process (plus its children) is read. The
registry runs in both layouts and is reported apart, not in the totals.

``--hidden`` replaces the tiny model with a random Llama of that hidden size (same
tokenizer), to see how the difference grows with the base model.

    python benchmarks/node_memory.py [--adapters 8] [--rank 8] [--vllm]
        [--hidden 0] [--repeats 1] [--out runs/bench/node_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

import psutil  # noqa: E402

from lorafleet.client.rollout import RolloutClient  # noqa: E402
from lorafleet.client.trainer import TrainerClient, sample  # noqa: E402
from lorafleet.cluster.local import LocalCluster, ServiceSpec  # noqa: E402

NODE_ID = "node-0"
PROMPTS = ["12+3=", "reverse abc:", "copy hello:", "sort 3 1 2:"]
MIB = 1024 * 1024
START_TIMEOUT_S = 300.0


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss / Pss / Pss_Anon / Pss_File / Pss_Shmem of one process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def process_memory(pid: int) -> dict[str, int]:
    """PSS and friends of a process and all its descendants (vLLM's workers)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Pss_Shmem": 0}
    for proc in procs:
        try:
            rollup = smaps_rollup(proc.pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for key in total:
            total[key] += rollup.get(key, 0)
    total["processes"] = len(procs)
    return total


def model_dir(tiny: Path, hidden: int, work: Path) -> Path:
    if not hidden:
        return tiny
    import torch
    import transformers

    out = work / f"llama-h{hidden}"
    config = transformers.AutoConfig.from_pretrained(tiny)
    config.hidden_size = hidden
    config.intermediate_size = hidden * 3
    config.num_attention_heads = max(4, hidden // 64)
    config.num_key_value_heads = config.num_attention_heads
    config.head_dim = hidden // config.num_attention_heads
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


def samples(seed: int) -> list:
    import random

    rng = random.Random(seed)
    return [
        sample([1] + [rng.randrange(5, 95) for _ in range(23)], prompt_length=8,
               logprobs=[-3.5] * 16, advantage=rng.uniform(-1.0, 1.0))
        for _ in range(16)
    ]


def train_and_publish(address: str, n: int, rank: int) -> None:
    with TrainerClient(address) as trainer:
        for i in range(n):
            trainer.create_adapter(f"exp-{i}", lora={"rank": rank, "alpha": 2.0 * rank},
                                   optimizer={"learning_rate": 1e-3}, seed=i)
        # Concurrent steps: the trainer fuses them, as it would under load.
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(lambda i: trainer.train_step(f"exp-{i}", samples(i)), range(n)))
        for i in range(n):
            trainer.save_version(f"exp-{i}", expected_parent_version=0)


def generate_all(address: str, n: int) -> None:
    with RolloutClient(address, timeout_s=300.0) as rollout:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(
                lambda i: rollout.generate(PROMPTS, adapter=f"exp-{i}@1", n=4, temperature=1.0,
                                           max_tokens=16),
                range(n),
            ))
        loaded = {a.engine_name for a in rollout.list_loaded()}
    missing = {f"exp-{i}@1" for i in range(n)} - loaded
    if missing:
        raise RuntimeError(f"rollout did not keep {sorted(missing)} loaded")


def settle() -> None:
    time.sleep(1.0)


def start_registry(cluster: LocalCluster, run_dir: Path, cache: Path) -> str:
    return cluster.start_and_wait(ServiceSpec("registry", "registry", {
        "LORAFLEET_REGISTRY_DATA_DIR": str(run_dir / "registry"),
        "LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps({NODE_ID: str(cache)}),
    }))


def rollout_env(prefix: str, model: Path, registry: str, cache: Path, n: int, rank: int) -> dict:
    return {
        f"{prefix}MODEL_PATH": str(model),
        f"{prefix}REGISTRY_ADDRESS": registry,
        f"{prefix}NODE_ID": NODE_ID,
        f"{prefix}ADAPTER_CACHE_DIR": str(cache),
        f"{prefix}MAX_LORAS": str(n),
        f"{prefix}MAX_CPU_LORAS": str(max(n, 2)),
        f"{prefix}MAX_LORA_RANK": str(rank),
    }


def run_separate(work: Path, model: Path, n: int, rank: int, with_vllm: bool) -> dict:
    run_dir = work / "separate"
    cache = run_dir / "node-cache"
    cache.mkdir(parents=True)
    cluster = LocalCluster(run_dir)
    try:
        registry = start_registry(cluster, run_dir, cache)
        trainer = cluster.start_and_wait(ServiceSpec("trainer", "trainer", {
            "LORAFLEET_TRAINER_MODEL_PATH": str(model),
            "LORAFLEET_TRAINER_REGISTRY_ADDRESS": registry,
            "LORAFLEET_TRAINER_NODE_ID": NODE_ID,
            "LORAFLEET_TRAINER_ADAPTER_CACHE_DIR": str(cache),
            "LORAFLEET_TRAINER_MAX_ADAPTERS": str(n),
            "LORAFLEET_TRAINER_MAX_RANK": str(rank),
            "LORAFLEET_TRAINER_TORCH_THREADS": "1",
        }), timeout_s=START_TIMEOUT_S)
        rollout = cluster.start_and_wait(ServiceSpec("rollout", "rollout", {
            **rollout_env("LORAFLEET_ROLLOUT_", model, registry, cache, n, rank),
            "LORAFLEET_ROLLOUT_ENGINE": "torch",
            "OMP_NUM_THREADS": "1",
        }), timeout_s=START_TIMEOUT_S)
        train_and_publish(trainer, n, rank)
        generate_all(rollout, n)
        settle()
        pids = {name: cluster.services[name].process.pid for name in cluster.services}
        result = {
            "trainer": process_memory(pids["trainer"]),
            "rollout_torch": process_memory(pids["rollout"]),
            "registry": process_memory(pids["registry"]),
        }
        if with_vllm:
            # The same versions, served by the vLLM rollout, beside the trainer.
            cluster.stop("rollout")
            vllm = cluster.start_and_wait(ServiceSpec("rollout-vllm", "rollout", {
                **rollout_env("LORAFLEET_ROLLOUT_", model, registry, cache, n, rank),
                "LORAFLEET_ROLLOUT_ENGINE": "vllm",
                "LORAFLEET_ROLLOUT_KV_CACHE_GIB": "0.25",
            }), timeout_s=START_TIMEOUT_S)
            generate_all(vllm, n)
            settle()
            result["rollout_vllm"] = process_memory(cluster.services["rollout-vllm"].process.pid)
            result["trainer_with_vllm"] = process_memory(pids["trainer"])
        return result
    finally:
        cluster.stop_all(timeout_s=60.0)


def run_node(work: Path, model: Path, n: int, rank: int) -> dict:
    run_dir = work / "node"
    cache = run_dir / "node-cache"
    cache.mkdir(parents=True)
    cluster = LocalCluster(run_dir)
    try:
        registry = start_registry(cluster, run_dir, cache)
        node = cluster.start_and_wait(ServiceSpec("node", "node", {
            **rollout_env("LORAFLEET_NODE_", model, registry, cache, n, rank),
            "LORAFLEET_NODE_MAX_ADAPTERS": str(n),
            "LORAFLEET_NODE_MAX_RANK": str(rank),
            "LORAFLEET_NODE_TORCH_THREADS": "1",
        }), timeout_s=START_TIMEOUT_S)
        train_and_publish(node, n, rank)
        generate_all(node, n)
        settle()
        log = cluster.services["node"].log_path.read_text(errors="replace")
        sources = [json.loads(line).get("source") for line in log.splitlines()
                   if '"engine_adapter_added"' in line]
        return {
            "node": process_memory(cluster.services["node"].process.pid),
            "registry": process_memory(cluster.services["registry"].process.pid),
            "rollout_loads_by_source": {s: sources.count(s) for s in set(sources)},
        }
    finally:
        cluster.stop_all(timeout_s=60.0)


def median_run(samples: list[dict]) -> dict:
    return sorted(samples, key=lambda m: m["Pss"])[len(samples) // 2]


def mib(value: int) -> float:
    return round(value / MIB, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=0,
                        help="random Llama of this hidden size instead of the tiny model")
    parser.add_argument("--vllm", action="store_true", help="also measure the vLLM rollout")
    parser.add_argument("--model-path", default="", help="HF model dir (default: tiny model)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of both layouts (interleaved); the median is reported")
    parser.add_argument("--out", default="runs/bench/node_memory.json")
    args = parser.parse_args()

    from lorafleet.models.cache import ensure_tiny_model

    tiny = Path(args.model_path) if args.model_path else ensure_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="node-memory-"))
    try:
        model = model_dir(tiny, args.hidden, work)
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        started = time.perf_counter()
        runs = []
        for repeat in range(args.repeats):
            # Interleaved, so both layouts see the same machine load.
            separate = run_separate(work / f"r{repeat}", model, args.adapters, args.rank,
                                    args.vllm and repeat == 0)
            node = run_node(work / f"r{repeat}", model, args.adapters, args.rank)
            runs.append({"separate": separate, "node": node})
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Per process, the run with the median PSS.
    separate = dict(runs[0]["separate"])
    node = dict(runs[0]["node"])
    for key in ("trainer", "rollout_torch"):
        separate[key] = median_run([r["separate"][key] for r in runs])
    node["node"] = median_run([r["node"]["node"] for r in runs])

    sep_total = separate["trainer"]["Pss"] + separate["rollout_torch"]["Pss"]
    rows = [
        ("separate", "trainer", separate["trainer"]),
        ("separate", "rollout (torch engine)", separate["rollout_torch"]),
        ("node", "node (trainer + rollout)", node["node"]),
    ]
    if "rollout_vllm" in separate:
        rows.append(("reference", "rollout (vLLM, incl. engine core)", separate["rollout_vllm"]))
    print(f"\nmodel {model} ({mib(model_bytes)} MiB of weights), {args.adapters} adapters of "
          f"rank {args.rank}, median of {args.repeats} run(s)\n")
    print(f"{'layout':10} {'process':36} {'procs':>5} {'PSS MiB':>9} {'anon':>8} {'file':>8} "
          f"{'RSS MiB':>9}")
    for layout, name, m in rows:
        print(f"{layout:10} {name:36} {m['processes']:>5} {mib(m['Pss']):>9} "
              f"{mib(m['Pss_Anon']):>8} {mib(m['Pss_File']):>8} {mib(m['Rss']):>9}")
    print(f"{'separate':10} {'total (trainer + rollout)':36} {'':>5} {mib(sep_total):>9}")
    ratio = node["node"]["Pss"] / sep_total
    print(f"\nnode / separate PSS: {ratio:.2f} (saves {mib(sep_total - node['node']['Pss'])} MiB)")
    if args.repeats > 1:
        per_run = [
            (mib(r["separate"]["trainer"]["Pss"] + r["separate"]["rollout_torch"]["Pss"]),
             mib(r["node"]["node"]["Pss"]))
            for r in runs
        ]
        print(f"per run (separate total, node) MiB: {per_run}")
    if "rollout_vllm" in separate:
        vllm_total = separate["rollout_vllm"]["Pss"] + separate["trainer_with_vllm"]["Pss"]
        print(f"trainer + vLLM rollout PSS: {mib(vllm_total)} MiB")
    print(f"registry (both layouts, not counted): {mib(separate['registry']['Pss'])} / "
          f"{mib(node['registry']['Pss'])} MiB")
    print(f"node rollout loads by source: {node['rollout_loads_by_source']}")

    result = {
        "benchmark": "node_memory",
        "machine": {"platform": platform.platform(), "cpus": psutil.cpu_count()},
        "model": {"path": str(model) if args.hidden == 0 else f"random llama h={args.hidden}",
                  "weights_bytes": model_bytes},
        "adapters": args.adapters,
        "rank": args.rank,
        "repeats": args.repeats,
        "runs": runs,
        "separate": separate,
        "node": node,
        "separate_total_pss_bytes": sep_total,
        "node_pss_bytes": node["node"]["Pss"],
        "node_over_separate": round(ratio, 4),
        "elapsed_s": round(elapsed, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
