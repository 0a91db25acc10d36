"""Instruments on the model: what record() keeps must equal what the model computed."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_model

import smallthinker_lab as sl
from smallthinker_lab.instruments import KINDS, Recording, names_table
from smallthinker_lab.model import generate


def _prompt(n=12, seed=0, vocab=128):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _run(model, n_new=6, seed=0, **kw):
    with sl.record(model, **kw) as rec:
        out = generate(model, _prompt(seed=seed), n_new, stop_tokens=[])
    return rec, out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def full_rec(model):
    rec, _ = _run(model, full=True)
    return rec


@pytest.mark.parametrize("preset", ["smallthinker-test", "smallthinker-test-tied"])  # sigmoid and softmax routers
def test_topk_weights_sum_to_one_and_ids_distinct(preset):
    m = random_model(preset)
    rec, _ = _run(m, kinds=("experts",))
    K, E = m.config.top_k, m.config.num_experts
    for i in range(m.config.num_hidden_layers):
        ids, w = rec[f"layers.{i}.moe.topk_ids"], rec[f"layers.{i}.moe.topk_weights"]
        assert ids.shape == w.shape == (rec.summary()["tokens"], K)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert all(len(set(row)) == K for row in ids.tolist())
        assert ids.min() >= 0 and ids.max() < E


def test_frequencies_sum_to_k_and_include_cold_experts(full_rec, model):
    freq = sl.metrics.expert_frequency(full_rec.to_dataframe("experts"))
    E, K = model.config.num_experts, model.config.top_k
    assert len(freq) == model.config.num_hidden_layers * E  # experts no token reached are rows too
    np.testing.assert_allclose(freq.groupby(["dataset", "layer"])["frequency"].sum(), K)
    # the derived per-expert token count agrees with the experts frame
    for i in full_rec.layers:
        np.testing.assert_array_equal(freq[freq.layer == i]["tokens"], full_rec[f"layers.{i}.moe.expert_tokens"])


def test_steps_positions_and_router_logits(full_rec, model):
    rec = full_rec
    assert rec["steps.phase"].tolist() == ["prefill"] + ["decode"] * 5
    assert rec["steps.step"].tolist() == list(range(6))
    assert rec["tokens.position"].tolist() == list(range(17))
    # raw logits are kept with full=True and their top-k is the recorded choice
    for i in rec.layers:
        lg = torch.from_numpy(rec[f"layers.{i}.moe.router_logits"])
        ids, _ = model.model.layers[i].block_sparse_moe.select(lg)
        np.testing.assert_array_equal(ids.numpy(), rec[f"layers.{i}.moe.topk_ids"])


def test_sparsity_equals_direct_recomputation(model):
    """Inactive-neuron counts recorded == relu(gate(u)) <= 0 recomputed from the MoE inputs u captured separately."""
    inputs = {i: [] for i in range(model.config.num_hidden_layers)}
    handles = [layer.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: inputs[i].append(out.detach().reshape(-1, out.shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    try:
        rec, _ = _run(model, kinds=("experts", "neurons"), full=("neurons",))
    finally:
        for h in handles:
            h.remove()
    F = model.config.moe_ffn_hidden_size
    neurons = rec.to_dataframe("neurons")
    for i, layer in enumerate(model.model.layers):
        u = torch.cat(inputs[i])  # (N, H)
        ids = rec[f"layers.{i}.moe.topk_ids"]
        tok, ex = rec[f"layers.{i}.moe.routed_token"], rec[f"layers.{i}.moe.routed_expert"]
        # every routed (token, expert) pair appears once, and only those
        assert sorted(zip(tok.tolist(), ex.tolist())) == sorted((n, int(e)) for n, row in enumerate(ids) for e in row)
        counts = np.zeros((model.config.num_experts, F), dtype=np.int64)
        for n, e in zip(tok.tolist(), ex.tolist()):
            with torch.no_grad():
                g = layer.block_sparse_moe.experts[e].gate(u[n])
            counts[e] += (torch.relu(g) > 0).numpy()
        with torch.no_grad():
            expect = np.array([int((torch.relu(layer.block_sparse_moe.experts[e].gate(u[n])) <= 0).sum())
                               for n, e in zip(tok.tolist(), ex.tolist())])
        np.testing.assert_array_equal(rec[f"layers.{i}.moe.inactive_neurons"], expect)
        np.testing.assert_array_equal(rec[f"layers.{i}.moe.neuron_counts"], counts)
        np.testing.assert_array_equal((rec[f"layers.{i}.moe.expert_gate"] <= 0).sum(-1), expect)
        d = neurons[neurons.layer == i]
        np.testing.assert_allclose(d["sparsity"], expect / F)
    nc = rec.to_dataframe("neuron_counts")
    assert set(nc.columns) == {"dataset", "layer", "expert", "neuron", "active", "tokens"}
    assert (nc["active"] <= nc["tokens"]).all()


def test_kv_bytes_equal_analytic_size_at_every_step(model):
    rec, _ = _run(model, n_new=12, kinds=("kv",))  # 12 + 11 positions: beyond the 8-token window
    cfg = model.config
    context = rec["steps.start"] + rec["steps.tokens"]
    for s, T in enumerate(context):
        expect = sl.kv_cache_bytes(cfg, int(T), torch.float32, per_layer=True)
        assert [int(rec[f"layers.{i}.attn.kv_bytes"][s]) for i in range(cfg.num_hidden_layers)] == expect
    kv = rec.to_dataframe("kv")
    assert set(kv["attention"]) == {"global", "sliding"}
    fp = sl.metrics.kv_footprint(kv, cfg)
    np.testing.assert_array_equal(fp["bytes"], [sl.kv_cache_bytes(cfg, int(T), torch.float32) for T in context])
    np.testing.assert_array_equal(fp["all_global_bytes"],
                                  [sl.kv_cache_bytes(cfg, int(T), torch.float32, all_global=True) for T in context])
    assert (fp["global_bytes"] + fp["sliding_bytes"] == fp["bytes"]).all()
    np.testing.assert_array_equal(rec["kv.global_bytes"] + rec["kv.sliding_bytes"], fp["bytes"])


def test_recording_leaves_tokens_unchanged_and_removes_its_hooks(model):
    ids = _prompt(seed=3)
    plain = generate(model, ids, 8, stop_tokens=[])
    foreign = model.hooks.add("router", lambda **kw: None)  # someone else's hook stays
    try:
        with sl.record(model, full=True) as rec:
            assert len(model.hooks) > 1
            recorded = generate(model, ids, 8, stop_tokens=[])
        assert recorded == plain
        assert len(model.hooks) == 1 and model.hooks.active("router")
    finally:
        foreign.remove()
    assert len(model.hooks) == 0
    assert rec.summary()["steps"] == 8


def test_hooks_removed_after_an_exception(model):
    with pytest.raises(RuntimeError, match="boom"):
        with sl.record(model) as rec:
            generate(model, _prompt(), 3, stop_tokens=[])
            raise RuntimeError("boom")
    assert len(model.hooks) == 0
    assert rec.summary()["steps"] == 3  # what was recorded before the exception is kept


def test_exception_inside_a_forward_drops_the_unfinished_step(model):
    def fail(layer, **kw):
        if layer == 2:
            raise ValueError("inside the forward")

    with pytest.raises(ValueError):
        with sl.record(model, kinds=("experts",)) as rec:
            generate(model, _prompt(), 2, stop_tokens=[])
            h = model.hooks.add("router", fail)
            try:
                generate(model, _prompt(), 2, stop_tokens=[])
            finally:
                h.remove()
    assert len(model.hooks) == 0
    assert rec.summary()["steps"] == 2
    assert any("dropped 3 events" in n for n in rec.notes)  # layers 0-2 of the failed forward


@pytest.mark.parametrize("layers, expect", [
    ([0, 2], [0, 2]), (range(1, 3), [1, 2]), (lambda i: i % 2 == 1, [1, 3]), (3, [3]), ("layers.1", [1]),
])
def test_layer_filters(model, layers, expect):
    rec, _ = _run(model, n_new=3, layers=layers)
    assert rec.layers == expect
    assert sorted(rec.to_dataframe("experts")["layer"].unique()) == expect
    assert sorted(rec.to_dataframe("neurons")["layer"].unique()) == expect
    assert sorted(rec.to_dataframe("kv")["layer"].unique()) == expect
    assert not any(n.startswith(f"layers.{i}.") for n in rec.names() for i in set(range(4)) - set(expect))


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="unknown kinds"):
        sl.record(model, kinds=("experts", "heat"))
    with pytest.raises(ValueError, match="out of range"):
        sl.record(model, layers=[7])
    with pytest.raises(TypeError):
        sl.record(object())
    rec, _ = _run(model, n_new=2, kinds=("kv",))
    with pytest.raises(KeyError, match="not recorded"):
        rec.to_dataframe("experts")
    with pytest.raises(KeyError):
        rec["layers.0.moe.topk_ids"]


def test_defaults_keep_counters_not_tensors(model):
    rec, _ = _run(model, n_new=2)
    assert rec.kinds == list(KINDS)
    assert not any(n.endswith(("router_logits", "expert_gate")) for n in rec.names())
    s = rec.summary()
    assert any("no expert cache" in n for n in s["notes"])  # the cache kind on a model says it records nothing
    assert s["cache_hit"] == s["cache_miss"] == 0
    with pytest.raises(KeyError, match="full=True"):
        rec.to_dataframe("router_logits")


def test_names_table_documents_every_name(full_rec):
    d = full_rec.describe()
    assert (d["kind"] != "").all() and (d["meaning"] != "").all()
    assert set(d["name"]) == set(full_rec.names())
    for _, row in d.iterrows():
        assert full_rec[row["name"]].shape == row["shape"]
    assert "layers.{i}.moe.topk_ids" in names_table()["name"].tolist()
    assert "layers.{i}.moe.topk_ids" in sl.instruments.recording.__doc__


def test_frames_are_tidy(full_rec, model):
    K = model.config.top_k
    ex = full_rec.to_dataframe("experts")
    assert list(ex.columns[:6]) == ["dataset", "sequence", "step", "position", "layer", "slot"]
    assert len(ex) == 17 * 4 * K and ex.attrs["num_experts"] == model.config.num_experts
    timing = full_rec.to_dataframe("timing")
    assert set(timing["part"]) == {"total"} and len(timing) == 6
    tp = sl.metrics.throughput(timing)
    assert tp.set_index("phase").loc["prefill", "tokens"] == 12 and tp.set_index("phase").loc["decode", "steps"] == 5
    assert (tp["tok_s"] > 0).all()
    assert len(full_rec.to_dataframe("cache")) == 0


def test_live_access_inside_the_block(model):
    with sl.record(model, kinds=("experts",)) as rec:
        generate(model, _prompt(), 2, stop_tokens=[])
        assert rec.summary()["steps"] == 2
        generate(model, _prompt(), 2, stop_tokens=[])
    assert rec.summary()["steps"] == 4 and rec.summary()["sequences"] == 2
    assert rec["steps.sequence"].tolist() == [0, 0, 1, 1]


def test_batched_forward(model):
    cache = model.new_cache(batch_size=2)
    ids = torch.stack([_prompt(5, 1), _prompt(5, 2)])
    with sl.record(model, kinds=("experts", "neurons", "kv")) as rec, torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    assert rec["tokens.sequence"].tolist() == [0] * 5 + [1] * 5 + [0, 1]
    assert rec["tokens.position"].tolist() == list(range(5)) * 2 + [5, 5]
    assert rec["layers.0.moe.topk_ids"].shape == (12, model.config.top_k)
    assert rec.summary()["sequences"] == 2


def test_save_load_round_trip(full_rec, tmp_path):
    path = full_rec.save(tmp_path / "rec")
    assert (path / "meta.json").exists() and (path / "arrays.npz").exists()
    assert (path / "experts.parquet").exists()
    back = Recording.load(path)
    assert back.meta == full_rec.meta
    assert back.names() == full_rec.names()
    for n in full_rec.names():
        a, b = full_rec[n], back[n]
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), n
    for kind in ("experts", "router_logits", "neurons", "neuron_counts", "kv", "timing", "steps", "cache"):
        pd.testing.assert_frame_equal(back.to_dataframe(kind), full_rec.to_dataframe(kind))
    pd.testing.assert_frame_equal(pd.read_parquet(path / "experts.parquet"), full_rec.to_dataframe("experts"),
                                  check_dtype=False)


def test_concat_keeps_dataset_labels(model):
    a, _ = _run(model, n_new=3, dataset="gsm8k", seed=1)
    b, _ = _run(model, n_new=4, dataset="wiki", seed=2)
    c = Recording.concat([a, b])
    assert c.datasets == ["gsm8k", "wiki"]
    assert c.summary()["steps"] == 7 and c.summary()["sequences"] == 2
    assert c["steps.sequence"].tolist() == [0] * 3 + [1] * 4
    for i in c.layers:
        np.testing.assert_array_equal(c[f"layers.{i}.moe.topk_ids"],
                                      np.concatenate([a[f"layers.{i}.moe.topk_ids"], b[f"layers.{i}.moe.topk_ids"]]))
        np.testing.assert_array_equal(c[f"layers.{i}.moe.neuron_counts"],
                                      a[f"layers.{i}.moe.neuron_counts"] + b[f"layers.{i}.moe.neuron_counts"])
    nc = c.to_dataframe("neuron_counts")
    for rec, ds in ((a, "gsm8k"), (b, "wiki")):
        pd.testing.assert_frame_equal(nc[nc.dataset == ds].reset_index(drop=True), rec.to_dataframe("neuron_counts")
                                      .assign(dataset=ds), check_dtype=False)
        pd.testing.assert_frame_equal(c.to_dataframe("neurons").query("dataset == @ds").reset_index(drop=True),
                                      rec.to_dataframe("neurons").assign(dataset=ds, sequence=int(ds == "wiki")))
    freq = sl.metrics.expert_frequency(c.to_dataframe("experts"))
    np.testing.assert_allclose(freq.groupby(["dataset", "layer"])["frequency"].sum(), model.config.top_k)
    assert set(freq["dataset"]) == {"gsm8k", "wiki"}
    # + and sum() are concat
    for other in (a + b, sum([a, b])):
        assert other.names() == c.names()
        pd.testing.assert_frame_equal(other.to_dataframe("experts"), c.to_dataframe("experts"))
    k, _ = _run(model, n_new=2, kinds=("kv",))
    with pytest.raises(ValueError, match="differ"):
        a + k


def test_profile_over_prompts(model):
    def tok(text):  # a toy tokenizer: bytes mod vocab
        return [3 + b % 100 for b in text.encode()]

    rec = sl.profile(model, ["hello", "a longer prompt", [5, 6, 7]], dataset="toy", max_new_tokens=4, tokenizer=tok,
                     progress=False, stop_tokens=[])
    s = rec.summary()
    assert s["sequences"] == 3 and s["steps"] == 3 * 4 and s["datasets"] == ["toy"]
    assert s["prefill_tokens"] == 5 + 15 + 3
    assert set(rec.to_dataframe("experts")["dataset"]) == {"toy"}
    assert len(model.hooks) == 0
    with pytest.raises(ValueError, match="tokenizer"):
        sl.profile(model, ["text"], progress=False)


def test_metrics_on_two_datasets(model):
    a, _ = _run(model, n_new=3, dataset="x", seed=1)
    b, _ = _run(model, n_new=3, dataset="y", seed=1)  # same prompt: same routing
    freq = sl.metrics.expert_frequency((a + b).to_dataframe("experts"))
    div = sl.metrics.expert_usage_divergence(freq)
    assert len(div) == model.config.num_hidden_layers
    np.testing.assert_allclose(div["js_divergence"], 0.0, atol=1e-12)
    cold, hot = sl.metrics.cold_expert_share(freq, 0.14), sl.metrics.hot_expert_share(freq, 0.4)
    assert ((cold["share"] >= 0) & (cold["share"] <= 1)).all() and list(hot["dataset"]) == ["x", "y"]
    np.testing.assert_allclose(cold["share"], (freq.groupby("dataset")["frequency"]
                                               .apply(lambda f: (f < 0.14).mean())).to_numpy())
    sp = sl.metrics.neuron_sparsity_by_layer((a + b).to_dataframe("neurons"))
    assert ((sp["min"] <= sp["q1"]) & (sp["q1"] <= sp["median"]) & (sp["median"] <= sp["q3"])
            & (sp["q3"] <= sp["max"])).all()
    by_e = sl.metrics.neuron_sparsity_by_expert(a.to_dataframe("neurons"))
    assert by_e.groupby("layer")["tokens"].sum().eq(a.summary()["tokens"] * model.config.top_k).all()


def test_js_divergence_bounds():
    from smallthinker_lab.instruments import js_divergence

    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert 0 < js_divergence([1, 1, 0], [0, 1, 1]) < 1


def test_cache_and_timing_metrics_on_synthetic_events():
    cache = pd.DataFrame({"dataset": "d", "layer": [0, 0, 0, 1, 1], "expert": [1, 1, 2, 3, 3],
                          "event": ["miss", "hit", "prefetch", "miss", "evict"], "bytes": [10, 10, 10, 10, 10]})
    hr = sl.metrics.hit_rates(cache)
    assert hr.loc[0, "hit_rate"] == 0.5 and hr.loc[1, "hit_rate"] == 0.0
    assert hr.loc["all", "hits"] == 1 and hr.loc["all", "misses"] == 2 and hr.loc["all", "bytes_read"] == 30
    timing = pd.DataFrame({"dataset": "d", "phase": ["prefill", "prefill", "decode", "decode"],
                           "step": [0, 0, 1, 1], "layer": [-1, 0, -1, 0], "part": ["total", "io_wait"] * 2,
                           "seconds": [2.0, 0.5, 1.0, 0.5], "tokens": [10, 10, 1, 1]})
    io = sl.metrics.io_wait_share(timing).set_index("phase")
    assert io.loc["prefill", "io_wait_share"] == 0.25 and io.loc["all", "io_wait_share"] == pytest.approx(1 / 3)
    tb = sl.metrics.time_breakdown(timing).set_index(["phase", "part"])
    assert tb.loc[("decode", "io_wait"), "share"] == 0.5
    assert sl.metrics.throughput(timing).set_index("phase").loc["prefill", "tok_s"] == 5.0


# ----------------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    """The offloading engine over the test model's weights, with a cache of 10 of its 32 experts."""
    from smallthinker_lab.engine import Engine
    from smallthinker_lab.model.checkpoint import save_pretrained

    folder = save_pretrained(model, tmp_path_factory.mktemp("engine") / "model")
    probe = Engine.from_pretrained(folder, memory_limit="unlimited", progress=False)
    plan = probe.memory_plan()
    probe.close()
    eng = Engine.from_pretrained(folder, memory_limit=plan["minimum_bytes"] + 8 * plan["expert_slot_bytes"],
                                 progress=False)
    assert eng.cache.capacity_experts == 10  # top_k (2) + 8
    yield eng
    eng.close()


