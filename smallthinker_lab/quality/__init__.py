"""Quality of a trained SmallThinker, measured: perplexity, the paper's routing phenomena, continuations, model card.

Modules by job: perplexity, phenomena (routing and neuron sparsity on the prompt sets, continuations), contamination
(are the prompts held out), measure (one model's figures), card (README.md), cli; common holds the shared names.

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
   (layer, expert) under 0.14 and at 0.4 or above; uniform routing puts every expert at top_k / E), also under
   other normalisations of the frequency (per routed slot, relative to the layer's hottest expert, per sequence);
   ReGLU neuron sparsity per layer under three definitions (per routed pair, per expert, per neuron; dead neurons
   counted apart). For the main model and the comparison model, and the sparsity of the random initialisation
   of the main model's config (``init_weights(seed)``, as the trainer starts): what chance gives.
3. Greedy continuations of a few fixed prompts (a HumanEval prompt, a GSM8K problem, a People's Daily and a
   Wikipedia sentence).
4. The model card ``README.md`` next to the figures (PNG) and tables (CSV), written from the measured figures
   and the facts of the trainer's ``TRAINING.md``; the figures and the card are always drawn from the saved
   tables, so ``--card-only`` rewrites both, the same, without measuring.
"""

from .card import findings, write_card
from .cli import main
from .common import (
    CARD_SECTIONS,
    CONTINUATION_PROMPTS,
    DOMAINS,
    PROMPT_SETS,
    fmt_int,
    fmt_js,
    fmt_ppl,
    fmt_share,
    fmt_sparsity,
)
from .contamination import prompt_overlap, read_training
from .measure import ModelQuality, QualityResult, measure, measure_baseline, plot_figures
from .perplexity import domain_perplexity, perplexity, unigram_counts, unigram_perplexity, window_plan
from .phenomena import continuations, phenomena, profile_prompt_sets, prompt_prefix, read_prompts

__all__ = [
    "CARD_SECTIONS", "findings", "fmt_int", "fmt_js", "fmt_ppl", "fmt_share", "fmt_sparsity", "prompt_overlap",
    "DOMAINS", "PROMPT_SETS", "CONTINUATION_PROMPTS", "ModelQuality", "QualityResult", "window_plan",
    "unigram_counts", "unigram_perplexity", "perplexity", "domain_perplexity", "read_prompts", "prompt_prefix",
    "profile_prompt_sets", "phenomena", "continuations", "read_training", "measure", "measure_baseline", "plot_figures",
    "write_card", "main",
]
