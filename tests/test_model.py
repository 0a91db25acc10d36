"""The model against direct computations: sizes, cache equivalence, windows, NoPE, routing, MoE, config, generation."""

import json
import math

import pytest
import torch
from conftest import random_model

from smallthinker_lab import ConfigError, SmallThinkerConfig, SmallThinkerForCausalLM, generate, kv_cache_bytes
from smallthinker_lab.model.attention import attention_mask
from smallthinker_lab.model.moe import route_weights

WINDOW = 8  # sliding_window_size of "smallthinker-test"


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(n: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def meta_model(name: str, **overrides) -> SmallThinkerForCausalLM:
    with torch.device("meta"):
        return SmallThinkerForCausalLM(SmallThinkerConfig.from_name(name, **overrides))


# ------------------------------------------------------------------ sizes
def test_parameter_counts_of_the_released_shapes():
    m4 = meta_model("smallthinker-4b-a0.6b")
    assert m4.num_parameters(include_lm_head=False) == 4_035_085_824
    assert m4.num_parameters() == 4_035_085_824  # tied: the head is the embedding, counted once
    assert m4.lm_head.weight is m4.model.embed_tokens.weight
    assert sum(p.numel() for p in m4.model.layers[0].parameters()) == 118_803_456
    untied = meta_model("smallthinker-4b-a0.6b", tie_word_embeddings=False)
    assert untied.num_parameters() == 4_268_459_520
    m21 = meta_model("smallthinker-21b-a3b")
    assert sum(p.numel() for p in m21.model.layers[0].parameters()) == 398_627_840
    assert round(m21.num_parameters(include_lm_head=False) / 1e9, 2) == 21.12
    assert round(m21.num_parameters() / 1e9, 2) == 21.51


# ------------------------------------------------------ cache equivalence
@pytest.mark.parametrize("chunks", [[1] * 40, [13] + [1] * 27, [5, 11, 1, 1, 20, 2]],
                         ids=["token-by-token", "prefill-longer-than-window", "mixed-chunks"])
def test_cached_decoding_matches_full_prefill(chunks):
    model = random_model()
    ids = tokens(40)
    with torch.no_grad():
        full = model(ids).logits  # (1, 40, V)
        cache, outs, start = model.new_cache(), [], 0
        for n in chunks:
            outs.append(model(ids[:, start:start + n], cache=cache).logits)
            start += n
    assert cache.seq_len == 40 and cache[1].capacity == WINDOW  # the sliding layers' ring wrapped
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-4


# ---------------------------------------------------------- sliding window
def test_attention_mask_allows_exactly_the_window():
    pos = torch.arange(20)
    expected = torch.tensor([[0 <= q - k < WINDOW for k in range(20)] for q in range(20)])
    assert torch.equal(attention_mask(pos, pos, WINDOW), expected)
    assert torch.equal(attention_mask(pos, pos, None), torch.tensor([[k <= q for k in range(20)] for q in range(20)]))
    # ring-buffer order with an empty slot (-1): decided by positions, never by slot
    k_pos = torch.tensor([16, 17, 18, 19, 12, 13, -1, 15])
    got = attention_mask(torch.tensor([19]), k_pos, WINDOW)[0]
    assert got.tolist() == [True, True, True, True, True, True, False, True]
    assert attention_mask(torch.tensor([20]), k_pos, WINDOW)[0].tolist()[4] is False  # 20 - 12 = 8 = window


def test_sliding_layer_ignores_keys_outside_the_window():
    model = random_model()
    attn = model.model.layers[1].self_attn
    assert attn.window == WINDOW
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(20)
    rope = model.model.rotary(pos, x.dtype)
    q = 15

    def query_changes(k: int) -> bool:
        x2 = x.clone()
        x2[0, k] += 3.0
        with torch.no_grad():
            return not torch.equal(attn(x2, pos, rope)[0, q], attn(x, pos, rope)[0, q])

    assert not query_changes(q - WINDOW) and not query_changes(2)  # distance >= window: masked
    assert query_changes(q - WINDOW + 1) and query_changes(q)  # inside the window
    assert model.model.layers[0].self_attn.window is None  # the NoPE layer is global


# --------------------------------------------------- NoPE / RoPE, directly
def direct_attention(attn, x: torch.Tensor, rope_theta: float | None, window: int | None) -> torch.Tensor:
    """Attention for one sequence x (T, H) in float64 with explicit loops of matrices; RoPE if rope_theta."""
    T, h, kv, D = x.shape[0], attn.n_heads, attn.n_kv, attn.head_dim
    x = x.double()
    q = (x @ attn.q_proj.weight.double().T).view(T, h, D)
    k = (x @ attn.k_proj.weight.double().T).view(T, kv, D)
    v = (x @ attn.v_proj.weight.double().T).view(T, kv, D)
    if rope_theta is not None:
        inv_freq = rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, D/2)
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]

        def rot(t):
            a, b = t[..., : D // 2], t[..., D // 2:]
            return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

        q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # query head i -> kv i // rep
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    qp, kp = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (kp <= qp) & ((qp - kp < window) if window else True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, h * D)
    return out @ attn.o_proj.weight.double().T


def test_nope_layer_uses_unrotated_projections_and_rope_layer_rotates():
    model = random_model()
    theta = model.config.rope_theta
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(20)
    rope = model.model.rotary(pos, x.dtype)
    nope, roped = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert (nope.use_rope, roped.use_rope) == (False, True)
    with torch.no_grad():
        out_nope, out_rope = nope(x, pos, rope)[0].double(), roped(x, pos, rope)[0].double()
        assert torch.allclose(out_nope, direct_attention(nope, x[0], None, None), atol=1e-5)
        assert not torch.allclose(out_nope, direct_attention(nope, x[0], theta, None), atol=1e-3)
        assert torch.allclose(out_rope, direct_attention(roped, x[0], theta, WINDOW), atol=1e-5)
        assert not torch.allclose(out_rope, direct_attention(roped, x[0], None, WINDOW), atol=1e-3)


def test_casting_the_model_keeps_rope_frequencies_in_fp32():
    # the reference builds cos/sin in fp32; bf16 frequencies would be off by radians at long positions
    model = random_model().to(torch.bfloat16)
    assert model.model.rotary.inv_freq.dtype == torch.float32
    pos = torch.arange(0, 4096, 7)
    cos, _ = model.model.rotary(pos, torch.float32)
    D = model.config.head_dim
    inv_freq = 1.0 / (model.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = pos.double()[:, None] * inv_freq
    assert (cos - torch.cat((angle, angle), -1).cos()).abs().max() < 1e-3
    meta_model("smallthinker-test").to_empty(device="cpu")  # materialising a meta model still works


# ----------------------------------------------------------------- routing
@pytest.mark.parametrize("preset,softmax", [("smallthinker-test", False), ("smallthinker-test-tied", True)])
def test_routing_matches_a_direct_computation(preset, softmax):
    block = random_model(preset).model.layers[0].block_sparse_moe
    assert block.apply_softmax is softmax
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(3)) * 2
    ids, weights = block.select(logits)
    top, expected_ids = torch.topk(logits, 2, dim=-1)
    expected = torch.softmax(top, -1) if softmax else torch.sigmoid(top) / torch.sigmoid(top).sum(-1, keepdim=True)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(ids, torch.topk(torch.sigmoid(logits), 2).indices)  # the same experts as top-k of probabilities
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    other = route_weights(logits, 2, not softmax)[1]
    assert not torch.allclose(weights, other, atol=1e-3)  # the two rules differ


def test_moe_block_equals_a_per_token_sum_over_its_experts():
    model = random_model()
    block = model.model.layers[2].block_sparse_moe
    g = torch.Generator().manual_seed(4)
    u, residual = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        logits = block.route(residual)  # (2, 5, E)
        y = block(u, logits)
    for b in range(2):
        for t in range(5):
            top, ids = torch.topk(logits[b, t], 2)
            w = torch.sigmoid(top) / torch.sigmoid(top).sum()
            want = torch.zeros(64, dtype=torch.float64)
            for wk, e in zip(w.tolist(), ids.tolist()):
                ex = block.experts[e]
                x = u[b, t].double()
                hidden = (ex.up.weight.double() @ x) * torch.relu(ex.gate.weight.double() @ x)
                want += wk * (ex.down.weight.double() @ hidden)
            assert torch.allclose(y[b, t].double(), want, atol=1e-5)


# ---------------------------------------------------------------- KV cache
def test_kv_cache_bytes_of_the_21b_hybrid_layout():
    cfg = SmallThinkerConfig.from_name("smallthinker-21b-a3b")
    assert kv_cache_bytes(cfg, 16384) == 2048 * (13 * 16384 + 39 * 4096)
    assert kv_cache_bytes(cfg, 16384, all_global=True) == 2048 * 52 * 16384
    assert kv_cache_bytes(SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"), 32768) == 2**30


def test_live_cache_reports_the_analytic_bytes_per_layer():
    model = random_model()
    cfg, ids = model.config, tokens(40, seed=5)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :3], cache=cache)
        for t in range(3, 40):
            assert cache.bytes_per_layer() == kv_cache_bytes(cfg, t, torch.float32, per_layer=True)
            model(ids[:, t:t + 1], cache=cache)
    assert cache.bytes_per_layer() == kv_cache_bytes(cfg, 40, torch.float32, per_layer=True)
    assert cache.bytes_per_layer()[1] == 2 * 2 * 16 * 4 * WINDOW  # sliding layers stop growing at the window


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides,message", [
    (dict(rope_layout=[1, 1, 1]), "rope_layout has 3 entries but num_hidden_layers is 4"),
    (dict(sliding_window_layout=[0] * 5), "sliding_window_layout has 5 entries but num_hidden_layers is 4"),
    (dict(num_attention_heads=3), r"num_attention_heads \(3\) is not divisible by num_key_value_heads \(2\)"),
    (dict(moe_num_active_primary_experts=9), r"moe_num_active_primary_experts \(9\) is larger than .*\(8\)"),
    (dict(model_type="mixtral"), "unknown model_type 'mixtral'"),
])
def test_invalid_configs_raise_a_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SmallThinkerConfig.from_name("smallthinker-test", **overrides)


