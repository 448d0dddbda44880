"""The character tokenizer: exact round trips through transformers, as vLLM uses it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorafleet.envs import get_task, list_tasks
from lorafleet.models.tokenizer import BOS, CHARS, EOS, PAD, UNK, build_vocab, save_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_files_and_specials(tokenizer, tmp_path: Path) -> None:
    save_tokenizer(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    vocab = build_vocab()
    assert [vocab[t] for t in (PAD, BOS, EOS, UNK)] == [0, 1, 2, 3]
    assert list(CHARS) == sorted(CHARS) and "\n" in CHARS and " " in CHARS
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2 and tokenizer.unk_token_id == 3
    assert len(tokenizer) == len(vocab) == 4 + len(CHARS)


@pytest.mark.parametrize("name", list_tasks())
def test_round_trip_every_task(tokenizer, name: str) -> None:
    vocab = build_vocab()
    for p in get_task(name).sample(random.Random(0), 100):
        text = p.text + p.target
        ids = tokenizer(text)["input_ids"]
        # <s> then exactly one id per character: what the pre-training used.
        assert ids == [vocab[BOS], *(vocab[c] for c in text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids[1:]) == text
        assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids[1:])) == text


def test_spaces_punctuation_and_unknowns(tokenizer) -> None:
    text = "a b  c, d . ?\n  x\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_incremental_decoding_matches(tokenizer) -> None:
    # vLLM detokenizes streams with tokenizers' DecodeStream.
    from tokenizers.decoders import DecodeStream

    text = "reverse: ab c=c ba\n"
    ids = tokenizer(text)["input_ids"]
    stream = DecodeStream(skip_special_tokens=True)
    pieces = [stream.step(tokenizer.backend_tokenizer, i) for i in ids]
    assert "".join(p for p in pieces if p) == text
