"""Speculative decoding on this CPU: acceptance and speed-up of a draft against the target alone, same run.

    python -m benchmarks.speculative [--repeats 2] [--new-tokens 48] [--threads 1]

Two settings, greedy, no stop token, every draft run's tokens checked equal to the target alone's:
1. trained: the default model (data/models/smallthinker-tiny, fp32) as target; drafts are its own first 1 or 2 layers
   with its final norm and head (layer_draft: no trained draft ships yet); 3 prompts of each of the four prompt sets.
   Once more in bf16 (the stored dtype), one round: how often greedy outputs part from the target alone's there.
2. synthetic: a random dense Qwen2-shaped target (hidden 1024, 8 layers, intermediate 5504, 16/2 heads, vocabulary
   8192, 163 M parameters, fp32: memory-bound here) with its first layer as draft; the attention and MLP output
   projections scaled by s in (1, 0.3, 0.1), so that the first layer's prediction agrees with the full model's more
   as s shrinks: acceptance is a property of this construction, the sweep shows the speed-up as acceptance moves.
Each prompt runs the target alone, then with the draft at each k, in the same round; speed-up = a run's decode
tok/s over the same round's target-alone run. Writes benchmarks/results/speculative.{md,csv}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import smallthinker_lab as sl
from smallthinker_lab.instruments.speculative import acceptance_by_position, measure_speculative, speculative_summary
from smallthinker_lab.model.speculative import layer_draft
from smallthinker_lab.prompt_sets import load_prompt_sets

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(df) -> str:
    """A GitHub markdown table: floats to 3 significant digits, NaN blank."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.3g}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(df.columns), *rows])


def synthetic_target(scale: float) -> sl.DenseForCausalLM:
    cfg = sl.DenseConfig(vocab_size=8192, hidden_size=1024, intermediate_size=5504, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                         tie_word_embeddings=True, torch_dtype="float32")
    model = sl.DenseForCausalLM(cfg).init_weights(0).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per prompt set (trained setting)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    frames = []
    target = sl.load_model("default", dtype=torch.float32)
    sets = load_prompt_sets(max_prompts=args.prompts)
    for layers in (1, 2):
        df = measure_speculative(target, layer_draft(target, layers), sets, draft_tokens=(1, 2, 4),
                                 max_new_tokens=args.new_tokens, repeats=args.repeats)
        frames.append(df.assign(setting="trained", draft=f"first {layers} of 8 layers"))
    bf16 = sl.load_model("default")  # stored bf16: the rounding of a (k+1)-token forward differs from a 1-token one
    df = measure_speculative(bf16, layer_draft(bf16, 2), sets, draft_tokens=(2, 4), max_new_tokens=args.new_tokens,
                             repeats=1)
    frames.append(df.assign(setting="trained bf16", draft="first 2 of 8 layers"))
    rng_prompts = {"random ids": [torch.randint(3, 8192, (32,), generator=torch.Generator().manual_seed(i)).tolist()
                                  for i in range(2)]}
    for scale in (1.0, 0.3, 0.1):
        synth = synthetic_target(scale)
        df = measure_speculative(synth, layer_draft(synth, 1), rng_prompts, draft_tokens=(2, 4),
                                 max_new_tokens=min(args.new_tokens, 24), repeats=args.repeats)
        frames.append(df.assign(setting=f"synthetic s={scale}", draft="first 1 of 8 layers"))
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "speculative.csv", index=False)
    summary = speculative_summary(df, by=("setting", "draft", "mode"))
    by_domain = speculative_summary(df[df.setting == "trained"], by=("draft", "mode", "domain"))
    by_pos = acceptance_by_position(df, by=("setting", "draft", "mode"))
    lines = [
        "# Speculative decoding on CPU", "",
        f"Generated by `python -m benchmarks.speculative --repeats {args.repeats} --new-tokens {args.new_tokens} "
        f"--threads {args.threads}`; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); wall {time.time() - t0:.0f} s.", "",
        "Greedy. speedup = decode tok/s with the draft over the target alone's, same prompt and round (median over "
        "runs); acceptance = kept over checked draft tokens; same_tokens: the share of runs whose output equals the "
        "target alone's.",
        "", "## Summary", "", markdown(summary), "",
        "## Trained setting by domain (the four prompt sets)", "", markdown(by_domain),
        "", "## Acceptance by draft position: P(kept | every earlier draft token kept)", "",
        markdown(by_pos), "",
    ]
    (RESULTS / "speculative.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
