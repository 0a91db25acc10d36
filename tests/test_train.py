"""The trainer: balance losses, the window sampler, the schedule, the fast training forwards, determinism, resume."""

import argparse
import math

import numpy as np
import pytest
import torch

from smallthinker_lab import SmallThinkerForCausalLM
from smallthinker_lab.train import (
    WindowSampler,
    balance_loss,
    balance_statistic,
    flops_per_token,
    global_balance_loss,
    load_entropy,
    lr_at,
    microbatch_balance_loss,
    read_log,
    train,
    training_forwards,
    validation_windows,
)
from tests.conftest import random_model

DOMAINS = ["code", "en", "math", "zh"]
TIMING = {"tokens_per_s", "mfu", "elapsed_s"}


def write_corpus(folder, vocab=128, n=20000, n_val=3000, seed=0):
    """Four domains in disjoint token ranges, each a repeated 17-token pattern with 10% noise, docs split by 0."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, dom in enumerate(DOMAINS):
        lo, hi = 3 + i * (vocab - 3) // 4, 3 + (i + 1) * (vocab - 3) // 4
        pattern = rng.integers(lo, hi, size=17)
        for name, size in ((f"{dom}.bin", n), (f"{dom}.val.bin", n_val)):
            a = np.tile(pattern, size // 17 + 1)[:size].astype(np.uint16)
            noise = rng.random(size) < 0.1
            a[noise] = rng.integers(lo, hi, size=int(noise.sum()))
            a[::200] = 0
            a.tofile(folder / name)
    return folder


RUN = dict(steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup=5, log_every=5, eval_windows=4, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary = train("smallthinker-test", corpus, out, **RUN)
    return out, summary


def rows(path):
    return read_log(path)


def without_timing(rs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


# ------------------------------------------------------------------ balance losses
def cyclic_logits(B, T, E, k, scale=3.0):
    """Token t of each sequence puts its top-k on experts (t*k .. t*k+k-1) mod E, all with the same logit profile:
    f and P are both exactly uniform when T*k is a multiple of E."""
    base = torch.linspace(scale, -scale, E)  # descending: top-k are the first k
    rows_ = [torch.roll(base, t * k) for t in range(T)]
    return torch.stack(rows_).expand(B, T, E).clone()


def test_uniform_routing_gives_one():
    E, k = 8, 2
    lg = cyclic_logits(B=4, T=8, E=E, k=k)
    for fn in (global_balance_loss, microbatch_balance_loss):
        assert fn([lg, lg], k).item() == pytest.approx(1.0, abs=1e-6)
    assert load_entropy([lg], k).item() == pytest.approx(1.0, abs=1e-6)


def test_collapsed_routing_gives_e_over_k():
    E, k = 8, 2
    lg = torch.full((4, 16, E), -30.0)
    lg[..., :k] = 30.0  # every token to experts 0 and 1, all probability there
    val = global_balance_loss([lg], k).item()
    assert val == pytest.approx(E / k, rel=1e-4)
    assert val > 1.5
    assert load_entropy([lg], k).item() == pytest.approx(math.log(k) / math.log(E), abs=1e-6)


def test_global_over_a_group_equals_microbatch_loss_of_that_group():
    torch.manual_seed(0)
    lg = [torch.randn(8, 16, 8) * 2 for _ in range(3)]
    g = global_balance_loss(lg, 2, group_size=4)
    per_group = [microbatch_balance_loss([x[i:i + 4] for x in lg], 2, microbatch_size=4) for i in (0, 4)]
    assert g.item() == pytest.approx(torch.stack(per_group).mean().item(), rel=1e-6)
    # and a micro-batch of the whole batch pools exactly what the default global group (the batch) pools
    assert global_balance_loss(lg, 2).item() == pytest.approx(microbatch_balance_loss(lg, 2, None).item(), rel=1e-6)


def test_global_loss_lets_sequences_specialise():
    E, k, B = 8, 2, 4
    lg = torch.full((B, 16, E), -4.0)
    for b in range(B):
        lg[b, :, 2 * b: 2 * b + k] = 4.0  # sequence b uses only its own two experts
    per_sequence = microbatch_balance_loss([lg], k, microbatch_size=1).item()
    group = global_balance_loss([lg], k, group_size=B).item()
    assert group <= per_sequence
    assert group == pytest.approx(1.0, abs=1e-5)  # the group as a whole is balanced
    assert per_sequence > 2.0  # each sequence alone is collapsed


def test_balance_gradient_lowers_overused_experts():
    torch.manual_seed(1)
    lg = torch.randn(2, 16, 8)
    lg[..., 0] += 3.0  # expert 0 overused
    lg.requires_grad_(True)
    global_balance_loss([lg], 2).backward()
    assert lg.grad[..., 0].mean() > 0  # descent lowers expert 0's logits
    assert lg.grad[..., 1:].mean() < 0


def direct_group_balance(layers, k, g):
    """The DP-group balance loss written out: for each group of g consecutive sequences, per layer, count the
    top-k assignments of the group's tokens (f) and average their normalised sigmoid scores (P); E * sum f * P;
    mean over groups, then over layers. Plain Python loops over tokens."""
    per_layer = []
    for lg in layers:
        B, T, E = lg.shape
        vals = []
        for start in range(0, B, g):
            counts, psum, n = [0.0] * E, [0.0] * E, 0
            for b in range(start, start + g):
                for t in range(T):
                    row = lg[b, t].tolist()
                    for e in sorted(range(E), key=lambda e: -row[e])[:k]:
                        counts[e] += 1
                    s = [1 / (1 + math.exp(-v)) for v in row]
                    for e in range(E):
                        psum[e] += s[e] / sum(s)
                    n += 1
            vals.append(E * sum(counts[e] / (n * k) * psum[e] / n for e in range(E)))
        per_layer.append(sum(vals) / len(vals))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_group_loss_equals_the_direct_computation(g):
    gen = torch.Generator().manual_seed(g)
    layers = [torch.randn(8, 5, 6, generator=gen) * 2 for _ in range(2)]  # B=8 sequences, T=5, E=6
    assert balance_loss(layers, 2, g).item() == pytest.approx(direct_group_balance(layers, 2, g), rel=1e-5)


def test_group_of_the_whole_batch_is_the_global_loss_and_micro_batch_is_its_own_size():
    torch.manual_seed(3)
    lg = [torch.randn(8, 16, 8) * 2 for _ in range(3)]
    whole = balance_loss(lg, 2, 8).item()
    assert whole == pytest.approx(balance_loss(lg, 2, "batch").item(), rel=1e-7)
    assert whole == pytest.approx(global_balance_loss(lg, 2).item(), rel=1e-7)
    assert whole == pytest.approx(direct_group_balance(lg, 2, 8), rel=1e-5)
    # g does not depend on the micro-batch size; "micro-batch" is the loss over micro-batches of that size
    assert balance_loss(lg, 2, 4, microbatch_size=1).item() == balance_loss(lg, 2, 4, microbatch_size=8).item()
    assert balance_loss(lg, 2, "micro-batch", microbatch_size=2).item() == balance_loss(lg, 2, 2).item()
    # a hand-made batch: sequence b sends every token to experts 2b, 2b+1 only
    E, k, B = 8, 2, 4
    spec = torch.full((B, 16, E), -4.0)
    for b in range(B):
        spec[b, :, 2 * b: 2 * b + k] = 4.0
    losses = [balance_loss([spec], k, g).item() for g in (1, 2, 4)]
    assert losses[0] > losses[1] > losses[2] == pytest.approx(1.0, abs=1e-5)  # larger groups: specialise freely


@pytest.mark.parametrize("bad", [3, 0, -2, "global", 2.0, True])
def test_a_bad_balance_group_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="balance_group"):
        balance_loss([torch.randn(8, 4, 4)], 2, bad)


def test_flops_per_token_counts_active_matmuls_and_masked_attention():
    from smallthinker_lab.model.config import SmallThinkerConfig
    from smallthinker_lab.train.flops import mean_context, peak_tflops

    cfg = SmallThinkerConfig.from_name("smallthinker-test")  # H 64, 4 layers, heads 4 x 16, kv 2, 8 experts x 32
    f = flops_per_token(cfg, 32)
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64
    per_layer = attn + 64 * 8 + 2 * 3 * 64 * 32  # + router + top-2 experts
    assert f["active_matmul_params"] == 4 * per_layer + 128 * 64  # + LM head
    assert mean_context(4, None) == 2.5 and mean_context(4, 2) == (1 + 2 + 2 + 2) / 4
    # layers 0 (global) and 1-3 (window 8) at T = 32
    assert f["attention"] == pytest.approx(12 * 64 * (mean_context(32, None) + 3 * mean_context(32, 8)))
    assert f["total"] == 6 * f["active_matmul_params"] + f["attention"]
    assert peak_tflops("NVIDIA H200") == (989.4, "H200 dense bf16 spec")
    assert peak_tflops("cpu (x86_64, 1 threads)")[0] is None and peak_tflops("cpu", 2.0) == (2.0, "given")


def test_the_group_size_alone_changes_a_run(corpus, tmp_path):
    """Arms that differ in g differ in nothing else: the micro-batch size does not touch a g-group run, and two
    groups sizes share the first step's cross-entropy (same init and data) but not the balance loss."""
    a = train("smallthinker-test", corpus, tmp_path / "a", stop_at=2, **{**RUN, "balance_group": 2})
    b = train("smallthinker-test", corpus, tmp_path / "b", stop_at=2,
              **{**RUN, "balance_group": 2, "microbatch_size": 4})
    c = train("smallthinker-test", corpus, tmp_path / "c", stop_at=2, **{**RUN, "balance_group": 8})
    assert a["steps_done"] == b["steps_done"] == c["steps_done"] == 2
    ra, rb, rc = (without_timing(rows(tmp_path / n / "train_log.jsonl")) for n in "abc")
    assert ra == rb
    assert ra[0]["ce"] == rc[0]["ce"] and ra[0]["balance"] != rc[0]["balance"]
    assert rc[0]["balance"] == rc[0]["bal_batch"]


