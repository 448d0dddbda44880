"""Shared prompt rows (lorafleet.rollout.vllm_shared_prompts): which rows of a
model step fold together, and that a LoRA linear over the folded rows gives
every row what the full computation gives (the real engine, sharing on against
off: tests/integration/rollout/test_rollout_vllm_shared_prompts.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


def _step(requests):
    """Rows, query_start_loc, seq_lens and per-token LoRA slots of a step made of
    (rows [n, hidden], seq_len, slot) requests."""
    rows = torch.cat([r for r, _, _ in requests])
    lengths = torch.tensor([r.shape[0] for r, _, _ in requests])
    starts = torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s, _ in requests], dtype=torch.int32)
    slots = torch.cat([torch.full((r.shape[0],), slot) for r, _, slot in requests])
    return rows, starts, seq_lens, slots


def test_identical_fresh_prompts_of_one_adapter_fold_onto_the_first():
    from lorafleet.rollout.vllm_shared_prompts import find_shared_rows

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(3, 8, generator=gen)
    x, starts, seq_lens, slots = _step([
        (prompt, 3, 0),                       # rows 0-2: the first of its kind
        (torch.randn(1, 8, generator=gen), 9, 0),  # row 3: a decode step
        (prompt.clone(), 3, 0),               # rows 4-6: folds onto rows 0-2
        (prompt.clone(), 3, 1),               # rows 7-9: another adapter, kept
        (prompt.clone(), 5, 0),               # rows 10-12: prefix cached, kept
        (prompt.clone(), 3, 0),               # rows 13-15: folds onto rows 0-2
    ])
    rows = find_shared_rows(x, starts, seq_lens, slots)
    assert rows is not None and rows.tokens == 16
    assert rows.unique.tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 11, 12]
    folded = rows.unique[rows.inverse]
    assert folded.tolist() == [0, 1, 2, 3, 0, 1, 2, 7, 8, 9, 10, 11, 12, 0, 1, 2]
    assert torch.equal(x.index_select(0, rows.unique)[rows.inverse], x)


def test_prompts_that_differ_in_one_row_do_not_fold():
    from lorafleet.rollout.vllm_shared_prompts import find_shared_rows

    prompt = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    other = prompt.clone()
    other[3, 5] += 1.0
    assert find_shared_rows(*_step([(prompt, 4, 0), (other, 4, 0)])) is None


@pytest.mark.parametrize(
    "requests",
    [
        [(torch.ones(2, 8), 2, 0)],                           # one fresh prompt
        [(torch.ones(1, 8), 5, 0), (torch.ones(1, 8), 7, 0)],  # decode steps only
        [(torch.ones(2, 8), 2, 0), (torch.ones(3, 8), 3, 0)],  # different lengths
    ],
)
def test_a_step_with_nothing_to_fold_gives_none(requests):
    from lorafleet.rollout.vllm_shared_prompts import find_shared_rows

    assert find_shared_rows(*_step(requests)) is None


def test_rows_must_match_the_metadata():
    from lorafleet.rollout.vllm_shared_prompts import find_shared_rows

    x, starts, seq_lens, slots = _step([(torch.ones(2, 8), 2, 0), (torch.ones(2, 8), 2, 0)])
    assert find_shared_rows(x, starts, seq_lens, slots) is not None
    assert find_shared_rows(torch.cat([x, x[:1]]), starts, seq_lens, slots) is None


def test_a_lora_linear_over_folded_rows_equals_the_full_one():
    from lorafleet.rollout.vllm_patches import SlotGroups
    from lorafleet.rollout.vllm_shared_prompts import find_shared_rows

    gen = torch.Generator().manual_seed(2)
    slots, rank, hidden, outs = 3, 8, 32, (32, 16, 16)
    lora_a = tuple(torch.randn(slots, 1, rank, hidden, generator=gen) for _ in outs)
    lora_b = tuple(torch.randn(slots, 1, o, rank, generator=gen) for o in outs)
    weight = torch.randn(sum(outs), hidden, generator=gen)
    prompts = [torch.randn(5, hidden, generator=gen) for _ in range(2)]
    requests = []
    for i in range(16):  # 2 prompts x 2 adapters, 4 samples each
        requests.append((prompts[i % 2].clone(), 5, (i // 2) % 2 + 1))
    requests.append((torch.randn(1, hidden, generator=gen), 11, 0))  # a decode row
    x, starts, seq_lens, token_slots = _step(requests)
    rows = find_shared_rows(x, starts, seq_lens, token_slots)
    assert rows is not None and rows.unique.numel() == 4 * 5 + 1

    full = x @ weight.T
    SlotGroups(token_slots, slots).apply(full, x, lora_a, lora_b, 0.5, outs)
    x_unique = x.index_select(0, rows.unique)
    folded = x_unique @ weight.T
    rows.slot_groups(token_slots, slots).apply(folded, x_unique, lora_a, lora_b, 0.5, outs)
    # The base matmul gives the same bits; torch's grouped LoRA matmul may round
    # a row differently when fewer rows share its slot (seen: 4e-6 here).
    torch.testing.assert_close(folded.index_select(0, rows.inverse), full, rtol=1e-5, atol=1e-5)
