"""The shipped draft (data/models/smallthinker-tiny-draft) drafting for the default model: acceptance per domain, and
the speed-up with the offloading engine as target, on this CPU.

    python -m benchmarks.draft_acceptance [--prompts 8] [--new-tokens 32] [--draft-tokens 4] [--speed-prompts 2]
                                          [--speed-draft-tokens 1 2 4]

1. acceptance: the default model in memory (fp32) as target, the draft (fp32), greedy, no stop token; the first
   ``--prompts`` prompts of each of the four prompt sets (cut to their last 256 tokens), ``--draft-tokens`` per round.
   Acceptance = kept draft tokens over checked ones, pooled per domain; also P(kept | earlier kept) per draft position
   and the decode tokens per target forward. Every greedy output is checked equal to the target alone's.
2. speed-up: Engine("default") (bf16, its stored dtype, memory unlimited) as target, the draft in memory (fp32); per
   prompt the engine alone and then with the draft at each k of ``--speed-draft-tokens``, interleaved in one run
   (``--speed-prompts`` per set); speed-up = decode tok/s with the draft over the engine alone's on the same prompt.
   The CPU is shared: one run's ratio, noisy. In bf16 a (k+1)-token verify forward can round a near-tie of the
   target's top two logits the other way than a one-token step, so ``same_tokens`` may fall below 1 there.
Writes benchmarks/results/draft_acceptance.{md,json}; the draft's README.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import smallthinker_lab as sl
from benchmarks.speculative import markdown  # the same table writer as the speculative benchmark
from smallthinker_lab.instruments.speculative import measure_speculative, speculative_summary
from smallthinker_lab.prompt_sets import load_prompt_sets
from smallthinker_lab.resources import DEFAULT_DRAFT_NAME

RESULTS = Path(__file__).resolve().parent / "results"


def acceptance(target, draft, sets: dict, new_tokens: int, k: int):
    """Per domain: prompts, pooled acceptance, tokens per target forward, all outputs equal the target's; and the
    acceptance by draft position (tidy)."""
    import pandas as pd

    rows, pos = [], []
    for domain, prompts in sets.items():
        reached, accepted, decode, forwards, same = [0] * k, [0] * k, 0, 0, True
        for text in prompts:
            ids = target.tokenizer(text)["input_ids"][-256:]
            want = sl.generate(target, ids, new_tokens, stop_tokens=[])
            got = sl.generate(target, ids, new_tokens, stop_tokens=[], draft=draft, draft_tokens=k)
            spec = got.stats.speculative
            same &= list(got) == list(want)
            reached = [a + b for a, b in zip(reached, spec.reached)]
            accepted = [a + b for a, b in zip(accepted, spec.accepted)]
            decode, forwards = decode + spec.decode_tokens, forwards + spec.target_forwards
        rows.append({"domain": domain, "prompts": len(prompts), "acceptance": sum(accepted) / sum(reached),
                     "tokens_per_target_forward": decode / forwards, "same_tokens": same})
        pos += [{"domain": domain, "position": j + 1, "reached": r, "accepted": a, "acceptance": a / r if r else None}
                for j, (r, a) in enumerate(zip(reached, accepted))]
    return pd.DataFrame(rows), pd.DataFrame(pos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--speed-prompts", type=int, default=2)
    ap.add_argument("--speed-draft-tokens", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    target = sl.load_model("default", dtype=torch.float32)
    draft = sl.load_model(DEFAULT_DRAFT_NAME, dtype=torch.float32)
    per_domain, by_pos = acceptance(target, draft, load_prompt_sets(max_prompts=a.prompts), a.new_tokens,
                                    a.draft_tokens)
    print(per_domain.to_string(index=False))
    with sl.Engine("default", memory_limit=None, progress=False) as engine:
        runs = measure_speculative(engine, draft, load_prompt_sets(max_prompts=a.speed_prompts),
                                   draft_tokens=a.speed_draft_tokens, max_new_tokens=a.new_tokens, repeats=1)
    speed = speculative_summary(runs)
    speed_domain = speculative_summary(runs[runs.draft_tokens == max(a.speed_draft_tokens)], by=("domain",))
    print(speed.to_string(index=False))
    meta = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {a.threads} thread(s), "
            f"{time.perf_counter() - t0:.0f} s in all; shared 2-core CPU: timings are noisy (one run)")
    md = [f"# Draft acceptance: {DEFAULT_DRAFT_NAME} for the default model", "",
          f"Written by `python -m benchmarks.draft_acceptance --prompts {a.prompts} --new-tokens {a.new_tokens} "
          f"--draft-tokens {a.draft_tokens} --speed-prompts {a.speed_prompts} --speed-draft-tokens "
          f"{' '.join(map(str, a.speed_draft_tokens))}` ({meta}).", "",
          f"## Acceptance per domain (target in memory, fp32, greedy, k = {a.draft_tokens})", "",
          markdown(per_domain), "", "By draft position (P(kept | every earlier one kept)):", "",
          markdown(by_pos.pivot(index="position", columns="domain", values="acceptance").reset_index()), "",
          "## Speed-up with the engine as target (bf16, memory unlimited; one interleaved run)", "",
          markdown(speed), "", f"Per domain, k = {max(a.speed_draft_tokens)}:", "", markdown(speed_domain), ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "draft_acceptance.md").write_text("\n".join(md))
    (RESULTS / "draft_acceptance.json").write_text(json.dumps({
        "args": vars(a), "meta": meta, "acceptance": per_domain.to_dict("records"),
        "by_position": by_pos.to_dict("records"), "speed": speed.to_dict("records"),
        "speed_by_domain": speed_domain.to_dict("records"), "runs": runs.to_dict("records")}, indent=1, default=str))


if __name__ == "__main__":
    main()