def test_config_json_round_trip_keeps_unknown_keys(tmp_path):
    d = SmallThinkerConfig.from_name("smallthinker-test").to_dict()
    d.update(auto_map={"AutoConfig": "configuration_smallthinker.SmallThinkerConfig"}, transformers_version="4.53.3",
             max_length=None)
    (tmp_path / "in.json").write_text(json.dumps(d))
    cfg = SmallThinkerConfig.from_json(tmp_path / "in.json")
    assert cfg.extra["transformers_version"] == "4.53.3"
    out = cfg.save(tmp_path / "out")
    assert json.loads(out.read_text()) == d
    again = SmallThinkerConfig.from_json(out).save(tmp_path / "again")
    assert again.read_bytes() == out.read_bytes()


# -------------------------------------------------------------- generation
def test_greedy_generation_is_deterministic():
    model, prompt = random_model(), tokens(6).tolist()[0]
    a = generate(model, prompt, max_new_tokens=20, stop_tokens=[])
    assert len(a) == 20 and a == generate(model, prompt, max_new_tokens=20, stop_tokens=[])


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds():
    model, prompt = random_model(), tokens(6).tolist()[0]
    run = lambda seed: generate(model, prompt, max_new_tokens=30, temperature=1.5, seed=seed, stop_tokens=[])
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_sampling_equals_greedy():
    model, prompt = random_model(), tokens(6).tolist()[0]
    greedy = generate(model, prompt, max_new_tokens=15, stop_tokens=[])
    assert generate(model, prompt, max_new_tokens=15, temperature=1.0, top_k=1, seed=7, stop_tokens=[]) == greedy


def test_stop_tokens_stop_generation():
    model, prompt = random_model(), tokens(6).tolist()[0]
    free = generate(model, prompt, max_new_tokens=20, stop_tokens=[])
    stop = free[4]
    first = free.index(stop)
    assert generate(model, prompt, max_new_tokens=20, stop_tokens=[stop]) == free[:first + 1]


def test_a_prompt_longer_than_the_context_raises():
    model = random_model()
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
        generate(model, tokens(513).tolist()[0], max_new_tokens=2)
