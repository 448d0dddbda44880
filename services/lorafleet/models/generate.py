"""Greedy generation with a transformers model, without padding.

Prompts are grouped by token length and each group decodes as one batch, so no
prompt ever sees a pad token: the results equal one-at-a-time decoding (and what a
paged engine such as vLLM computes), which keeps recorded accuracies reproducible.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (special tokens dropped, stop newline kept)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    gen_cfg = model.generation_config
    out: list[str] = [""] * len(prompts)
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=gen_cfg.eos_token_id,
                pad_token_id=gen_cfg.pad_token_id,
            )
            for row, i in zip(sequences[:, length:].tolist(), chunk, strict=True):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out
