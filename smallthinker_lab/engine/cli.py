"""``smallthinker-lab convert`` and ``smallthinker-lab generate``.

``generate`` runs the in-memory model (load_model) on the CPU unless an engine option is given (``--memory-limit``,
``--quantization``, ``--policy``, ``--no-prefetch``, ``--lookahead``, ``--bypass-page-cache``, ``--backend``) or the
device is CUDA: then the offloading engine, whose ``--backend auto`` picks the fastest way to decode (on a GPU the
Triton kernels). Text streams to stdout; one line of statistics goes to stderr at the end.
"""

from __future__ import annotations

import json
import sys
import time

ENGINE_FLAGS = ("memory_limit", "quantization", "policy", "no_prefetch", "lookahead", "bypass_page_cache", "backend")
BACKEND_CHOICES = ["auto", "kernels", "fused", "graph", "eager"]
GENERATE_DESCRIPTION = """\
Generate text from a prompt and stream it to stdout, after the prompt itself (--no-echo: the new text only).
One line of statistics goes to stderr at the end.

The model runs in memory on the CPU unless an engine option is given (--memory-limit, --quantization, --policy,
--no-prefetch, --lookahead, --bypass-page-cache, --backend) or the device is CUDA: then the offloading engine runs
it, its experts read from storage into a cache under the memory limit (--memory-limit unlimited: the engine
without a limit), decoding the fastest way that can run (--backend auto: on a GPU the Triton kernels)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="write the expert bundle (experts.bin + experts.json) of a checkpoint",
                              description="Write every expert of a checkpoint into one 4 KiB-aligned file plus an "
                                          "index; non-expert weights stay in the checkpoint folder.")
    p.add_argument("checkpoint", help="checkpoint folder (config.json + safetensors), Hugging Face repo id in the "
                                      "local hub cache, or 'default'")
    p.add_argument("--out", default=None, help="bundle folder (default: <checkpoint>/expert_bundle[-FORMAT])")
    p.add_argument("--quantization", choices=["bf16", "fp16", "fp32", "int8", "q4_0"], default=None,
                   help="weight format of the experts (default: as stored)")
    p.add_argument("--down-layout", choices=["transposed", "model"], default="transposed",
                   help="down matrix stored [F, H] (sparse ReGLU, the default) or in the model's [H, F] layout "
                        "(what exact=True reads without a transpose; raw formats only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)

    g = subparsers.add_parser("generate", help="generate text, in memory or with the offloading engine",
                              description=GENERATE_DESCRIPTION)
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", default="default",
                   help="checkpoint folder, Hugging Face repo id in the local hub cache, or 'default' (the shipped "
                        "tiny model)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy decoding")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens holding this "
                                                              "much probability")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")
    g.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt first")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    g.add_argument("--dtype", default=None, help="compute dtype (default: as stored)")
    g.add_argument("--memory-limit", default=None,
                   help="e.g. 512MiB, 1.5GiB, 50%% (the cache holds half the experts) or unlimited: use the engine")
    g.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                   help="how the engine decodes (default auto: the fastest that can run)")
    g.add_argument("--policy", default=None, choices=["lru", "lfu"], help="expert cache policy (default lru)")
    g.add_argument("--no-prefetch", action="store_true", help="load experts after attention (post-attention router)")
    g.add_argument("--lookahead", action="store_true", help="speculatively read the next layer's experts")
    g.add_argument("--quantization", default=None, choices=["int8", "q4_0"], help="expert weight format")
    g.add_argument("--bypass-page-cache", action="store_true", help="O_DIRECT / fadvise reads")
    g.add_argument("--io-threads", type=int, default=4, help="threads reading experts from storage (engine)")
    g.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    g.add_argument("--draft", default=None, help="speculative decoding in memory: a draft checkpoint of the same "
                   "tokenizer, or N for the model's own first N layers")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per target forward")
    g.set_defaults(func=run_generate)


def run_convert(args) -> int:
    from .bundle import open_bundle
    from .conversion import convert

    out = convert(args.checkpoint, args.out, args.quantization, progress=not args.no_progress,
                  down_transposed=args.down_layout == "transposed")
    print(open_bundle(out).describe())
    return 0


def _uses_engine(args) -> bool:
    if getattr(args, "draft", None) is not None:  # speculative decoding runs on in-memory models
        flags = [f"--{f.replace('_', '-')}" for f in ENGINE_FLAGS if getattr(args, f) not in (None, False)]
        if flags:
            raise ValueError(f"--draft runs the model in memory; it does not combine with the engine's {flags}")
        return False
    if _is_dense(args.model):  # a dense model has no experts to offload: it runs in memory
        return False
    return args.device == "cuda" or any(getattr(args, f) not in (None, False) for f in ENGINE_FLAGS)


def _is_dense(path) -> bool:
    from ..model.checkpoint import CONFIG_FILE, resolve_path
    from ..model.dense_config import MODEL_TYPE

    try:
        if str(path).lower().endswith(".gguf"):
            return False
        raw = json.loads((resolve_path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the loader names what is wrong
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


def _prompt_ids(tokenizer, args) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    if args.chat:
        from ..model.tokenizer import apply_chat_template

        return apply_chat_template(tokenizer, [{"role": "user", "content": args.prompt}])
    return tokenizer(args.prompt)["input_ids"]


def _echo_prompt(args) -> None:
    """The prompt before the generated text: a continuation follows it directly, a chat reply on the next line."""
    if not args.no_echo:
        sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
        sys.stdout.flush()


def _print_stream(tokenizer, tokens) -> list[int]:
    """Decode incrementally: print the new part of the decoded text after every token."""
    out, shown = [], ""
    for tok in tokens:
        out.append(tok)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    text = tokenizer.decode(out)
    sys.stdout.write(text[len(shown):] + "\n")
    sys.stdout.flush()
    return out


def run_generate(args) -> int:
    from ..model.generate import SamplingConfig, check_max_new_tokens

    check_max_new_tokens(args.max_new_tokens)  # the arguments before loading anything
    SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if _uses_engine(args):
        from .engine import Engine

        with Engine.from_pretrained(args.model, memory_limit=args.memory_limit, device=args.device,
                                    policy=args.policy or "lru", prefetch=not args.no_prefetch,
                                    lookahead=args.lookahead, quantization=args.quantization,
                                    bypass_page_cache=args.bypass_page_cache, io_threads=args.io_threads,
                                    dtype=args.dtype, compute_threads=args.threads,
                                    backend=args.backend or "auto") as engine:
            ids = _prompt_ids(engine.tokenizer, args)
            _echo_prompt(args)
            _print_stream(engine.tokenizer, engine.stream(ids, **sampling))
            s = engine.stats()
            wait = s["io_wait_seconds"] / (s["prefill_seconds"] + s["decode_seconds"] or 1.0)
            limit = "unlimited" if s["memory_limit"] is None else f"{s['memory_limit'] / 2**20:.0f} MiB"
            print(f"engine ({engine.device.type}, backend {engine.backend}, {s['format']}, limit {limit}, "
                  f"{s['capacity_experts']} experts cached): prefill {s['prefill_tok_s']:.1f} tok/s, decode "
                  f"{s['decode_tok_s']:.2f} tok/s, hit rate {100 * s['hit_rate']:.1f}%, read "
                  f"{s['decode_bytes_read_per_token'] / 2**20:.2f} MiB/token, I/O wait {100 * wait:.1f}%",
                  file=sys.stderr)
        return 0
    from ..model.checkpoint import load_model
    from ..model.generate import GenerationStats, stream_generate
    from ..model.tokenizer import load_tokenizer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError:
        tokenizer = None
    ids = _prompt_ids(tokenizer, args)
    _echo_prompt(args)
    stats = GenerationStats()
    draft = None
    if args.draft is not None:
        from ..model.speculative import layer_draft

        draft = (layer_draft(model, int(args.draft)) if args.draft.isdigit()
                 else load_model(args.draft, dtype=args.dtype, device=args.device))
        sampling.update(draft=draft, draft_tokens=args.draft_tokens)
    t0 = time.perf_counter()
    _print_stream(tokenizer, stream_generate(model, ids, stats=stats, **sampling))
    print(f"in memory ({args.device}): prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.2f} "
          f"tok/s, {stats.new_tokens} tokens in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if draft is not None:
        spec = stats.speculative
        print(f"draft {draft.name_or_path}: {100 * spec.acceptance_rate:.1f}% of draft tokens kept, "
              f"{spec.tokens_per_target_forward:.2f} tokens per target forward", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m smallthinker_lab.engine.cli ...``: these subcommands alone (errors as the main CLI)."""
    from ..cli import sub_main

    return sub_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