def _engine_run(engine, n_new=6, seed=0, **kw):
    engine.reset_stats(clear_cache=True)
    with sl.record(engine, **kw) as rec:
        out = engine.generate(_prompt(seed=seed), n_new, stop_tokens=[]).tokens
    return rec, out


def test_engine_cache_events_match_engine_counters(engine):
    rec, _ = _engine_run(engine, n_new=8)
    st = engine.stats()
    s = rec.summary()
    assert (s["cache_hit"], s["cache_miss"], s["cache_evict"]) == (st["hits"], st["misses"], st["evictions"])
    assert s["cache_bytes_read"] == st["bytes_read"]
    assert s["cache_hit_rate"] == st["hit_rate"]
    per_layer = sl.metrics.hit_rates(rec.to_dataframe("cache"))
    frame = engine.stats_frame()
    for i in range(engine.config.num_hidden_layers):
        assert per_layer.loc[i, "hits"] == frame.loc[i, "hits"] and per_layer.loc[i, "misses"] == frame.loc[i, "misses"]
        assert rec[f"layers.{i}.cache.hits"].sum() == frame.loc[i, "hits"]
    assert len(engine.hooks) == 0


def test_lru_curve_at_the_engine_cache_size_equals_its_hit_rate(engine):
    rec, _ = _engine_run(engine, n_new=10, seed=4)
    cap = engine.cache.capacity_experts
    st = engine.stats()
    assert 0 < st["hits"] < st["requests"]  # the cache is small enough to evict, large enough to hit
    assert sl.metrics.lru_hit_curve(engine.trace, [cap]).iloc[0] == st["hit_rate"]
    curves = sl.metrics.hit_rate_curves(engine, capacities=range(0, 33))
    row = curves[(curves.policy == "lru") & (curves.capacity_experts == cap)].iloc[0]
    assert (row["hits"], row["misses"]) == (st["hits"], st["misses"])
    assert row["capacity_bytes"] == cap * engine.cache.expert_nbytes
    # the trace derived from the recording is the engine's request sequence
    assert [t[1:] for t in sl.metrics.trace_from_recording(rec)] == [tuple(t[-2:]) for t in engine.trace]


