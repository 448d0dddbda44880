"""Named fakes and helpers for tests of the rollout service and its callers.

:class:`FakeEngine` implements the :class:`~lorafleet.rollout.engine.Engine`
Protocol without a model: "generated" tokens are a deterministic function of the
prompt, the adapter version and the position, so a test can tell which adapter
version served a request, and it records every adapter load and removal. It
is for tests of the adapter manager, the service and the servicer (and of
callers such as the scheduler); engine behaviour itself is tested on vLLM.

:func:`write_peft_adapter` makes a real PEFT adapter for a real model (needs
torch + peft), with random non-zero ``lora_B`` so it changes the model's output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from lorafleet.core.errors import FailedPrecondition
from lorafleet.rollout.types import (
    CONFIG_FILE,
    EngineAdapter,
    EngineStatus,
    FinishReason,
    GenerationRequest,
    PromptSamples,
    Sample,
    SampleDelta,
    ScoreSequence,
)

FAKE_VOCAB = 100


def _salt(adapter: EngineAdapter | None) -> int:
    if adapter is None:
        return 0
    return int.from_bytes(hashlib.sha256(adapter.name.encode()).digest()[:4], "big")


class FakeEngine:
    """A deterministic stand-in for a real engine (see the module docstring)."""

    kind = "fake"

    def __init__(
        self,
        *,
        max_loras: int = 2,
        max_cpu_loras: int = 3,
        max_lora_rank: int = 16,
        max_model_len: int = 64,
        step_delay_s: float = 0.0,
    ) -> None:
        self._max_loras = max_loras
        self._max_cpu_loras = max_cpu_loras
        self._max_lora_rank = max_lora_rank
        self._max_model_len = max_model_len
        self.step_delay_s = step_delay_s
        """Sleep per generated token (to keep requests in flight in tests)."""
        self._epoch = 0
        self.loaded: dict[int, EngineAdapter] = {}
        self.added: list[str] = []
        self.removed: list[str] = []
        self.served_unloaded: list[str] = []
        """Adapters a request named that were not loaded (a real engine would
        have loaded them inside its step, where a bad one kills it)."""
        self.closed = False

    # Engine protocol: properties
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_lora_rank(self) -> int:
        return self._max_lora_rank

    @property
    def max_loras(self) -> int:
        return self._max_loras

    @property
    def max_cpu_loras(self) -> int:
        return self._max_cpu_loras

    @property
    def vocab_size(self) -> int:
        return FAKE_VOCAB

    @property
    def epoch(self) -> int:
        return self._epoch

    async def start(self) -> None:
        if self._epoch == 0:
            self._epoch = 1

    def restart(self) -> None:
        """What a crash + restart looks like from outside: a new epoch, nothing loaded."""
        self._epoch += 1
        self.loaded.clear()

    def tokenize(self, text: str) -> list[int]:
        return [1, *(4 + (ord(c) % (FAKE_VOCAB - 4)) for c in text)]

    def expected_token(self, prompt: Sequence[int], position: int, adapter_name: str = "") -> int:
        """The token the fake produces at ``position`` (greedy) for this adapter name."""
        salt = (
            0
            if not adapter_name
            else int.from_bytes(hashlib.sha256(adapter_name.encode()).digest()[:4], "big")
        )
        return (sum(prompt) + salt + 7 * position) % (FAKE_VOCAB - 4) + 4

    def _tokens(self, request: GenerationRequest, sample: int) -> list[int]:
        name = request.adapter.name if request.adapter else ""
        shift = 0 if request.sampling.greedy else (request.sampling.seed or 0) + 13 * sample
        return [
            self.expected_token(request.prompt_token_ids, j + shift, name)
            for j in range(request.sampling.max_tokens)
        ]

    def _check_loaded(self, adapter: EngineAdapter | None) -> None:
        if adapter is not None and adapter.engine_id not in self.loaded:
            self.served_unloaded.append(adapter.name)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[PromptSamples]:
        out = []
        for request in requests:
            self._check_loaded(request.adapter)
            samples = []
            for i in range(request.n):
                tokens = self._tokens(request, i)
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s * len(tokens))
                samples.append(
                    Sample(
                        token_ids_T=tuple(tokens),
                        text="".join(chr(32 + t % 90) for t in tokens),
                        logprobs_T=tuple(-(t % 5 + 1) / 10 for t in tokens)
                        if request.sampling.logprobs
                        else (),
                        finish_reason=FinishReason.LENGTH,
                    )
                )
            out.append(PromptSamples(tuple(request.prompt_token_ids), tuple(samples)))
        await asyncio.sleep(0)
        return out

    async def generate_stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[SampleDelta]:
        results = await self.generate(requests)
        for p, result in enumerate(results):
            for s, sample in enumerate(result.samples_N):
                last = len(sample.token_ids_T) - 1
                for j, token in enumerate(sample.token_ids_T):
                    yield SampleDelta(
                        prompt_index=p,
                        sample_index=s,
                        token_ids=(token,),
                        text=sample.text[j],
                        logprobs=(sample.logprobs_T[j],) if sample.logprobs_T else (),
                        finish_reason=sample.finish_reason if j == last else None,
                    )

    async def compute_logprobs(
        self, sequences: Sequence[ScoreSequence], adapter: EngineAdapter | None
    ) -> list[list[float]]:
        self._check_loaded(adapter)
        salt = _salt(adapter) % 7
        return [
            [-((t + salt) % 5 + 1) / 10 for t in s.token_ids[s.prompt_length :]] for s in sequences
        ]

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        if adapter.rank > self._max_lora_rank:
            raise FailedPrecondition(
                f"rank {adapter.rank} > {self._max_lora_rank}", reason="RANK_ABOVE_ENGINE_MAX"
            )
        if not (Path(adapter.path) / CONFIG_FILE).is_file():
            raise FailedPrecondition(f"no adapter at {adapter.path}", reason="ADAPTER_LOAD_FAILED")
        self.loaded[adapter.engine_id] = adapter
        self.added.append(adapter.name)

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        if self.loaded.pop(adapter.engine_id, None) is not None:
            self.removed.append(adapter.name)

    def status(self) -> EngineStatus:
        return EngineStatus(
            engine=self.kind,
            base_model="fake",
            max_loras=self._max_loras,
            max_cpu_loras=self._max_cpu_loras,
            max_lora_rank=self._max_lora_rank,
            max_model_len=self._max_model_len,
            running_requests=0,
            healthy=True,
            epoch=self._epoch,
            started_at=time.time(),
        )

    async def close(self) -> None:
        self.closed = True


def write_fake_adapter(directory: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A PEFT-shaped directory (config + a small safetensors) without torch; for
    tests that never run a real model."""
    import numpy as np
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal(
                (rank, 8)
            ).astype(np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal(
                (8, rank)
            ).astype(np.float32),
        },
        str(directory / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return directory


def write_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    seed: int = 0,
    b_std: float = 0.2,
    target_modules: Sequence[str] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
) -> Path:
    """A real PEFT adapter of the model in ``model_dir``: PEFT's default init for
    ``lora_A`` and a random normal ``lora_B`` (PEFT's default zero B would leave
    the output unchanged). ``alpha`` defaults to ``2 * rank``. Deterministic in
    ``seed``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=rank,
            lora_alpha=2.0 * rank if alpha is None else alpha,
            target_modules=list(target_modules),
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()
    return out_dir
