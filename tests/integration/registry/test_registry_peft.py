"""A READY version, downloaded by a plain client, loads unchanged in peft."""

from __future__ import annotations

import pytest
from registry_harness import make_settings, start_registry

peft = pytest.importorskip("peft", reason="peft is not installed (pip install lorafleet[train])")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_peft_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )
    # lora_B starts at zero, which would make "loads unchanged" trivially true.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


def load_base(tmp_path):
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()


async def test_downloaded_versions_load_in_peft(tmp_path):
    torch.set_num_threads(1)
    running = await start_registry(make_settings(tmp_path))
    try:
        client = running.client
        model = tiny_peft_model(tmp_path)
        await client.create_adapter(
            "peft-1",
            lora={"rank": 4, "alpha": 8.0, "target_modules": TARGETS},
            base_model=str(tmp_path / "base"),
        )
        # v1 by reference from the node cache (the trainer's way), v2 by upload.
        node_dir = running.settings.file_roots["node-a"] / "peft-1" / "v1"
        model.save_pretrained(node_dir)
        await client.publish_version("peft-1", node_dir, expected_parent_version=0)
        model.save_pretrained(tmp_path / "elsewhere")
        await client.upload_version("peft-1", tmp_path / "elsewhere", expected_parent_version=1)

        tokens = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            expected = model(tokens).logits
            plain = load_base(tmp_path)(tokens).logits
        assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter matters

        for version in (1, 2):
            out = await client.download_version("peft-1", version, tmp_path / f"dl-{version}")
            loaded = peft.PeftModel.from_pretrained(load_base(tmp_path), out).eval()
            with torch.no_grad():
                got = loaded(tokens).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    finally:
        await running.stop()
