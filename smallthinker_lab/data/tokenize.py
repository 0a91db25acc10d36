"""Tokenise the corpus into flat ``uint16`` token files, one per domain, plus a validation split.

Layout under ``<corpus_dir>/tokens/``::

    {domain}.bin       # train documents, each followed by <|endoftext|> (id 0)
    {domain}.val.bin   # the documents prepare marked ``split: val`` (held-out sources or groups); for a corpus
                       # without that field, the last documents: at least ``val_fraction`` of docs and chars
    manifest.json      # token and document counts, tokenizer path and sha256

Read with ``np.memmap(path, dtype=np.uint16, mode="r")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..model.atomic import sha256_file
from ..model.tokenizer import load_tokenizer_file, resolve_tokenizer_dir
from ..prompt_sets import DOMAINS

__all__ = ["EOT_ID", "load_tokens", "tokenize_corpus", "tokenize_documents", "validation_split"]

EOT_ID = 0


def tokenize_documents(tok: Tokenizer, texts: list[str], batch_size: int = 512, desc: str | None = None) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by ``<|endoftext|>``, as ``uint16``."""
    if tok.get_vocab_size() > 65536:
        raise ValueError(f"vocab of {tok.get_vocab_size()} does not fit uint16")
    chunks = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=desc is None):
        for enc in tok.encode_batch(texts[i:i + batch_size], add_special_tokens=False):
            chunks.append(np.asarray(enc.ids, dtype=np.uint16))
            chunks.append(np.array([EOT_ID], dtype=np.uint16))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


def validation_split(texts: list[str], val_fraction: float = 0.01) -> int:
    """Index where the validation documents start: the shortest tail holding at least ``val_fraction`` of the
    documents and of the characters (at least one document; none if there is only one)."""
    if len(texts) < 2 or val_fraction <= 0:
        return len(texts)
    need_docs = max(1, round(len(texts) * val_fraction))
    need_chars = sum(map(len, texts)) * val_fraction
    split, chars = len(texts), 0
    while split > 1 and (len(texts) - split < need_docs or chars < need_chars):
        split -= 1
        chars += len(texts[split])
    return split


def tokenize_corpus(
    corpus_dir: str | Path = "data/corpus",
    tokenizer: str | Path = "default",
    val_fraction: float = 0.01,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``{domain}.bin`` / ``{domain}.val.bin`` and ``manifest.json``; return the manifest."""
    corpus_dir = Path(corpus_dir)
    out = Path(out_dir) if out_dir is not None else corpus_dir / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = resolve_tokenizer_dir(tokenizer)
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir}: train it first (smallthinker-lab data tokenize "
                                "--train-tokenizer)")
    tok = load_tokenizer_file(tok_file)  # a damaged file: TokenizerError naming it
    if tok.token_to_id("<|endoftext|>") != EOT_ID:
        raise ValueError(f"{tok_file}: <|endoftext|> must have id {EOT_ID}")
    manifest: dict[str, Any] = {
        "tokenizer": str(tok_dir), "tokenizer_sha256": sha256_file(tok_file), "vocab_size": tok.get_vocab_size(),
        "dtype": "uint16", "eot_id": EOT_ID, "val_fraction": val_fraction, "domains": {},
    }
    for domain in DOMAINS:
        path = corpus_dir / f"{domain}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run `smallthinker-lab data prepare` first")
        with path.open(encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
        texts = [d["text"] for d in docs]
        if any("split" in d for d in docs):  # prepare marked the held-out validation documents
            parts = ([d["text"] for d in docs if d.get("split") != "val"],
                     [d["text"] for d in docs if d.get("split") == "val"])
        else:
            split = validation_split(texts, val_fraction)
            parts = (texts[:split], texts[split:])
        info: dict[str, Any] = {"chars": sum(map(len, texts))}
        for name, part in zip(("train", "val"), parts):
            ids = tokenize_documents(tok, part, desc=f"tokenize {domain} {name}")
            fname = f"{domain}.bin" if name == "train" else f"{domain}.val.bin"
            ids.tofile(out / fname)
            info.update({f"{name}_file": fname, f"{name}_docs": len(part), f"{name}_tokens": int(ids.size),
                         f"{name}_sha256": sha256_file(out / fname)})
        info["tokens_per_char"] = (info["train_tokens"] + info["val_tokens"] - len(texts)) / max(1, info["chars"])
        manifest["domains"][domain] = info
    total = sum(v["train_tokens"] + v["val_tokens"] for v in manifest["domains"].values())
    for v in manifest["domains"].values():
        v["token_share"] = (v["train_tokens"] + v["val_tokens"]) / total if total else 0.0
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_tokens(corpus_dir: str | Path = "data/corpus", domain: str = "en", split: str = "train") -> np.memmap:
    """Memory-map one token file (``split`` is ``"train"`` or ``"val"``)."""
    name = f"{domain}.bin" if split == "train" else f"{domain}.val.bin"
    return np.memmap(Path(corpus_dir) / "tokens" / name, dtype=np.uint16, mode="r")
