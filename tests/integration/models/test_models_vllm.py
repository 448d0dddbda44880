"""The tiny model in vLLM(-CPU): loads, generates, applies a LoRA, logprobs match.

vLLM runs in a subprocess (``vllm_probe.py``): it spawns engine processes of its
own and should not share pytest's process. The comparison happens here, against
transformers (base) and peft (adapter) on the same tokens.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.envs import get_task, list_tasks

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorafleet.models.cache import load_model  # noqa: E402
from lorafleet.models.generate import greedy_generate  # noqa: E402

PROBE = Path(__file__).with_name("vllm_probe.py")
TOLERANCE = 1e-4


def _logprobs_of(model, rows: list[dict]) -> list[float]:
    diffs = []
    for row in rows:
        prompt_ids, ids = row["prompt_token_ids"], row["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1 : -1]
        mine = logp.gather(1, torch.tensor(ids)[:, None])[:, 0]
        diffs.extend((mine - torch.tensor(row["logprobs"])).abs().tolist())
    return diffs


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_generates_with_lora_and_matches_transformers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    lora_config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # random, nonzero B: the adapter changes outputs
    )
    torch.manual_seed(0)
    adapter = peft.get_peft_model(model, lora_config)
    assert all(p.abs().sum() > 0 for n, p in adapter.named_parameters() if "lora_B" in n)
    adapter.save_pretrained(tmp_path / "adapter")
    base_model, _ = load_model(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    model, _ = load_model(tiny_model_dir)

    prompts = [p.text for name in list_tasks() for p in get_task(name).sample(random.Random(9), 8)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "vllm.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            str(tiny_model_dir),
            str(tmp_path / "adapter"),
            str(out),
            str(tmp_path / "prompts.json"),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    print(f"vllm engine start {result['engine_start_s']:.1f}s")

    base, lora = result["base"], result["lora"]
    assert [r["prompt"] for r in base] == prompts
    # Greedy decoding agrees with transformers token for token (vLLM drops the stop
    # newline from the text; transformers keeps it).
    hf = greedy_generate(model, tokenizer, prompts)
    assert [r["text"] for r in base] == [c.removesuffix("\n") for c in hf]
    # The adapter is applied: most completions change.
    changed = sum(a["text"] != b["text"] for a, b in zip(base, lora, strict=True))
    assert changed >= len(prompts) // 2, changed

    base_diffs = _logprobs_of(model, base)
    lora_diffs = _logprobs_of(peft_model, lora)
    base_mean = sum(base_diffs) / len(base_diffs)
    lora_mean = sum(lora_diffs) / len(lora_diffs)
    print(f"logprob |vllm - hf| mean {base_mean:.2e} max {max(base_diffs):.2e}")
    print(f"logprob |vllm - peft| mean {lora_mean:.2e} max {max(lora_diffs):.2e}")
    assert base_mean < TOLERANCE
    assert lora_mean < TOLERANCE
    assert max(base_diffs + lora_diffs) < 1e-3
