"""The CPU LoRA op fix installed into vLLM's workers (lorafleet.rollout.vllm_patches),
checked op by op against vLLM's own ops (the end-to-end effect is covered by the
mixed-batch and logprob tests on the real engine)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def ops():
    from vllm.lora.ops.torch_ops import lora_ops

    original = {n: getattr(lora_ops, n) for n in ("bgmv_shrink", "bgmv_expand")}
    from lorafleet.rollout import vllm_patches

    return original, vllm_patches


def test_rows_without_lora_get_no_delta_and_others_are_unchanged(ops):
    original, fixed = ops
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 4, 6, generator=gen)  # [slots, 1, rank, in]
    b = torch.randn(3, 1, 5, 4, generator=gen)  # [slots, 1, out, rank]
    x = torch.randn(4, 6, generator=gen)
    idx = torch.tensor([0, -1, 2, 1])

    shrunk = torch.zeros(4, 4)
    fixed.bgmv_shrink(x, a, shrunk, idx, 0.5)
    out = torch.ones(4, 5)
    fixed.bgmv_expand(shrunk, b, out, idx, add_inputs=True)
    assert torch.equal(out[1], torch.ones(5))  # the base row: untouched

    valid = torch.tensor([0, 2, 3])
    ref_shrunk = torch.zeros(3, 4)
    original["bgmv_shrink"](x[valid], a, ref_shrunk, idx[valid], 0.5)
    ref_out = torch.ones(3, 5)
    original["bgmv_expand"](ref_shrunk, b, ref_out, idx[valid], add_inputs=True)
    # Grouped per slot instead of gathered per row: equal up to float rounding.
    assert torch.allclose(out[valid], ref_out, rtol=1e-6, atol=1e-6)


def test_adapters_targeting_lm_head_are_recognised(tmp_path):
    import json

    from lorafleet.rollout.vllm_engine import UNSUPPORTED_TARGETS, _target_modules

    for targets, bad in [
        (["q_proj", "v_proj"], set()),
        (["q_proj", "lm_head"], {"lm_head"}),
        (".*(embed_tokens|q_proj)", {"embed_tokens"}),
    ]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
        assert set(_target_modules(str(tmp_path))) & UNSUPPORTED_TARGETS == bad


def test_a_batch_without_any_adapter_adds_nothing(ops):
    _, fixed = ops
    a = torch.randn(2, 1, 4, 6)
    b = torch.randn(2, 1, 5, 4)
    idx = torch.tensor([-1, -1])
    shrunk = torch.full((2, 4), 7.0)
    fixed.bgmv_shrink(torch.randn(2, 6), a, shrunk, idx, 1.0)
    assert torch.equal(shrunk, torch.zeros(2, 4))
    out = torch.ones(2, 5)
    fixed.bgmv_expand(torch.randn(2, 4), b, out, idx, add_inputs=True)
    assert torch.equal(out, torch.ones(2, 5))


def test_one_adapter_batches_match_vllms_arithmetic(ops):
    original, fixed = ops
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 1, 4, 6, generator=gen)
    b = torch.randn(3, 1, 5, 4, generator=gen)
    x = torch.randn(7, 6, generator=gen)
    idx = torch.full((7,), 2)
    results = []
    for impl in (fixed.__dict__, original):
        shrunk = torch.zeros(7, 4)
        impl["bgmv_shrink"](x, a, shrunk, idx, 0.5)
        out = torch.ones(7, 5)
        impl["bgmv_expand"](shrunk, b, out, idx, add_inputs=True)
        results.append(out)
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0], torch.ones(7, 5))


def _per_row_lora(y, x, lora_a, lora_b, slots_of_rows, scale, output_slices):
    """The definition of a LoRA linear's delta, one row at a time."""
    out = y.clone()
    for row, slot in enumerate(slots_of_rows):
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(lora_a, lora_b, output_slices, strict=True):
            out[row, offset : offset + size] += scale * (x[row] @ a[slot, 0].T) @ b[slot, 0].T
            offset += size
    return out


