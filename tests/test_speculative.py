"""Speculative decoding: greedy tokens are the target's own, sampled tokens follow the target's distribution."""

import itertools
import math

import pytest
import torch

import smallthinker_lab as sl
from smallthinker_lab import DenseConfig, DenseForCausalLM
from smallthinker_lab.model.speculative import layer_draft

pytestmark = pytest.mark.usefixtures("one_thread")


def dense(seed: int, std: float = 0.3, **overrides) -> DenseForCausalLM:
    model = DenseForCausalLM(DenseConfig.from_name("dense-test", **overrides)).init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@pytest.fixture(scope="module")
def default():
    return sl.load_model("default", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt(default):
    return default.tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n")["input_ids"]


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equals_target_on_the_default_model(default, prompt, k):
    """Past the sliding window (64) of the default model, so the ring buffers' rollback is exercised."""
    n = 150 - len(prompt)
    want = sl.generate(default, prompt, max_new_tokens=n, stop_tokens=[])
    got = sl.generate(default, prompt, max_new_tokens=n, stop_tokens=[], draft=layer_draft(default, 2),
                      draft_tokens=k)
    assert list(got) == list(want)
    spec = got.stats.speculative
    assert spec.decode_tokens == n - 1 and spec.draft_tokens == k
    assert 0 < spec.acceptance_rate < 1  # rejections and acceptances both happened
    assert spec.target_forwards_saved == spec.decode_tokens - spec.target_forwards > 0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_equals_target_with_an_unrelated_dense_draft(k):
    """A draft that almost never agrees (another random model): every round is a correction."""
    target, draft = dense(0), dense(1)
    ids = [5, 9, 2, 77, 31]
    want = sl.generate(target, ids, max_new_tokens=40, stop_tokens=[])
    got = sl.generate(target, ids, max_new_tokens=40, stop_tokens=[], draft=draft, draft_tokens=k)
    assert list(got) == list(want)
    assert got.stats.speculative.tokens_per_target_forward >= 1


def test_draft_of_itself_accepts_everything_and_stops_at_stop_tokens(default, prompt):
    want = sl.generate(default, prompt, max_new_tokens=30)
    got = sl.generate(default, prompt, max_new_tokens=30, draft=default, draft_tokens=4)
    assert list(got) == list(want)
    spec = got.stats.speculative
    assert spec.acceptance_rate == 1.0 and spec.acceptance_by_position()[0] == 1.0
    assert spec.tokens_per_target_forward > 3  # k + 1 = 5 per round, less in a short last round


def test_draft_must_share_the_tokenizer(default):
    other = dense(0)  # vocabulary 128, the default model's 8192
    with pytest.raises(ValueError, match="do not share a tokenizer .*vocab_size 8192.* 128"):
        sl.generate(default, [1, 2, 3], max_new_tokens=4, draft=other)
    with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1"):
        sl.generate(default, [1, 2, 3], max_new_tokens=4, draft=default, draft_tokens=0)


def test_kv_truncate_restores_a_sliding_ring(default):
    """Write 6 tokens past a full window, truncate 4 of them: the cache acts as one that never saw them (to float
    rounding: the kept keys were computed in a 6-token forward); without the saved entries it does not."""
    cfg = default.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.sliding_window_size + 10), generator=gen)
    a, b, c = default.new_cache(), default.new_cache(), default.new_cache()
    drafted, kept, nxt = torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[1, 2]]), torch.tensor([[7]])
    with torch.no_grad():
        for cache in (a, b, c):
            default(ids, cache=cache)
        saved = a.save_overwritable(6)
        default(drafted, cache=a)
        a.truncate(b.seq_len + 2, saved)
        default(drafted, cache=c)
        c.truncate(b.seq_len + 2)  # the four oldest entries of each sliding ring are lost
        default(kept, cache=b)
        want = default(nxt, cache=b).logits
        got, lost = default(nxt, cache=a).logits, default(nxt, cache=c).logits
    assert (got - want).abs().max() < 1e-4
    assert (lost - want).abs().max() > 1e-3
    assert a.seq_len == b.seq_len and a.bytes_per_layer() == b.bytes_per_layer()


def test_sampled_output_is_reproducible_with_a_seed(default, prompt):
    draft = layer_draft(default, 2)
    runs = [sl.generate(default, prompt, max_new_tokens=40, draft=draft, draft_tokens=3, temperature=0.8, seed=7,
                        stop_tokens=[]) for _ in range(2)]
    assert list(runs[0]) == list(runs[1])
    other = sl.generate(default, prompt, max_new_tokens=40, draft=draft, draft_tokens=3, temperature=0.8, seed=8,
                        stop_tokens=[])
    assert list(other) != list(runs[0])


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is the normal's 0.999 quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def joint_distribution(model, prompt: list[int], n: int, temperature: float) -> dict[tuple[int, ...], float]:
    """Exact P(t1..tn | prompt) of sampling from ``model`` at ``temperature``, for every sequence of n tokens."""
    V = model.config.vocab_size
    seqs = list(itertools.product(range(V), repeat=n))
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, len(prompt) - 1:-1].double() / temperature, dim=-1)
    tokens = torch.tensor(seqs)
    lp = logp.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    return {s: float(p) for s, p in zip(seqs, lp.exp())}


def test_sampled_tokens_follow_the_targets_distribution():
    """Chi-square of 3,000 speculative samples (3 tokens, vocabulary 4, k = 2, the draft the target's first layer,
    about 2/3 of draft tokens kept) against the target's exact joint distribution, cells of < 5 expected pooled; the
    draft's own distribution is far from the target's, so a rule that kept draft tokens too often would fail."""
    target = dense(0, std=0.15, vocab_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=3)
    draft = layer_draft(target, 1)
    prompt, n, N, temp = [1, 3, 0, 2], 3, 3000, 1.0
    p = joint_distribution(target, prompt, n, temp)
    q = joint_distribution(draft, prompt, n, temp)
    cells = [s for s in p if N * p[s] >= 5]
    rest = [s for s in p if N * p[s] < 5]

    def chi2(counts: dict) -> float:
        stat = sum((counts[s] - N * p[s]) ** 2 / (N * p[s]) for s in cells)
        expected = N * sum(p[s] for s in rest)
        return stat + ((sum(counts[s] for s in rest) - expected) ** 2 / expected if rest else 0.0)

    counts, kept, checked = dict.fromkeys(p, 0), 0, 0
    for seed in range(N):
        out = sl.generate(target, prompt, max_new_tokens=n, draft=draft, draft_tokens=2, temperature=temp, seed=seed,
                          stop_tokens=[])
        counts[tuple(out)] += 1
        kept, checked = kept + sum(out.stats.speculative.accepted), checked + sum(out.stats.speculative.reached)
    critical = chi2_critical(len(cells) - (0 if rest else 1))
    assert 0.3 < kept / checked < 0.95  # both branches of the rule ran often
    assert chi2(counts) < critical, (chi2(counts), critical)
    assert chi2({s: N * q[s] for s in p}) > 20 * critical  # the test tells the draft's distribution apart
