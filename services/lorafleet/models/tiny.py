"""The tiny model: a small Llama, built and briefly pre-trained here, deterministically.

No machine of this project reaches a model hub, so the project makes its own
HF-format causal LM: :func:`build_tiny_model` initialises a ``LlamaForCausalLM``
from a seed, trains it with supervised next-token loss on a weighted mix of the
built-in tasks for a fixed number of steps, measures its greedy exact-match accuracy
per task, and saves it with ``save_pretrained`` (``config.json``,
``generation_config.json``, ``model.safetensors``) next to the character tokenizer.
The result loads through the same ``from_pretrained(path)`` code as any hub model.

The recipe is tuned so the base model answers greedily with a planted classic
mistake on most prompts while its samples often hold the right answer (see
:mod:`lorafleet.models.mistakes`): weak greedy accuracy, a non-zero sampled
policy, and room for RL to improve by a wide margin in tens of steps. It
trains and evaluates on each task's default parameters, so changing a task default
(or anything here) changes the model: bump ``cache.TINY_MODEL_NAME`` with it.

Determinism: the same seed on the same software stack gives byte-identical files.
Everything random comes from seeded generators, the build runs with
``torch.use_deterministic_algorithms(True)`` and a fixed thread count, in fp32, and
nothing written depends on time or paths (build time is only in the returned
report).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet.envs import STOP, Task, evaluate_accuracy, get_task
from lorafleet.models.cache import BUILD_INFO_FILE
from lorafleet.models.generate import greedy_generate
from lorafleet.models.mistakes import planted_answer
from lorafleet.models.tokenizer import BOS, EOS, PAD, build_vocab, save_tokenizer

BUILD_FORMAT = 1


@dataclass(frozen=True)
class TinyArch:
    """Architecture of the tiny Llama (about 0.66M parameters)."""

    hidden_size: int = 128
    # Head dim 32: the smallest head size vLLM's CPU attention supports.
    num_attention_heads: int = 4
    num_hidden_layers: int = 3
    intermediate_size: int = 384
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class TrainRecipe:
    """Pre-training recipe; a fixed step count (not a stopping rule) keeps builds exact."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    task_weights: Mapping[str, float] = field(
        # Tuned with the planted mistakes so GRPO lifts greedy accuracy by 0.3-0.7 on
        # count, copy, reverse and sort within 30 steps (counting is learnt slowly,
        # hence its larger share; addition stays weak).
        default_factory=lambda: {"add": 1.0, "copy": 1.2, "count": 1.5, "reverse": 1.0, "sort": 1.2}
    )
    """Relative share of each task in the training mix (tunes per-task difficulty)."""
    mistake_rate: float = 0.6
    """Share of pre-training examples whose target is the task's planted classic
    mistake instead of the right answer (see :mod:`lorafleet.models.mistakes`)."""
    num_threads: int = 1
    """torch threads during the build (the bytes depend on it). One thread: on a
    2-core machine shared with other work, two OpenMP threads ran 6x slower than
    one (spinning barriers), while alone they were only 2x faster."""


@dataclass(frozen=True)
class EvalSpec:
    n: int = 200
    seed: int = 1234
    max_new_tokens: int = 16


@dataclass(frozen=True)
class BuildReport:
    path: Path
    seed: int
    num_parameters: int
    accuracy: dict[str, float]
    """Greedy exact-match accuracy of the base model per task."""
    mean_reward: dict[str, float]
    """Mean partial-credit score of the base model per task."""
    build_seconds: float
    file_sha256: dict[str, str]


def tiny_config(arch: TinyArch = TinyArch()):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    vocab = build_vocab()
    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        dtype="float32",
    )


