"""Trained routing on the big synthetic shapes: the suite's rows "trained routing (domain)" beside "synthetic
uniform routing".

A synthetic checkpoint has random routers: on the 4B shape routing is close to uniform, with no locality, the
hardest case for an expert cache. SmallThinker's case for offloading rests on skewed, domain-dependent expert use.
Here the default trained model (``data/models/smallthinker-tiny``: 8 layers x 32 experts, top-4) generates from
each prompt set's prompts (``data/prompts/<domain>.jsonl``, cut to the suite's prompt length) while its routing is
recorded (``smallthinker_lab.interventions.record_routing``, with the next-ranked experts when the target routes
more than 4); each trace is mapped onto the synthetic shape (``RoutingTrace.for_shape``: layer l takes layer
l mod 8; 32 experts one to one on the 4B shape; on the 21B shape, 64 experts top-6, expert e at position t becomes
e + 32 * (t mod 2) and ranks 5-6 are the trained router's next-ranked experts) and replayed through the engine's
forced routing (``smallthinker_lab.interventions.replay``), one trace per generation, the same trace for the model
in memory (the row's token reference) and for the engine. Prefetch, look-ahead, LRU/LFU then run on routing with
the trained model's locality; the look-ahead predicts the replayed experts (its best case: the synthetic routers
say nothing about the trained routing). On a GPU the Triton kernel decoders route to the replayed experts
themselves (forced routing inside the routing kernel), so the kernel rows, the GPU-resolved LRU included, run on
the trained routing; the eager rows beside them run the engine's own layer loop.

No peer can be fed this routing (llama.cpp has no forced-routing hook), so these rows are compared with the
engine's own in-memory row under the same replay (``offload_bound_share``), not with llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import torch

DOMAINS = ("gsm8k", "humaneval", "wiki-en", "zh-news")


def parse_domains(text: str | None) -> list[str]:
    """``--routing gsm8k,zh-news`` (or ``all``) -> the domains, each a shipped prompt set; '' or None: none."""
    if not text:
        return []
    names = list(DOMAINS) if text.strip() == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DOMAINS]
    if bad:
        raise SystemExit(f"--routing: unknown prompt set(s) {bad}; known: {', '.join(DOMAINS)} or 'all'")
    return names


def domain_prompts(ckpt: Path, domain: str, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``domain`` as token ids of exactly ``length`` tokens (prompts shorter than that skipped)."""
    from smallthinker_lab.model.tokenizer import load_tokenizer
    from smallthinker_lab.prompt_sets import load_prompt_set

    tok = load_tokenizer(ckpt)
    out = []
    for text in load_prompt_set(domain):
        ids = tok(text)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise RuntimeError(f"prompt set {domain}: fewer than {n} prompts of at least {length} tokens")


def record_traces(source: Path, target_config, domains: list[str], n: int, prompt_tokens: int, new_tokens: int,
                  synthetic_prompts: bool = False, log=print) -> tuple[dict, dict]:
    """{domain: [RoutingTrace mapped onto target_config, one per prompt]} and a description of how they were made.
    ``source``: the trained checkpoint whose routing is recorded (greedy generations of ``new_tokens`` from
    ``prompt_tokens``-token prompts); ``synthetic_prompts``: random token prompts instead of the domain's text (the
    smoke suite's stand-in model has no tokenizer of its own)."""
    from smallthinker_lab.interventions import record_routing
    from smallthinker_lab.model.checkpoint import load_model

    model = load_model(source)
    K = max(model.config.top_k, target_config.top_k)
    traces, info = {}, {}
    for d in domains:
        if synthetic_prompts:
            g = torch.Generator().manual_seed(sum(map(ord, d)))
            prompts = [torch.randint(3, model.config.vocab_size, (prompt_tokens,), generator=g).tolist()
                       for _ in range(n)]
        else:
            prompts = domain_prompts(source, d, n, prompt_tokens)
        with torch.inference_mode():
            recorded = record_routing(model, prompts, new_tokens, ranks=K)
        traces[d] = [t.for_shape(target_config) for t in recorded]
        distinct = [len({(layer, int(e)) for layer in range(t.num_layers) for e in t.ids[:, layer].ravel()})
                    for t in traces[d]]
        info[d] = {"prompts": n, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "source": str(source),
                   "mapping": traces[d][0].description, "distinct_experts_per_trace": distinct,
                   "experts_of_the_shape": target_config.num_hidden_layers * target_config.num_experts}
        log(f"{d} routing: {n} traces of {traces[d][0].num_positions} positions, {info[d]['mapping']}")
    return traces, info


def routing_table(rows: list[dict], model: str) -> str:
    """Markdown: every engine configuration that has trained-routing rows, the synthetic (uniform) routing row and
    each domain's row side by side: decode hit rate, MiB read per decode token, share of the bound against the
    engine's own in-memory row of the same routing, and the physical bound share."""
    sub = [r for r in rows if r.get("model") == model and r.get("mode") == "engine" and not r.get("error")]
    trained = [r for r in sub if r.get("routing")]
    if not trained:
        return ""

    def key(r):
        opts = r.get("options") or {}
        return (r.get("variant"), r.get("share_target"), r.get("policy"), r.get("prefetch"), r.get("quantization"),
                r.get("instruments"), r.get("spec_threads"), tuple(sorted(opts.items())))

    from .report_table import _f, label

    configs = list(dict.fromkeys(key(r) for r in trained))
    head = ("| engine configuration | routing | decode hit rate | MiB read/token | share of bound vs the engine in "
            "memory (same routing) | share of the physical bound | decode tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in configs:
        group = [r for r in sub if key(r) == c]
        group.sort(key=lambda r: (r.get("routing") is not None, r.get("routing") or ""))
        for r in group:
            what = f"trained routing ({r['routing']})" if r.get("routing") else "synthetic uniform routing"
            lines.append(f"| {label(r)} | {what} | {_f(r.get('hit_rate'), '{:.3f}')} | "
                         f"{_f((r.get('bytes_read_per_token') or 0) / 2**20, '{:.3g}')} | "
                         f"{_f(r.get('offload_bound_share'), '{:.0%}')} | {_f(r.get('bound_share'), '{:.0%}')} | "
                         f"{_f(r.get('decode_tok_s'))} |")
    return "\n".join(lines) + "\n"