@pytest.mark.parametrize(
    ("lora_ids", "rank", "hidden", "output_slices"),
    [
        # three adapters and base-model rows, interleaved
        ((1, 2, 1, 0, 3, 3, 2, 1), 4, 8, (8, 4, 4)),
        ((2, 2, 2, 2), 4, 8, (8, 4, 4)),  # one experiment alone
        ((0, 0, 0), 4, 8, (8,)),  # base model only
        # sizes the grouped matmul cannot take: vLLM's own (fixed) ops do it
        ((1, 2, 1, 0, 3, 3, 2, 1), 3, 6, (5, 2, 2)),
    ],
)
def test_grouped_lora_linear_matches_the_per_row_definition(
    ops, lora_ids, rank, hidden, output_slices
):
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _, fixed = ops
    assert PunicaWrapperCPU.add_lora_linear._lorafleet_fix
    gen = torch.Generator().manual_seed(2)
    slots = 4
    lora_a = tuple(torch.randn(slots, 1, rank, hidden, generator=gen) for _ in output_slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank, generator=gen) for size in output_slices)
    x = torch.randn(len(lora_ids), hidden, generator=gen)
    y = torch.randn(len(lora_ids), sum(output_slices), generator=gen)

    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    slot_ids = [1, 2, 3, None]  # slot s holds LoRA id slot_ids[s]; id 0 is the base model
    wrapper.update_metadata(LoRAMapping(lora_ids, lora_ids), slot_ids, slots, 100)
    expected = _per_row_lora(
        y, x, lora_a, lora_b, [slot_ids.index(i) if i else -1 for i in lora_ids], 0.5,
        output_slices,
    )
    out = y.clone()
    wrapper.add_lora_linear(out, x, lora_a, lora_b, 0.5, output_slices)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    if all(i == 0 for i in lora_ids):
        assert torch.equal(out, y)


def test_grouped_lora_linear_follows_each_new_mapping(ops):
    """The grouping is computed once per forward: the next step's mapping (vLLM's
    update_metadata) must replace it, or rows would get another adapter's delta."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    gen = torch.Generator().manual_seed(3)
    lora_a = (torch.randn(2, 1, 4, 8, generator=gen),)
    lora_b = (torch.randn(2, 1, 4, 4, generator=gen),)
    x = torch.randn(4, 8, generator=gen)
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    outputs = []
    for lora_ids in [(1, 1, 2, 2), (2, 2, 1, 1)]:
        wrapper.update_metadata(LoRAMapping(lora_ids, lora_ids), [1, 2], 2, 100)
        out = torch.zeros(4, 4)
        wrapper.add_lora_linear(out, x, lora_a, lora_b, 1.0, (4,))
        outputs.append(out)
        slots = [i - 1 for i in lora_ids]
        assert torch.allclose(out, _per_row_lora(torch.zeros(4, 4), x, lora_a, lora_b, slots,
                                                 1.0, (4,)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize("lora_ids", [(1, 2, 1, 2), (2, 2, 2, 2)])
def test_grouped_lora_linear_adds_into_a_bfloat16_output(ops, lora_ids):
    """The delta is computed in float32 and added in the output's dtype, in both
    the mixed-batch and the one-adapter path."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    gen = torch.Generator().manual_seed(4)
    output_slices = (8, 4, 4)
    lora_a = tuple(torch.randn(2, 1, 4, 8, generator=gen) for _ in output_slices)
    lora_b = tuple(torch.randn(2, 1, size, 4, generator=gen) for size in output_slices)
    x = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
    y = torch.randn(4, sum(output_slices), generator=gen)
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper.update_metadata(LoRAMapping(lora_ids, lora_ids), [1, 2], 2, 100)
    out = y.to(torch.bfloat16)
    wrapper.add_lora_linear(out, x, lora_a, lora_b, 0.5, output_slices)
    x = x.float()
    expected = _per_row_lora(y, x, lora_a, lora_b, [i - 1 for i in lora_ids], 0.5, output_slices)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=5e-2)
    assert not torch.allclose(out.float(), y, rtol=2e-2, atol=5e-2)