def _routed(rec, i):
    """Sorted (token row, expert, inactive neurons) of layer i."""
    names = ("routed_token", "routed_expert", "inactive_neurons")
    return sorted(zip(*(rec[f"layers.{i}.moe.{n}"].tolist() for n in names)))


def test_engine_recording_equals_model_recording(engine, model):
    """Same weights, same prompt: the engine routes and sparsifies exactly as the model does, also with the
    prompt prefilled in chunks (rows of each chunk are renumbered within the step)."""
    ref, ref_tokens = _run(model, n_new=5, kinds=("experts", "neurons", "kv"))
    for chunk in (256, 5):
        engine.prefill_chunk = chunk
        try:
            rec, tokens = _engine_run(engine, n_new=5, kinds=("experts", "neurons", "kv"))
        finally:
            engine.prefill_chunk = 256
        assert tokens == ref_tokens
        assert rec["steps.tokens"].tolist() == ref["steps.tokens"].tolist() and not rec.notes
        for i in range(model.config.num_hidden_layers):
            np.testing.assert_array_equal(rec[f"layers.{i}.moe.topk_ids"], ref[f"layers.{i}.moe.topk_ids"])
            np.testing.assert_allclose(rec[f"layers.{i}.moe.topk_weights"], ref[f"layers.{i}.moe.topk_weights"],
                                       atol=1e-5)
            assert _routed(rec, i) == _routed(ref, i)
            np.testing.assert_array_equal(rec[f"layers.{i}.moe.neuron_counts"], ref[f"layers.{i}.moe.neuron_counts"])
            np.testing.assert_array_equal(rec[f"layers.{i}.attn.kv_bytes"], ref[f"layers.{i}.attn.kv_bytes"])