@contextlib.contextmanager
def _deterministic_torch(num_threads: int) -> Iterator[None]:
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_dtype = torch.get_default_dtype()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    try:
        # fork_rng: seeding inside leaves the caller's global torch RNG untouched.
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        torch.set_default_dtype(prev_dtype)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _lr_at(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _training_batch(
    rng: random.Random,
    tasks: dict[str, Task],
    weights: list[float],
    batch_size: int,
    mistake_rate: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = build_vocab()
    names = list(tasks)
    rows: list[tuple[list[int], list[int]]] = []
    for name in rng.choices(names, weights=weights, k=batch_size):
        prompt = tasks[name].sample(rng, 1)[0]
        answer = planted_answer(prompt) if rng.random() < mistake_rate else prompt.answer
        # Same ids as the saved tokenizer: <s>, one id per character.
        prompt_ids = [vocab[BOS], *(vocab[c] for c in prompt.text)]
        target_ids = [*(vocab[c] for c in answer + STOP), vocab[EOS]]
        rows.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, width), vocab[PAD], dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    arch: TinyArch = TinyArch(),
    recipe: TrainRecipe = TrainRecipe(),
    eval_spec: EvalSpec = EvalSpec(),
    log: Any = None,
) -> BuildReport:
    """Build, pre-train, evaluate and save the tiny model into ``out_dir``.

    ``log`` is an optional callable taking a string (progress lines).
    """
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out_dir)
    vocab = build_vocab()
    tasks = {name: get_task(name) for name in sorted(recipe.task_weights)}
    weights = [recipe.task_weights[name] for name in tasks]

    with _deterministic_torch(recipe.num_threads):
        torch.manual_seed(seed)
        rng = random.Random(seed)
        config = tiny_config(arch)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=vocab[BOS],
            # Stop at the end of the answer line as well as at </s>.
            eos_token_id=[vocab[EOS], vocab[STOP]],
            pad_token_id=vocab[PAD],
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay
        )
        model.train()
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            input_ids, labels = _training_batch(
                rng, tasks, weights, recipe.batch_size, recipe.mistake_rate
            )
            loss = model(input_ids=input_ids, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if log is not None and (step + 1) % 100 == 0:
                log(f"step {step + 1}/{recipe.steps} loss {loss.item():.4f}")
        model.eval()

        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        accuracy: dict[str, float] = {}
        mean_reward: dict[str, float] = {}
        for name, task in tasks.items():
            result = evaluate_accuracy(
                lambda prompts: greedy_generate(
                    model, tokenizer, prompts, max_new_tokens=eval_spec.max_new_tokens
                ),
                task,
                eval_spec.n,
                eval_spec.seed,
            )
            accuracy[name] = result.accuracy
            mean_reward[name] = round(result.mean_reward, 6)
            if log is not None:
                log(f"eval {name}: accuracy {result.accuracy:.3f} reward {result.mean_reward:.3f}")
        with _quiet_progress_bars():
            model.save_pretrained(out_dir)

    num_parameters = sum(p.numel() for p in model.parameters())
    info = {
        "format": BUILD_FORMAT,
        "seed": seed,
        "num_parameters": num_parameters,
        "arch": arch.__dict__,
        "recipe": {**recipe.__dict__, "task_weights": dict(recipe.task_weights)},
        "eval": eval_spec.__dict__,
        "task_params": {name: task.params.to_dict() for name, task in tasks.items()},
        "base_accuracy": accuracy,
        "base_mean_reward": mean_reward,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / BUILD_INFO_FILE).write_text(
        json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    for path in out_dir.iterdir():
        # save_pretrained may leave the weights owner-only; the cache is shared.
        path.chmod(0o644)
    return BuildReport(
        path=out_dir,
        seed=seed,
        num_parameters=num_parameters,
        accuracy=accuracy,
        mean_reward=mean_reward,
        build_seconds=time.perf_counter() - started,
        file_sha256=hash_files(out_dir),
    )


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def read_build_info(model_dir: Path) -> dict[str, Any]:
    """The ``lorafleet_build.json`` of a built tiny model."""
    return json.loads((Path(model_dir) / BUILD_INFO_FILE).read_text(encoding="utf-8"))
