"""Interventions: edit hooks, expert ablation / forcing / scaling (model and engine), token ids in recordings."""

import pytest
import torch
from conftest import random_model

import smallthinker_lab as sl
from smallthinker_lab.interventions import InterventionError, hook_names, hooks, intervene
from smallthinker_lab.model import generate

pytestmark = pytest.mark.usefixtures("one_thread")
PRESETS = ["smallthinker-test", "smallthinker-test-tied"]  # sigmoid and softmax routers


def _prompt(n=12, seed=0, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return random_model(request.param)


@torch.no_grad()
def reference_logits(model, ids, ablate=None, force=None, scale=None, mode="route"):
    """The forward written out token by token, with the intervention applied by hand: (1, T, V)."""
    cfg, m = model.config, model.model
    ablate, force, scale = ablate or {}, force or {}, scale or {}
    K, H = cfg.top_k, cfg.hidden_size
    T = ids.shape[1]
    positions = torch.arange(T)
    x = m.embed_tokens(ids)
    rope = m.rotary(positions, x.dtype) if any(cfg.rope_layout) else None
    for i, layer in enumerate(m.layers):
        moe = layer.block_sparse_moe
        logits = x.reshape(-1, H) @ moe.primary_router.weight.T  # (N, E)
        if mode == "route" and i in ablate:
            logits[:, ablate[i]] = float("-inf")
        chosen = logits.topk(K, dim=-1).indices
        if i in force:
            chosen = torch.tensor(force[i]).expand(T, K)
        top = logits.gather(-1, chosen)
        w = torch.softmax(top, -1) if cfg.moe_primary_router_apply_softmax else torch.sigmoid(top) / torch.sigmoid(
            top).sum(-1, keepdim=True)
        x = x + layer.self_attn(layer.input_layernorm(x), positions, rope)
        u = layer.post_attention_layernorm(x).reshape(-1, H)
        y = torch.zeros_like(u)
        for n in range(T):
            for slot in range(K):
                e = int(chosen[n, slot])
                factor = 0.0 if (mode == "zero" and e in ablate.get(i, [])) else scale.get(i, {}).get(e, 1.0)
                y[n] += w[n, slot] * factor * moe.experts[e](u[n:n + 1])[0]
        x = x + y.view_as(x)
    return model.lm_head(m.norm(x))


CASES = {
    "ablate": dict(ablate={0: [0, 3], 2: [1, 5, 6]}),
    "ablate-zero": dict(ablate={1: [2, 4], 3: [0]}, mode="zero"),
    "force": dict(force={0: [7, 1], 3: [2, 5]}),
    "scale": dict(scale={1: {0: 2.5, 6: -1.0}, 2: {3: 0.0}}),
    "mixed": dict(ablate={0: [1]}, force={2: [0, 4]}, scale={3: {5: 0.5}}),
}


def _intervene(target, case):
    kw = dict(CASES[case])
    mode = kw.pop("mode", "route")
    return intervene(target, ablate_mode=mode, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_intervention_equals_a_direct_recomputation_in_prefill(model, case):
    ids = _prompt(12)
    kw = dict(CASES[case])
    expected = reference_logits(model, ids, **kw)
    plain = model(ids).logits
    with torch.no_grad(), _intervene(model, case):
        got = model(ids).logits
    # 1e-5 absolute or relative: the hooked forward and the direct recomputation sum in fp32 in different orders
    # (seen 1.06e-5 apart on a logit of the tied-embedding model, AMD EPYC)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the intervention changed something
    assert len(model.hooks) == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_intervention_equals_a_direct_recomputation_in_step_decode(model, case):
    ids = _prompt(11, seed=1)
    expected = reference_logits(model, ids, **CASES[case])
    cache = model.new_cache()
    with torch.no_grad(), _intervene(model, case):
        model(ids[:, :8], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 11)]
    # 1e-5 absolute or relative: the KV-cache path rounds differently from the full forward even without an
    # intervention (seen: 1.3e-5 on a logit of 1.7)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 8:], atol=1e-5, rtol=1e-5)


def test_route_ablation_never_routes_to_ablated_experts_and_weights_sum_to_one(model):
    with torch.no_grad(), intervene(model, ablate={1: [0, 1, 2]}), sl.record(model, kinds="experts") as rec:
        model(_prompt(16))
    ids, w = rec["layers.1.moe.topk_ids"], rec["layers.1.moe.topk_weights"]
    assert not set(ids.ravel()) & {0, 1, 2}
    assert abs(w.sum(-1) - 1).max() < 1e-5


def test_forced_routing_is_what_record_sees(model):
    with torch.no_grad(), intervene(model, force={2: [6, 3]}), sl.record(model, kinds="experts") as rec:
        model(_prompt(9))
    assert (rec["layers.2.moe.topk_ids"] == [6, 3]).all()


# --------------------------------------------------------------------------------------------------- hooks
def test_identity_hooks_leave_logits_bit_identical(model):
    ids = _prompt(14)
    with torch.no_grad():
        plain = model(ids).logits
        names = [n for n in hook_names(model.config) if not n.endswith("hook_pattern")]  # pattern: see next test
        seen = []
        with hooks(model, {tuple(names): lambda t, name: seen.append(name) or t}):
            got = model(ids).logits
    assert torch.equal(got, plain)
    assert set(seen) >= {n for n in names if ".experts." not in n}  # every point of the forward fired


def test_pattern_hook_sees_probabilities_and_can_edit_them(model):
    ids = _prompt(10)
    patterns = {}

    def keep(p, name):
        patterns[name] = p.clone()

    with torch.no_grad():
        plain = model(ids).logits
        with hooks(model, {"blocks.*.attn.hook_pattern": keep}):
            same = model(ids).logits
        torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)  # explicit softmax vs the fused kernel
        p = patterns["blocks.0.attn.hook_pattern"]  # (B, h, T, S)
        assert p.shape == (1, model.config.num_attention_heads, 10, 10)
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        assert p.triu(1).abs().max() == 0  # causal
        uniform = lambda p, name: torch.tril(torch.ones_like(p)) / torch.tril(torch.ones_like(p)).sum(-1, True)  # noqa: E731
        with hooks(model, {"blocks.1.attn.hook_pattern": uniform}):
            edited = model(ids).logits
    assert (edited - plain).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 2])
