"""The tiny model: deterministic build, loads in transformers and peft, base accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.envs import evaluate_accuracy, get_task
from lorafleet.models.tiny import (
    BUILD_INFO_FILE,
    EvalSpec,
    TrainRecipe,
    build_tiny_model,
    hash_files,
    read_build_info,
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lorafleet.models.cache import load_model  # noqa: E402
from lorafleet.models.generate import greedy_generate  # noqa: E402

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    BUILD_INFO_FILE,
}


@pytest.mark.slow
def test_build_is_byte_identical(tmp_path: Path) -> None:
    # The full recipe's code path (init, data, training, eval, save) with fewer
    # steps: exactness does not depend on the step count, and the suite stays fast.
    recipe = TrainRecipe(steps=30)
    spec = EvalSpec(n=40)
    a = build_tiny_model(tmp_path / "a", seed=3, recipe=recipe, eval_spec=spec)
    b = build_tiny_model(tmp_path / "b", seed=3, recipe=recipe, eval_spec=spec)
    assert set(a.file_sha256) == EXPECTED_FILES
    assert hash_files(tmp_path / "a") == hash_files(tmp_path / "b") == a.file_sha256
    assert a.accuracy == b.accuracy and a.num_parameters == b.num_parameters
    c = build_tiny_model(tmp_path / "c", seed=4, recipe=recipe, eval_spec=spec)
    assert c.file_sha256["model.safetensors"] != a.file_sha256["model.safetensors"]
    assert "time" not in (tmp_path / "a" / BUILD_INFO_FILE).read_text()


def test_files_config_and_recorded_accuracy(tiny_model_dir: Path) -> None:
    assert {p.name for p in tiny_model_dir.iterdir()} >= EXPECTED_FILES
    info = read_build_info(tiny_model_dir)
    tasks = {"add", "copy", "count", "reverse", "sort"}
    assert set(info["base_accuracy"]) == tasks
    for name, acc in info["base_accuracy"].items():
        # A weak greedy policy (the planted mistakes win), leaving RL room to climb ...
        assert acc < 0.35, (name, acc)
        # ... but not a hopeless one: every task earns partial credit.
        assert info["base_mean_reward"][name] > 0.02, (name, info["base_mean_reward"])
    assert 300_000 < info["num_parameters"] < 2_000_000
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"


def test_loads_in_transformers_and_reproduces_accuracy(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    info = read_build_info(tiny_model_dir)
    spec = info["eval"]
    # Loading from disk and re-evaluating gives the recorded numbers exactly (with
    # the build's thread count: a different one may reorder float sums).
    threads = torch.get_num_threads()
    torch.set_num_threads(info["recipe"]["num_threads"])
    try:
        results = {
            name: evaluate_accuracy(
                lambda ps: greedy_generate(
                    model, tokenizer, ps, max_new_tokens=spec["max_new_tokens"]
                ),
                get_task(name),
                spec["n"],
                spec["seed"],
            )
            for name in ("count", "reverse")
        }
    finally:
        torch.set_num_threads(threads)
    for name, result in results.items():
        assert result.accuracy == info["base_accuracy"][name]
        assert round(result.mean_reward, 6) == info["base_mean_reward"][name]
    completions = greedy_generate(model, tokenizer, ["copy: hello=", "sort: cba="])
    assert all(c.endswith("\n") and 0 < len(c) <= 17 for c in completions), completions


def test_peft_lora_forward_train_save_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    batch = tokenizer(["reverse: abc=cba\n", "count a: aab=2\n"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        base_logits = model(**batch).logits
    config = peft.LoraConfig(
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
    )
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, config)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: the adapter is a no-op
        assert torch.equal(pm(**batch).logits, base_logits)

    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = pm(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pm.eval()
    with torch.no_grad():
        tuned = pm(**batch).logits
    assert (tuned - base_logits).abs().max() > 1e-4

    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh, _ = load_model(tiny_model_dir)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned, atol=1e-6)