def test_engine_timing_split(engine):
    rec, _ = _engine_run(engine, n_new=4, kinds=("timing",))
    t = rec.to_dataframe("timing")
    assert {"total", "router", "attention", "moe", "lm_head"} <= set(t["part"])
    tb = sl.metrics.time_breakdown(t)
    parts = tb[tb.part.isin(["router", "attention", "moe", "lm_head"])].groupby("phase")["share"].sum()
    assert ((parts > 0) & (parts <= 1.0 + 1e-9)).all()  # the parts happen inside the step's wall time
    io = sl.metrics.io_wait_share(t)
    assert ((io["io_wait_share"] >= 0) & (io["io_wait_share"] <= 1)).all()
    assert sl.metrics.throughput(t).set_index("phase").loc["decode", "steps"] == 3
    assert not any("whole-step" in n for n in rec.notes)


def test_engine_batched_events_equal_per_event_hooks(engine):
    """record() listens to the batched points (cache_events per forward, engine clocks at each forward); what it
    files equals what the per-event "cache" hook and the per-part "timing" hook see in the same run."""
    cache_seen, timing_seen = [], []
    h1 = engine.hooks.add("cache", lambda **kw: cache_seen.append((kw["layer"], kw["expert"], kw["event"])))
    h2 = engine.hooks.add("timing", lambda **kw: timing_seen.append((kw["layer"], kw["part"], kw["seconds"])))
    try:
        rec, _ = _engine_run(engine, n_new=6, kinds=("cache", "timing"))
    finally:
        h1.remove(), h2.remove()
    cache = rec.to_dataframe("cache")
    assert len(cache) == len(cache_seen) > 0
    assert list(zip(cache["layer"], cache["expert"], cache["event"])) == cache_seen
    t = rec.to_dataframe("timing")
    for part in ("router", "attention", "moe", "lm_head"):
        fired = sum(s for _, p, s in timing_seen if p == part)
        assert t.loc[t.part == part, "seconds"].sum() == pytest.approx(fired, rel=1e-9, abs=1e-12)
    st = engine.stats()
    assert t.loc[t.part == "attention", "seconds"].sum() == pytest.approx(st["attention_seconds"], rel=1e-9)
    assert len(engine.hooks) == 0