def test_balance_statistic_rejects_ragged_groups():
    with pytest.raises(ValueError, match="chunks of 3"):
        balance_statistic(torch.randn(4, 8, 8), 2, 3)


# ------------------------------------------------------------------ schedule and data
def test_schedule_warmup_then_cosine_to_ten_percent():
    peak, warmup, total = 1e-3, 10, 111
    lrs = [lr_at(s, peak, warmup, total) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert np.allclose(np.diff(lrs[:warmup]), peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[warmup + (total - 1 - warmup) // 2] == pytest.approx(0.55 * peak)
    # warmup does not depend on the run length (so a run can be planned after a few steps)
    assert lr_at(3, peak, warmup, 50) == lr_at(3, peak, warmup, 5000)


def test_sampler_is_seeded_balanced_and_reads_the_files(corpus):
    s = WindowSampler(corpus, seq_len=16, batch_size=8, seed=3)
    assert s.domains == DOMAINS
    a, b, c = s.batch(5), s.batch(5), s.batch(6)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, WindowSampler(corpus, 16, 8, seed=4).batch(5).tokens)
    assert a.tokens.shape == (8, 17) and a.tokens.dtype == torch.int64
    assert np.bincount(a.domains.numpy(), minlength=4).tolist() == [2, 2, 2, 2]
    for row, d in zip(a.tokens.numpy(), a.domains.tolist()):
        flat = np.fromfile(corpus / f"{DOMAINS[d]}.bin", dtype=np.uint16).astype(np.int64)
        hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(flat, 17).__eq__(row).all(axis=1))
        assert hits.size >= 1
    w = WindowSampler(corpus, 16, 8, weights={"code": 3, "en": 1})
    assert np.bincount(w.batch(0).domains.numpy(), minlength=4).tolist() == [6, 2, 0, 0]


def test_validation_windows_cover_the_file_once(corpus):
    v = validation_windows(corpus / "en.val.bin", seq_len=32)
    flat = np.fromfile(corpus / "en.val.bin", dtype=np.uint16)
    assert v.shape == ((len(flat) - 1) // 32, 33)
    assert torch.equal(v[:, 1:].flatten(), torch.from_numpy(flat[1: 1 + v.shape[0] * 32].astype(np.int64)))


# ------------------------------------------------------------------ fast training forwards
@pytest.mark.parametrize("name", ["smallthinker-test", "smallthinker-test-tied"])
def test_training_forwards_equal_the_model(name):
    model = random_model(name, seed=2, std=0.1).train()
    x = torch.randint(0, model.config.vocab_size, (3, 20))  # longer than the window of 8

    def run():
        model.zero_grad()
        logits, rl = model(x, output_router_logits=True)
        (logits.square().mean() + sum(r.square().mean() for r in rl)).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run()
    with training_forwards(model):
        fast_logits, fast_grads = run()
    assert torch.allclose(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert set(ref_grads) <= set(fast_grads)
    for n, g in fast_grads.items():  # an expert that got no token has no grad in the loop, zeros in the dense path
        assert torch.allclose(g, ref_grads.get(n, torch.zeros_like(g)), rtol=1e-4, atol=1e-6), n
    # the swap is undone: the instance forwards are gone
    assert "forward" not in vars(model.model.layers[0].block_sparse_moe)


# ------------------------------------------------------------------ the trainer
def test_training_lowers_the_loss_and_logs_every_step(straight):
    out, summary = straight
    log = rows(out / "train_log.jsonl")
    assert [int(r["step"]) for r in log] == list(range(30))
    assert list(log[0]) == ["step", "tokens", "lr", "loss", "ce", "balance", "bal_sequence", "bal_batch",
                            "z_loss", "load_entropy", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
                            *[f"ce_{d}" for d in DOMAINS]]
    assert all(r["mfu"] is None and r["tokens_per_s"] > 0 for r in log)  # no known peak on a CPU
    first = np.mean([float(r["ce"]) for r in log[:3]])
    last = np.mean([float(r["ce"]) for r in log[-3:]])
    assert last < first - 1.0, (first, last)  # from ~log(128)=4.85 towards the patterns' entropy
    assert float(log[-1]["lr"]) == pytest.approx(0.1 * RUN["lr"])
    assert all(0 < float(r["load_entropy"]) <= 1 for r in log)
    assert all(float(r["balance"]) == float(r["bal_batch"]) for r in log)  # the default group: the batch
    ev = rows(out / "eval_log.jsonl")
    assert sorted(r["domain"] for r in ev) == DOMAINS and all(int(r["step"]) == 30 for r in ev)
    assert summary["tokens_seen"] == 30 * 8 * 32 and summary["steps_done"] == 30
    assert max(summary["val_ce"].values()) < math.log(128) - 1.0


def test_export_is_a_loadable_bf16_checkpoint(straight):
    from smallthinker_lab.model.checkpoint import load_model

    out, summary = straight
    assert summary["export_dir"] == str(out / "model")
    model = load_model(out / "model")
    assert model.dtype == torch.bfloat16
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    ref = SmallThinkerForCausalLM(model.config)
    ref.load_state_dict(state)
    # the export is exactly the bf16 rounding of the trained weights: the same model in fp32 gives the same logits
    exported = model.state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(exported[name], t.to(torch.bfloat16)), name
    x = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.float()(x).logits, ref.to(torch.bfloat16).float()(x).logits)


def test_resume_continues_bit_identically(corpus, straight, tmp_path):
    out, _ = straight
    half = train("smallthinker-test", corpus, tmp_path, stop_at=15, **RUN)
    assert half["steps_done"] == 15 and half["export_dir"] is None
    # deterministic: an independent run of the same seed reproduces the first half exactly
    assert without_timing(rows(tmp_path / "train_log.jsonl")) == without_timing(rows(out / "train_log.jsonl"))[:15]
    train("smallthinker-test", corpus, tmp_path, **RUN)  # resumes from step 15
    assert without_timing(rows(tmp_path / "train_log.jsonl")) == without_timing(rows(out / "train_log.jsonl"))
    with pytest.raises(ValueError, match="batch_size"):
        train("smallthinker-test", corpus, tmp_path, **{**RUN, "batch_size": 4})


def test_another_seed_and_the_microbatch_loss_change_the_run(corpus, straight, tmp_path):
    out, _ = straight
    ref = rows(out / "train_log.jsonl")
    other = train("smallthinker-test", corpus, tmp_path / "seed", stop_at=3, **{**RUN, "seed": 1})
    assert other["steps_done"] == 3
    assert rows(tmp_path / "seed" / "train_log.jsonl")[0]["loss"] != ref[0]["loss"]
    train("smallthinker-test", corpus, tmp_path / "mb", stop_at=3, **{**RUN, "balance_group": "micro-batch"})
    mb = rows(tmp_path / "mb" / "train_log.jsonl")
    assert mb[0]["ce"] == ref[0]["ce"]  # same init and data
    assert all(r["balance"] == r["bal_sequence"] for r in mb)  # micro-batches of 1 sequence
    assert mb[2]["ce"] != ref[2]["ce"]  # a different loss trains differently


def test_cli_trains(corpus, tmp_path):
    from smallthinker_lab.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "smallthinker-test", "--data", str(corpus), "--out",
                              str(tmp_path), "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--device",
                              "cpu", "--balance-group", "micro-batch", "--microbatch-size", "2", "--no-progress"])
    assert args.func(args) == 0
    assert len(rows(tmp_path / "train_log.jsonl")) == 2
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_a_failing_compile_falls_back_to_eager(corpus, straight, tmp_path, monkeypatch, capsys):
    import smallthinker_lab.train.trainer as trainer

    def broken(model):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler on this machine")
        return compiled

    monkeypatch.setattr(trainer.torch, "compile", broken)
    summary = train("smallthinker-test", corpus, tmp_path, stop_at=3, **{**RUN, "compile": True})
    assert summary["compiled"] is False and summary["steps_done"] == 3
    assert "torch.compile failed (RuntimeError: no C++ compiler" in capsys.readouterr().err
    out, _ = straight  # the eager run: the fallback trained exactly as it does
    assert without_timing(rows(tmp_path / "train_log.jsonl")) == without_timing(rows(out / "train_log.jsonl"))[:3]


def test_the_wide_preset_has_smallthinker_proportions():
    from smallthinker_lab.model.config import SmallThinkerConfig

    cfg = SmallThinkerConfig.from_name("smallthinker-tiny-wide")
    assert cfg.moe_ffn_hidden_size >= 128 and cfg.moe_ffn_hidden_size == cfg.hidden_size // 2  # half the hidden
    assert cfg.num_experts >= 16 and cfg.top_k >= 2 and cfg.top_k / cfg.num_experts == 4 / 32  # the 4B's share
    assert not cfg.moe_primary_router_apply_softmax  # sigmoid routing
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    L = cfg.num_hidden_layers
    pattern = [i % 4 != 0 for i in range(L)]  # 1 NoPE-global : 3 RoPE-window
    assert [cfg.is_sliding(i) for i in range(L)] == [cfg.uses_rope(i) for i in range(L)] == pattern
    assert cfg.sliding_window_size <= 64  # shorter than most prompts (median 66-146 tokens)
    with torch.device("meta"):
        n = SmallThinkerForCausalLM(cfg).num_parameters()
    assert n == 16_290_048 and 2 * n <= 48e6  # bf16 weights, tied embedding counted once
