"""Train the project's tiny byte-level BPE (vocab 8,192 including 3 special tokens) on a balanced corpus sample.

Qwen2-like pipeline: NFC normaliser, Split on the Qwen2 regex (digits one by one, letters runs, punctuation) then
ByteLevel, ByteLevel decoder. Special tokens first: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2.
Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..model.tokenizer import CHATML_TEMPLATE, DEFAULT_TOKENIZER_DIR
from ..prompt_sets import DOMAINS

__all__ = [
    "QWEN2_PRETOKENIZE_REGEX",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "build_untrained_tokenizer",
    "sample_corpus",
    "save_tokenizer",
    "train_tokenizer",
]

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PRETOKENIZE_REGEX = (  # as in Qwen2's tokenizer.json and transformers' tokenization_qwen2.py
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_untrained_tokenizer() -> Tokenizer:
    """An empty BPE with the Qwen2-style normaliser, pre-tokeniser, decoder and post-processor."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def sample_corpus(corpus_dir: str | Path, chars_per_domain: int = 3_000_000) -> Iterator[str]:
    """The first documents of each domain file (already shuffled by prepare) up to ``chars_per_domain``
    characters, interleaved across domains so that every domain gets the same weight."""
    per_domain = []
    for d in DOMAINS:
        path = Path(corpus_dir) / f"{d}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run `smallthinker-lab data prepare` first")
        docs, chars = [], 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                if chars >= chars_per_domain:
                    break
                text = json.loads(line)["text"]
                docs.append(text)
                chars += len(text)
        per_domain.append(docs)
    for i in range(max(map(len, per_domain))):
        for docs in per_domain:
            if i < len(docs):
                yield docs[i]


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 4096) -> Path:
    """Write tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast, ChatML) and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "errors": "replace",
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def train_tokenizer(
    corpus_dir: str | Path = "data/corpus",
    out_dir: str | Path = DEFAULT_TOKENIZER_DIR,
    vocab_size: int = VOCAB_SIZE,
    chars_per_domain: int = 3_000_000,
    min_frequency: int = 2,
    max_token_length: int = 16,
    show_progress: bool = True,
) -> Path:
    """Train on a balanced sample of ``corpus_dir`` and save into ``out_dir``; the vocabulary is exactly
    ``vocab_size`` entries, specials included (ids 0, 1, 2)."""
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=show_progress,
    )
    tok.train_from_iterator(sample_corpus(corpus_dir, chars_per_domain), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected [0, 1, 2]")
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} entries, expected {vocab_size} "
                           "(corpus sample too small?)")
    return save_tokenizer(tok, out_dir)
