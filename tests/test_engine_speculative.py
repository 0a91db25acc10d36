"""Speculative decoding with the offloading engine as target: greedy tokens are the engine's own at any memory
limit, sampling is reproducible, the KV cache rolls back exactly and the counters add up."""

import pytest
import torch

import smallthinker_lab as sl
from smallthinker_lab import DenseConfig, DenseForCausalLM, Engine
from smallthinker_lab.prompt_sets import load_prompt_set
from smallthinker_lab.resources import default_draft_dir

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 24  # new tokens after a prompt of PROMPT_LEN: the sequence passes the sliding window (64) of the default model
PROMPT_LEN = 118


@pytest.fixture(scope="module")
def draft():
    return sl.load_model(default_draft_dir(), dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt():
    return sl.load_tokenizer("default")(load_prompt_set("humaneval")[0])["input_ids"][:PROMPT_LEN]


@pytest.fixture(scope="module")
def minimum():
    with Engine("default", memory_limit=None, dtype=torch.float32, progress=False) as e:
        return e.plan.minimum_bytes + 3 * e.bundle.stride  # the cache holds top_k + 3 experts of 256


@pytest.fixture(scope="module", params=["unlimited", "small"])
def engine(request, minimum, prompt):
    limit = None if request.param == "unlimited" else minimum
    with Engine("default", memory_limit=limit, dtype=torch.float32, progress=False) as e:
        e.reference = list(e.generate(prompt, NEW, stop_tokens=[]))
        yield e


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equals_the_engines_own_output(engine, draft, prompt, k):
    engine.reset_stats()
    got = sl.generate(engine, prompt, NEW, stop_tokens=[], draft=draft, draft_tokens=k)
    assert list(got) == engine.reference
    spec, st = got.stats.speculative, engine.stats()
    assert spec.decode_tokens == NEW - 1 and spec.draft_tokens == k
    assert 0 < spec.acceptance_rate < 1  # acceptances and rejections both happened
    # every decode round is one verify forward of its draft tokens + 1; what was not kept was rolled back
    assert st["verify_forwards"] == spec.target_forwards == spec.rounds and st["decode_tokens"] == 0
    assert st["prefill_tokens"] == len(prompt)
    assert st["verify_tokens"] == spec.rounds + spec.draft_forwards
    assert st["rolled_back_tokens"] == st["verify_tokens"] - spec.decode_tokens
    assert engine.kv.seq_len == len(prompt) + NEW - 1  # the last token is never fed back
    assert st["requests"] == st["hits"] + st["misses"]
    if engine.plan.limit is not None:
        assert st["misses"] > 0 and st["evictions"] > 0  # the small limit really streams experts


def test_sampling_with_a_seed_is_reproducible(minimum, draft, prompt):
    with Engine("default", memory_limit=minimum, dtype=torch.float32, progress=False) as e:
        kw = dict(stop_tokens=[], draft=draft, draft_tokens=3, temperature=0.8)
        runs = [list(e.generate(prompt, NEW, seed=7, **kw)) for _ in range(2)]
        other = list(e.generate(prompt, NEW, seed=8, **kw))
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_truncate_acts_as_if_the_positions_were_never_run(prompt):
    """A verify forward of 6 tokens past the full sliding window, truncated to 2 of them: the next logits equal
    those of an engine that ran only the 2 (to float rounding); truncating further back than the forward's start
    is refused, because the rings no longer hold what the shorter sequence needs."""
    ids = torch.tensor([prompt + prompt[:20]])  # 138 positions > the default model's window (64)
    drafted, kept, nxt = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[5, 6]]), torch.tensor([[11]])
    with Engine("default", memory_limit=None, dtype=torch.float32, progress=False) as a, \
            Engine("default", memory_limit=None, dtype=torch.float32, progress=False) as b:
        a.forward(ids), b.forward(ids)
        logits = a.forward(drafted, all_logits=True)
        assert logits.shape == (1, 6, a.config.vocab_size)
        a.truncate(ids.shape[1] + 2)
        want = b.forward(kept, all_logits=True)
        assert (logits[:, :2] - want).abs().max() < 1e-4  # the verify forward's rows are the positions' logits
        got, want = a.forward(nxt), b.forward(nxt)
        assert (got - want).abs().max() < 1e-4
        assert a.kv.bytes_per_layer() == b.kv.bytes_per_layer()
        assert a.stats()["rolled_back_tokens"] == 4 and a.stats()["verify_tokens"] == 6
        window = a.config.sliding_window_size
        with pytest.raises(ValueError, match=f"sliding-window layers .*window {window}.* no longer hold"):
            a.truncate(ids.shape[1] - 1)
        with pytest.raises(ValueError, match="must be in"):
            a.truncate(a.kv.seq_len + 1)
        with pytest.raises(ValueError, match="must be an integer"):
            a.truncate(3.0)


def test_a_draft_of_another_tokenizer_or_device_is_refused(prompt):
    other = DenseForCausalLM(DenseConfig.from_name("dense-test")).init_weights(0)  # vocabulary 128
    with Engine("default", memory_limit=None, progress=False) as e:
        with pytest.raises(ValueError, match="do not share a tokenizer .*vocab_size 8192.* 128"):
            e.generate(prompt, 4, draft=other)
        with pytest.raises(ValueError, match="is not an in-memory model"):
            e.generate(prompt, 4, draft=e)
        with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1"):
            sl.generate(e, prompt, 4, draft=sl.load_model(default_draft_dir()), draft_tokens=0)