def test_engine_records_only_its_layers_with_batched_events(engine):
    rec, _ = _engine_run(engine, n_new=4, layers=[1], kinds=("cache", "timing", "neurons"))
    assert set(rec.to_dataframe("cache")["layer"]) == {1}
    t = rec.to_dataframe("timing")
    assert set(t.loc[t.layer >= 0, "layer"]) == {1}
    assert set(rec.to_dataframe("neurons")["layer"]) == {1}


def test_profile_on_the_engine(engine):
    engine.reset_stats(clear_cache=True)
    rec = sl.profile(engine, [[5, 6, 7, 8], [9, 10]], dataset="toy", max_new_tokens=3, progress=False,
                     stop_tokens=[])
    assert rec.summary()["sequences"] == 2 and rec.summary()["steps"] == 6
    assert rec.summary()["cache_hit"] + rec.summary()["cache_miss"] == engine.stats()["requests"]
    assert len(engine.hooks) == 0


@pytest.mark.parametrize("batch_events, flush_steps", [(5, 16), (10**6, 3)])
def test_counters_reduced_during_and_after_generation(model, monkeypatch, batch_events, flush_steps):
    """Pending router tensors and expert events are consolidated in batches inside the forward (inference mode)
    and at the end (outside it), also for forwards with autograd on; the result is that of one batch at the end."""
    from smallthinker_lab.instruments.record import Recorder

    kinds = ("experts", "neurons")
    monkeypatch.setattr(Recorder, "FLUSH_STEPS", 10**6)
    monkeypatch.setattr(Recorder, "BATCH_EVENTS", 10**6)
    ref, _ = _run(model, n_new=8, kinds=kinds)
    monkeypatch.setattr(Recorder, "BATCH_EVENTS", batch_events)
    monkeypatch.setattr(Recorder, "FLUSH_STEPS", flush_steps)
    rec, _ = _run(model, n_new=8, kinds=kinds)
    for i in rec.layers:
        for name in ("neuron_counts", "inactive_neurons", "routed_token", "routed_expert", "topk_ids", "topk_weights"):
            np.testing.assert_array_equal(rec[f"layers.{i}.moe.{name}"], ref[f"layers.{i}.moe.{name}"])
    with sl.record(model, full=True) as grad_rec:
        model(_prompt()[None])  # autograd on
        model(_prompt(seed=1)[None])
    assert grad_rec.summary()["sequences"] == 2
    assert grad_rec["layers.0.moe.router_logits"].shape == (24, model.config.num_experts)
