"""Character-level tokenizer of the tiny model.

One token per character over a fixed, sorted vocabulary (printable ASCII plus
newline) and four special tokens. Built with the ``tokenizers`` library and saved
as ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` so
``transformers.AutoTokenizer`` (``PreTrainedTokenizerFast``) and vLLM load it like
any hub tokenizer.

* Encoding splits the text into single characters (newline included) and adds
  ``<s>`` in front (the post-processor, so every engine tokenizes prompts alike).
* Decoding fuses tokens without separators (``decoders.Fuse``), so
  ``decode(encode(s))`` is exactly ``s`` for any text over the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
"""Special tokens, with ids 0..3 in this order."""

CHARS: tuple[str, ...] = tuple(sorted(["\n", *(chr(c) for c in range(32, 127))]))
"""Every character the tokenizer knows: newline and printable ASCII, sorted."""

MODEL_MAX_LENGTH = 128


def build_vocab() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    return vocab


def build_tokenizer():  # -> tokenizers.Tokenizer (imported lazily: optional dependency)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = build_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] matches any character, newline included: every character is one piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(out_dir: Path) -> None:
    """Write the three tokenizer files into ``out_dir`` (deterministic bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"), pretty=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": MODEL_MAX_LENGTH,
        # Characters are tokens: no whitespace clean-up, or " ," would become ",".
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
