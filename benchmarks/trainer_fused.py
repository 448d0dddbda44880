"""Fused multi-adapter train step vs the same adapters stepped one at a time.

For N = 1, 2, 4, 8 adapters (rank 8 on all block linears, AdamW each), one step
is 16 sequences x 32 tokens per adapter with the importance-sampling policy-gradient
loss. "fused" runs the N requests as one ``TrainEngine.train_step`` call (one
forward/backward over the shared base, then N optimizer steps); "separate" runs N
calls of one request each. Both are measured side by side in the same process,
interleaved repeat by repeat, and reported as a ratio (timings across machines
are not comparable; ratios measured together are).

Also reports memory per added adapter: bytes the engine accounts (parameters +
AdamW moments) and the measured growth of the process (PSS) from 0 to N adapters.

    PYTHONPATH=services python benchmarks/trainer_fused.py [--out runs/bench/trainer_fused.json]

On a GPU node: ``--device cuda --dtype bfloat16``; ``--shape qwen2.5-0.5b`` builds
a randomly initialised model of Qwen2.5-0.5B's architecture (no model hub needed:
a pass's cost depends on the shapes, not on the weights). Memory per adapter is
then the growth of CUDA allocations, not of the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from lorafleet.lora.engine import TrainEngine  # noqa: E402
from lorafleet.lora.runtime import configure_cpu_allocator  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.lora.types import (  # noqa: E402
    LossConfig,
    OptimizerConfig,
    TokenSequence,
    TrainRequest,
    TrainSample,
)

# Qwen2.5-0.5B's published architecture (its config.json), for random-init runs.
QWEN2_5_0_5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)


def _model_dir(arg: str | None, shape: str = "tiny") -> tuple[str, str]:
    """The model to benchmark and how it was obtained."""
    if arg:
        return arg, "given"
    if shape == "qwen2.5-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        path = Path(tempfile.mkdtemp(prefix="lorafleet-bench-qwen-"))
        Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B)).to(torch.bfloat16).save_pretrained(path)
        return str(path), "random init, Qwen2.5-0.5B architecture"
    try:
        from lorafleet.models.cache import ensure_tiny_model  # type: ignore[import-not-found]

        return str(ensure_tiny_model()), "project tiny model"
    except ImportError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from lorafleet.models.tiny import tiny_config
        from lorafleet.models.tokenizer import build_vocab

        cfg = tiny_config(len(build_vocab()))
        how = "random init, project tiny architecture"
    except ImportError:
        cfg = LlamaConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=384, vocab_size=100,
                          max_position_embeddings=128)
        how = "random init, hidden 128 x 3 layers"
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="lorafleet-bench-model-"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path), how


def _pss_bytes() -> int:
    """Proportional set size of this process (RSS where smaps_rollup is missing)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _request(name: str, vocab: int, seqs: int, tokens: int, seed: int) -> TrainRequest:
    g = torch.Generator().manual_seed(seed)
    prompt = tokens // 4
    samples = []
    for i in range(seqs):
        ids = tuple(torch.randint(0, vocab, (tokens,), generator=g).tolist())
        # Rollout logprobs near the model's (about uniform at init), as a sampler gives.
        lps = tuple((torch.full((tokens - prompt,), -torch.log(torch.tensor(float(vocab))).item())
                     + 0.05 * torch.randn(tokens - prompt, generator=g)).tolist())
        samples.append(TrainSample(TokenSequence(ids, prompt), lps, advantage=(i % 4) - 1.5))
    return TrainRequest(name, tuple(samples), LossConfig())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/trainer_fused.json")
    ap.add_argument("--adapters", default="1,2,4,8")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="engine micro-batch size in padded tokens (0: engine default)")
    ap.add_argument("--batch-invariant", choices=("auto", "on", "off"), default="auto",
                    help="micro-batches per request (on), mixed (off), or the engine's "
                    "default for the device (auto: on for CPU)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--shape", choices=("tiny", "qwen2.5-0.5b"), default="tiny",
                    help="architecture of the random-init model when --model-dir is not given")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="leave glibc malloc at its defaults (see lorafleet.lora.runtime)")
    args = ap.parse_args(argv)
    # Engine events (adapter_created x N) would bury the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else configure_cpu_allocator()
    load_before = os.getloadavg()
    counts = [int(x) for x in args.adapters.split(",")]
    n_max = max(counts)
    cuda = torch.device(args.device).type == "cuda"

    def used_bytes() -> int:
        # On a GPU the adapters live in device memory; on CPU in the process.
        return torch.cuda.memory_allocated() if cuda else _pss_bytes()

    def sync() -> None:
        # Kernels run asynchronously on a GPU: a step ends when its kernels have.
        if cuda:
            torch.cuda.synchronize()

    model_dir, model_how = _model_dir(args.model_dir, args.shape)
    engine = TrainEngine.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype), device=args.device,
        max_adapters=n_max, max_rank=args.rank,
        micro_batch_tokens=args.micro_batch_tokens or None,
        batch_invariant={"auto": None, "on": True, "off": False}[args.batch_invariant])
    vocab = engine.vocab_size
    names = [f"exp{i}" for i in range(n_max)]
    requests = {n: _request(n, vocab, args.seqs, args.tokens, seed=i) for i, n in enumerate(names)}
    pss_after: list[int] = []
    pss0 = 0
    for i, name in enumerate(names):
        engine.create_adapter(name, LoraSpec(rank=args.rank, alpha=2 * args.rank),
                              OptimizerConfig(learning_rate=1e-4), seed=i)
        # One step each so AdamW moments exist before measuring memory; the first
        # adapter's steps also grow the heap to a step's working set, so the
        # baseline is taken after them and the growth is the adapters' own.
        for _ in range(3 if i == 0 else 1):
            engine.train_step([requests[name]])
        sync()
        if i == 0:
            pss0 = used_bytes()
        else:
            pss_after.append(used_bytes())
    info = engine.adapter_info(names[0])

    peaks: dict[int, int] = {}

    def fused(k: int) -> float:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = engine.train_step([requests[n] for n in names[:k]])
        sync()
        dt = time.perf_counter() - t0
        failed = [r for r in res if not getattr(r, "applied", False)]
        if failed:
            raise SystemExit(f"fused step of {k} adapters failed: {failed[0]}")
        if cuda:
            peaks[k] = max(peaks.get(k, 0), torch.cuda.max_memory_allocated())
        return dt

    def separate(k: int) -> float:
        t0 = time.perf_counter()
        for n in names[:k]:
            (res,) = engine.train_step([requests[n]])
            if not getattr(res, "applied", False):
                raise SystemExit(f"step of adapter {n} failed: {res}")
        sync()
        return time.perf_counter() - t0

    rows = []
    for k in counts:
        for _ in range(args.warmup):
            fused(k)
            separate(k)
        tf, ts = [], []
        for rep in range(args.repeats):
            # Alternate which goes first so drift (other load, thermal) hits both alike.
            if rep % 2:
                ts.append(separate(k))
                tf.append(fused(k))
            else:
                tf.append(fused(k))
                ts.append(separate(k))
        f_med, s_med = statistics.median(tf), statistics.median(ts)
        rows.append({
            "adapters": k,
            "fused_ms": round(f_med * 1000, 2),
            "separate_ms": round(s_med * 1000, 2),
            "speedup": round(s_med / f_med, 3),
            # Best-of-repeats is the least disturbed by other load on a shared machine.
            "speedup_best_of": round(min(ts) / min(tf), 3),
            "fused_adapter_steps_per_s": round(k / f_med, 2),
            "separate_adapter_steps_per_s": round(k / s_med, 2),
            "fused_ms_all": [round(x * 1000, 2) for x in tf],
            "separate_ms_all": [round(x * 1000, 2) for x in ts],
            # Device memory high-water mark of the fused step (None on CPU).
            "fused_peak_cuda_bytes": peaks.get(k),
        })

    pss_growth = (pss_after[-1] - pss0) / max(n_max - 1, 1) if pss_after else 0.0
    result = {
        "benchmark": "trainer_fused",
        "model": {"dir": model_dir, "source": model_how,
                  "base_parameter_bytes": engine.base_model_bytes(), "vocab_size": vocab},
        "step_shape": {"sequences_per_adapter": args.seqs, "tokens_per_sequence": args.tokens,
                       "rank": args.rank, "targets": list(info.spec.target_modules),
                       "loss": "policy_gradient (importance ratio, clip 0.2)",
                       "optimizer": "AdamW per adapter"},
        "repeats": args.repeats,
        "batch_invariant": engine.batch_invariant,
        "rows": rows,
        "memory_per_adapter": {
            "parameter_bytes": info.parameter_bytes,
            "optimizer_state_bytes": info.optimizer_state_bytes,
            "accounted_bytes": info.parameter_bytes + info.optimizer_state_bytes,
            # Growth of CUDA allocations on a GPU device, of the process's PSS on CPU.
            "measured_growth_of": "cuda_memory_allocated" if cuda else "process_pss",
            "measured_pss_growth_bytes": int(pss_growth),
            "pss_with_one_adapter_bytes": pss0,
            "pss_after_bytes": pss_after,
        },
        "engine": {"micro_batch_tokens": engine.micro_batch_tokens,
                   "strategy": engine.lora.state.strategy, "allocator_tuned": tuned},
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": str(engine.device), "dtype": args.dtype,
                "gpu": torch.cuda.get_device_name() if cuda else None,
                "python": platform.python_version(), "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result, out)
    return result


def _print(result: dict, out: Path) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a core dependency; plain text just in case
        for r in result["rows"]:
            print(r)
        return
    table = Table(title="fused multi-adapter train step vs separate steps "
                        f"({result['step_shape']['sequences_per_adapter']} seq x "
                        f"{result['step_shape']['tokens_per_sequence']} tok per adapter, "
                        f"rank {result['step_shape']['rank']})")
    for col in ("N", "fused ms", "separate ms", "speedup (median)", "speedup (best)",
                "fused steps/s", "separate steps/s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["adapters"]), f"{r['fused_ms']:.1f}", f"{r['separate_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_best_of']:.2f}x",
                      f"{r['fused_adapter_steps_per_s']:.1f}",
                      f"{r['separate_adapter_steps_per_s']:.1f}")
    console = Console()
    console.print(table)
    if any(r.get("fused_peak_cuda_bytes") for r in result["rows"]):
        peaks = ", ".join(f"N={r['adapters']} {r['fused_peak_cuda_bytes'] / 2**30:.1f} GiB"
                          for r in result["rows"])
        console.print(f"peak CUDA memory of the fused step: {peaks} (micro-batches of "
                      f"{result['engine']['micro_batch_tokens']} padded tokens)")
    m = result["memory_per_adapter"]
    console.print(
        f"memory per added adapter: {m['accounted_bytes'] / 1024:.1f} KiB accounted "
        f"(params {m['parameter_bytes'] / 1024:.1f} KiB + AdamW "
        f"{m['optimizer_state_bytes'] / 1024:.1f} KiB), measured "
        f"{'CUDA' if m['measured_growth_of'] == 'cuda_memory_allocated' else 'PSS'} growth "
        f"{m['measured_pss_growth_bytes'] / 1024:.1f} KiB; "
        f"base model {result['model']['base_parameter_bytes'] / 2**20:.2f} MiB "
        f"({result['model']['source']})")
    env = result["env"]
    console.print(f"torch {env['torch']}, {env['threads']} threads, load average "
                  f"{env['loadavg_before'][0]} -> {env['loadavg_after'][0]} on "
                  f"{env['cpu_count']} CPUs; steps/s are adapter-steps per second")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
