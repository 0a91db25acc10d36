"""The causal specialisation table of the default model (issue 17, item 5): ablate each domain's hottest experts,
measure perplexity on every domain's held-out text, against random ablations of the same size.

Domains are the four shipped prompt sets (gsm8k: math, humaneval: code, wiki-en: English, zh-news: Chinese); per
set the first ``--n-profile`` records choose the hottest ``--m`` experts per layer (activation frequency of a prefill
of each text) and the next ``--n-eval`` records are scored (each truncated to ``--max-tokens`` tokens).

    python -m benchmarks.causal_specialisation [--m 4] [--seeds 0 1 2] [--n-profile 50] [--n-eval 40]
        [--max-tokens 256] [--out benchmarks/results/causal_specialisation]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _markdown(df, index: bool = True) -> str:
    """A pipe table of df, floats to 3 decimals (smallthinker_lab.analysis.tables.to_markdown)."""
    from smallthinker_lab.analysis.tables import to_markdown

    return to_markdown(df.reset_index() if index else df, floatfmt=".3f", index=False).rstrip("\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-profile", type=int, default=50)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/causal_specialisation")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import matplotlib

    matplotlib.use("Agg")
    import smallthinker_lab as sl
    from smallthinker_lab.interventions.plots import plot_specialisation
    from smallthinker_lab.interventions.specialisation import causal_specialisation

    model = sl.load_model(a.model)
    t0 = time.perf_counter()
    r = causal_specialisation(model, m=a.m, seeds=a.seeds, n_profile=a.n_profile, n_eval=a.n_eval,
                              max_tokens=a.max_tokens)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    r.table.to_csv(out.with_suffix(".csv"), index=False)
    ax = plot_specialisation(r.table)
    ax.figure.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    ppl = r.matrix("ppl")
    cfg = model.config
    lines = [
        "# Causal specialisation of the default model",
        "",
        f"Model `{a.model}` ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts, top-{cfg.top_k}). Per domain, "
        f"the {a.m} experts per layer with the highest activation frequency on the first {a.n_profile} texts of its "
        f"prompt set are ablated (route mode: router logits -inf, the next-best experts route), and perplexity is "
        f"measured on the next {a.n_eval} texts of every set (at most {a.max_tokens} tokens each, every next-token "
        f"target). Control: {a.m} random experts per layer, seeds {a.seeds}. Measured in {seconds:.0f} s on CPU "
        f"({a.threads} thread); `python -m benchmarks.causal_specialisation` reproduces it.",
        "",
        "## Perplexity / unablated perplexity (rows: experts ablated; columns: held-out text)",
        "",
        _markdown(r.matrix("ratio")),
        "",
        "## Perplexity",
        "",
        _markdown(ppl),
        "",
        "## Own domain's experts vs other domains' vs random",
        "",
        _markdown(r.summary(), index=False),
        "",
        "## The ablated experts (hottest first) per layer",
        "",
        "\n".join(f"- {d}: " + "; ".join(f"L{i} {v}" for i, v in sets.items()) for d, sets in r.hot.items()),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"settings": r.settings, "seconds": seconds, "hot": r.hot,
                                                    "random_sets": r.random_sets}, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