def test_resid_pre_edit_changes_only_what_follows_layer(model, layer):
    ids = _prompt(12)
    L = model.config.num_hidden_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(L)]

    def run(spec):
        out = {}

        def keep(t, name):
            out[name] = t.clone()

        with torch.no_grad(), hooks(model, [(names, keep), *spec]):
            logits = model(ids).logits
        return out, logits

    before, plain = run([])
    after, edited = run([(f"blocks.{layer}.hook_resid_pre", lambda x, name: x + 0.5)])
    # the hooks of one point run in order: keep registered first sees the layer's own output
    for i in range(layer):
        assert torch.equal(before[names[i]], after[names[i]])
    for i in range(layer, L):
        assert (before[names[i]] - after[names[i]]).abs().max() > 1e-3
    assert (edited - plain).abs().max() > 1e-3


def test_hooks_are_removed_after_an_exception(model):
    def boom(t, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks(model, {"blocks.1.hook_resid_mid": boom}):
        model(_prompt(5))
    assert len(model.hooks) == 0 and model.hooks.edits == 0
    with pytest.raises(KeyboardInterrupt), intervene(model, ablate={0: [1]}):
        raise KeyboardInterrupt
    assert len(model.hooks) == 0 and model.hooks.edits == 0


def test_record_alongside_sees_edited_values(model):
    def double(w, name):
        return w * 2

    with torch.no_grad(), hooks(model, {"blocks.0.moe.hook_topk_weights": double}), \
            sl.record(model, kinds="experts") as rec:
        model(_prompt(6))
    assert abs(rec["layers.0.moe.topk_weights"].sum(-1) - 2).max() < 1e-5


def test_hook_filters(model):
    cfg = model.config
    assert hooks(model, {"blocks.1.hook_resid_pre": print}).names == ["blocks.1.hook_resid_pre"]
    assert hooks(model, {"blocks.*.hook_resid_post": print}).names == [
        f"blocks.{i}.hook_resid_post" for i in range(cfg.num_hidden_layers)]
    assert len(hooks(model, {lambda n: n.endswith("hook_act"): print}).names) == cfg.num_hidden_layers * (
        cfg.num_experts)
    assert hooks(model, [(["hook_final_norm", "blocks.0.attn.hook_q"], print)]).names == [
        "hook_final_norm", "blocks.0.attn.hook_q"]


def test_bad_hook_names_and_returns(model):
    with pytest.raises(ValueError, match="unknown hook point 'blocks.0.hook_resid'"):
        hooks(model, {"blocks.0.hook_resid": print})
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        hooks(model, {"blocks.9.hook_resid_pre": print})
    with pytest.raises(ValueError, match="expert 8 is out of range"):
        hooks(model, {"blocks.0.moe.experts.8.hook_act": print})
    with pytest.raises(ValueError, match="matches no hook point"):
        hooks(model, {"layers.*": print})
    with pytest.raises(ValueError, match=r"returned shape \(1, 3, 2\)"), \
            hooks(model, {"blocks.0.hook_resid_pre": lambda x, n: x[..., :2]}):
        model(_prompt(3))
    with pytest.raises(ValueError, match="expert ids must be in"), \
            hooks(model, {"blocks.0.moe.hook_topk_ids": lambda ids, n: ids + 100}):
        model(_prompt(3))
    assert len(model.hooks) == 0


# --------------------------------------------------------------------------------------- bad intervene() args
def test_error_layer_out_of_range(model):
    with pytest.raises(InterventionError, match="ablate: layer 4 is out of range: the model has 4 layers"):
        intervene(model, ablate={4: [0]})


def test_error_expert_out_of_range(model):
    with pytest.raises(InterventionError, match=r"force\[1\]: expert 8 is out of range"):
        intervene(model, force={1: [0, 8]})


def test_error_duplicate_expert(model):
    with pytest.raises(InterventionError, match=r"ablate\[0\]: expert\(s\) \[2\] given more than once"):
        intervene(model, ablate={0: [2, 2]})


def test_error_forced_list_of_wrong_length(model):
    with pytest.raises(InterventionError, match=r"force\[0\] names 3 experts; .* top_k=2"):
        intervene(model, force={0: [0, 1, 2]})


def test_error_too_many_ablated(model):
    with pytest.raises(InterventionError, match="at least top_k=2 must remain"):
        intervene(model, ablate={0: list(range(7))})
    intervene(model, ablate={0: list(range(7))}, ablate_mode="zero")  # zero keeps the routing: allowed


def test_error_bad_mode_factor_and_types(model):
    with pytest.raises(InterventionError, match="ablate_mode must be 'route' or 'zero'"):
        intervene(model, ablate={0: [1]}, ablate_mode="mask")
    with pytest.raises(InterventionError, match=r"scale\[0\]\[1\] must be a finite number, got nan"):
        intervene(model, scale={0: {1: float("nan")}})
    with pytest.raises(InterventionError, match="layer must be an integer, got '0'"):
        intervene(model, ablate={"0": [1]})
    with pytest.raises(InterventionError, match=r"ablate\[0\] must be a list of experts"):
        intervene(model, ablate={0: 3})


def test_error_layer_both_ablated_and_forced(model):
    with pytest.raises(InterventionError, match="layer 1 is both ablated and forced"):
        intervene(model, ablate={1: [0]}, force={1: [2, 3]})
    with pytest.raises(InterventionError, match=r"expert\(s\) \[3\] are both ablated and scaled"):
        intervene(model, ablate={1: [3]}, scale={1: {3: 2.0}})


# ---------------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    """The offloading engine over the test model's weights, a cache of 6 of its 32 experts, look-ahead on."""
    from smallthinker_lab.engine import Engine
    from smallthinker_lab.model.checkpoint import save_pretrained

    folder = save_pretrained(model, tmp_path_factory.mktemp("engine") / "model")
    probe = Engine.from_pretrained(folder, memory_limit="unlimited", progress=False)
    plan = probe.memory_plan()
    probe.close()
    eng = Engine.from_pretrained(folder, memory_limit=plan["minimum_bytes"] + 4 * plan["expert_slot_bytes"],
                                 lookahead=True, progress=False)
    assert eng.cache.capacity_experts == 6
    yield eng
    eng.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_under_a_memory_limit_gives_the_models_tokens(model, engine, case):
    prompt = _prompt(10, seed=3)[0]
    plain = engine.generate(prompt, 8, stop_tokens=[]).tokens
    with _intervene(model, case):
        expected = generate(model, prompt, 8, stop_tokens=[]).tokens
    engine.reset_stats(clear_cache=True)
    with _intervene(engine, case):
        got = engine.generate(prompt, 8, stop_tokens=[]).tokens
    assert got == expected
    assert got != plain or case == "scale"  # (a scaled expert may leave greedy tokens as they were)
    assert len(engine.hooks) == 0
    st = engine.stats()
    assert st["requests"] == st["hits"] + st["misses"]


def test_engine_prefetch_and_lookahead_follow_the_intervened_routing(engine):
    prompt = _prompt(10, seed=4)[0]
    engine.reset_stats(clear_cache=True)
    with intervene(engine, ablate={1: [0, 1, 2, 3]}, force={2: [5, 6], 3: [7, 0]}):
        engine.generate(prompt, 10, stop_tokens=[])
    trace = engine.trace  # (step, layer, expert) of every request: what was computed
    assert not {e for _, layer, e in trace if layer == 1} & {0, 1, 2, 3}
    assert {e for _, layer, e in trace if layer == 2} == {5, 6}
    assert {e for _, layer, e in trace if layer == 3} == {0, 7}
    # the look-ahead predicts the forced layers exactly (layer 2's and 3's routers are not consulted)
    counted = engine.state.counters
    assert counted.lookahead_predicted[2] > 0 and counted.lookahead_correct[2] == counted.lookahead_predicted[2]
    assert counted.lookahead_correct[3] == counted.lookahead_predicted[3]


def test_engine_act_hook_and_final_norm_hook(model, engine):
    prompt = _prompt(9, seed=5)[0]
    spec = {"blocks.1.moe.experts.3.hook_act": lambda a, n: a * 3.0,
            "blocks.*.hook_resid_mid": lambda x, n: x * 1.1}
    with hooks(model, spec):
        expected = generate(model, prompt, 6, stop_tokens=[]).tokens
    with hooks(engine, spec):
        got = engine.generate(prompt, 6, stop_tokens=[]).tokens
    assert got == expected
    seen = []
    with hooks(engine, {"hook_final_norm": lambda h, n: seen.append(tuple(h.shape))}):
        engine.generate(prompt, 3, stop_tokens=[])
    assert seen[0][-1] == model.config.hidden_size and len(seen) == 3  # prefill + 2 decode steps


def test_engine_explain_names_edit_hooks(engine):
    with intervene(engine, ablate={0: [1]}):
        assert engine.hooks.edits == 1
        if engine.decoder is not None:  # a graph backend (CUDA): its steps run eager, and explain says why
            row = engine.explain().set_index("backend").loc[engine.backend]
            assert "edit hooks" in row["reason"]
    assert engine.hooks.edits == 0


# ------------------------------------------------------------------------------------- token-level drill-down
def test_recorded_token_ids_are_the_prompt_and_generated_tokens(model, engine):
    prompt = _prompt(10, seed=6)[0]
    with sl.record(model, kinds="experts") as rec:
        out = generate(model, prompt, 6, stop_tokens=[]).tokens
    # every forward's input: the prompt, then each generated token fed back (the last one is never fed)
    assert rec["tokens.id"].tolist() == prompt.tolist() + out[:-1]
    with sl.record(engine, kinds="experts") as erec:
        eout = engine.generate(prompt, 6, stop_tokens=[]).tokens
    assert erec["tokens.id"].tolist() == prompt.tolist() + eout[:-1]
    ex = rec.to_dataframe("experts")
    assert (ex["token_id"].to_numpy() == rec["tokens.id"][ex.index // model.config.top_k % len(rec["tokens.id"])]
            ).all()


def test_token_ids_of_a_batched_forward_and_after_concat_and_save(model, tmp_path):
    ids = torch.stack([_prompt(5, seed=1)[0], _prompt(5, seed=2)[0]])
    with torch.no_grad(), sl.record(model, kinds="experts") as rec:
        model(ids)
    assert rec["tokens.id"].tolist() == ids.reshape(-1).tolist()  # rows batch-major, as topk_ids
    both = rec + rec
    assert both["tokens.id"].tolist() == ids.reshape(-1).tolist() * 2
    back = sl.Recording.load(rec.save(tmp_path / "rec"))
    assert back["tokens.id"].tolist() == ids.reshape(-1).tolist()


def test_top_tokens_count_the_tokens_routed_to_an_expert(model):
    prompt = torch.tensor([5, 6, 5, 7, 5, 6, 9, 5, 6, 10, 11, 5])
    with torch.no_grad(), sl.record(model, kinds="experts") as rec:
        model(prompt[None])
    ids, tok = rec["layers.1.moe.topk_ids"], rec["tokens.id"]
    e = int(ids[0, 0])  # an expert token 5 routes to
    top = sl.metrics.top_tokens(rec, 1, e, n=3)
    hit = (ids == e).any(1)
    for row in top.itertuples():
        assert row.routed == int(((tok == row.token_id) & hit).sum())
        assert row.occurrences == int((tok == row.token_id).sum())
        assert row.rate == row.routed / row.occurrences
    assert top["routed"].is_monotonic_decreasing and len(top) <= 3
    with pytest.raises(KeyError, match="layer 7 is not in the recording"):
        sl.metrics.top_tokens(rec, 7, 0)
    with pytest.raises(ValueError, match=r"expert must be an integer in \[0, 8\), got 8"):
        sl.metrics.top_tokens(rec, 1, 8)


def test_token_pieces_from_the_default_models_tokenizer():
    m = sl.load_model("default")
    text = "def add(a, b):"
    with sl.record(m, kinds="experts") as rec:
        out = m.generate(text, 3, stop_tokens=[])
    ids = rec["tokens.id"]
    assert rec["tokens.piece"].tolist() == [m.tokenizer.decode([t]) for t in ids.tolist()]
    assert "".join(rec["tokens.piece"][:len(ids) - 2]) == text
    assert ids[-2:].tolist() == out.tokens[:2]
    top = sl.metrics.top_tokens(rec, 0, int(rec["layers.0.moe.topk_ids"][0, 0]))
    assert "token" in top.columns


# ---------------------------------------------------------------------------------------- logit lens, table
def test_logit_lens_last_layer_is_the_models_output(model):
    from smallthinker_lab.interventions import logit_lens

    ids = _prompt(7, seed=8)[0]
    df = logit_lens(model, ids, top=3)
    L, V = model.config.num_hidden_layers, model.config.vocab_size
    assert len(df) == L * 7 * 3 and set(df["layer"]) == set(range(L))
    with torch.no_grad():
        p = torch.softmax(model(ids[None]).logits[0].float(), -1)  # (T, V)
    last = df[df["layer"] == L - 1]
    top = p.topk(3, -1)
    assert last["pred_id"].tolist() == top.indices.reshape(-1).tolist()
    assert abs(last["prob"].to_numpy() - top.values.reshape(-1).numpy()).max() < 1e-5
    nxt = last[last["rank"] == 0]["next_prob"].to_numpy()
    assert abs(nxt[:-1] - p[torch.arange(6), ids[1:]].numpy()).max() < 1e-5 and torch.isnan(torch.tensor(nxt[-1]))
    assert (df.groupby(["layer", "position"])["prob"].apply(lambda s: s.is_monotonic_decreasing)).all()
    assert V >= 3


def test_logit_lens_bad_arguments(model):
    from smallthinker_lab.interventions import logit_lens

    with pytest.raises(ValueError, match=r"layers \[4\] are out of range"):
        logit_lens(model, [1, 2, 3], layers=[4])
    with pytest.raises(ValueError, match="top must be an integer"):
        logit_lens(model, [1, 2, 3], top=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        logit_lens(model, "text without a tokenizer")


class _ByteTokenizer:  # a toy tokenizer for a random test model: bytes mod the vocabulary
    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text):
        return {"input_ids": [3 + b % (self.vocab - 3) for b in text.encode()]}


def test_causal_specialisation_table(model):
    from smallthinker_lab.interventions import causal_specialisation

    texts = {"a": ["hello world, " * 3 + str(i) for i in range(4)], "b": ["0123456789 " * 3 + str(i) for i in
                                                                           range(4)]}
    r = causal_specialisation(model, texts, m=2, seeds=(0, 1), n_profile=2, n_eval=2, max_tokens=24,
                              tokenizer=_ByteTokenizer(model.config.vocab_size), progress=False)
    t = r.table
    assert list(dict.fromkeys(t["ablated"])) == ["none", "a", "b", "random (seed 0)", "random (seed 1)"]
    assert (t[t["ablated"] == "none"]["ratio"] == 1).all() and len(t) == 10
    assert all(len(v) == 2 for sets in r.hot.values() for v in sets.values())
    assert r.random_sets[0] != r.random_sets[1]
    # the hot set is the most frequent experts of the profile texts, and the perplexity is the intervened model's
    f = r.frequency[(r.frequency["dataset"] == "a") & (r.frequency["layer"] == 0)]
    assert r.hot["a"][0] == f.sort_values(["frequency", "expert"], ascending=[False, True])["expert"].head(2).tolist()
    tok = _ByteTokenizer(model.config.vocab_size)
    seqs = [torch.tensor(tok(x)["input_ids"][:24]) for x in texts["b"][2:]]
    with torch.no_grad(), intervene(model, ablate=r.hot["a"]):
        nll = sum(-torch.log_softmax(model(s[None, :-1]).logits[0], -1)[torch.arange(len(s) - 1), s[1:]].sum()
                  for s in seqs)
    row = t[(t["ablated"] == "a") & (t["domain"] == "b")].iloc[0]
    assert abs(row["ppl"] - float(torch.exp(nll / sum(len(s) - 1 for s in seqs)))) < 1e-3 * row["ppl"]
    assert set(r.summary()["domain"]) == {"a", "b"}
    with pytest.raises(ValueError, match="m must be an integer in"):
        causal_specialisation(model, texts, m=7, tokenizer=tok)


@pytest.mark.gpu
def test_kernel_backend_steps_run_eager_under_an_intervention_and_explain_says_so():
    from smallthinker_lab.engine import Engine
    from smallthinker_lab.kernels import unavailable_reason

    if unavailable_reason("cuda"):
        pytest.skip(unavailable_reason("cuda"))
    prompt = "def add(a, b):"
    with Engine.from_pretrained("default", memory_limit=None, device="cuda", dtype=torch.bfloat16,
                                progress=False) as e:
        force = {i: list(range(e.config.top_k)) for i in range(e.config.num_hidden_layers)}  # the first k experts
        assert e.backend == "kernels"
        plain = e.generate(prompt, 12, stop_tokens=[]).tokens
        assert e.explain().set_index("backend").loc["kernels", "reason"] is None
        with intervene(e, force=force):
            assert not e.decoder.usable()
            assert "edit hooks" in e.explain().set_index("backend").loc["kernels", "reason"]
            forced = e.generate(prompt, 12, stop_tokens=[]).tokens
    with Engine.from_pretrained("default", memory_limit=None, device="cuda", dtype=torch.bfloat16, backend="eager",
                                exact=True, progress=False) as eager, intervene(eager, force=force):
        assert eager.generate(prompt, 12, stop_tokens=[]).tokens == forced
    assert forced != plain
