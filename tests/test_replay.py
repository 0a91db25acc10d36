"""Forced routing from a recorded trace (``sl.replay``): the engine's own recording of a replayed generation holds
exactly the trace's experts per position and layer, on the default model and on synthetic shapes the trace is mapped
onto (layers modulo, experts one to one or split alternating by token, top-k padded by the next-ranked); the model
in memory and the engine under a memory limit give the same tokens under the same replay; bad traces are refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import smallthinker_lab as sl
from smallthinker_lab import SmallThinkerConfig, SmallThinkerForCausalLM
from smallthinker_lab.engine import Engine
from smallthinker_lab.engine.memory import limit_for_share
from smallthinker_lab.interventions import InterventionError, RoutingTrace, record_routing, replay
from smallthinker_lab.model.checkpoint import save_pretrained
from smallthinker_lab.model.config import hybrid_layouts
from smallthinker_lab.prompt_sets import load_prompt_set

MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")
NEW = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded_ids(engine_or_model, trace: RoutingTrace, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """(ids[T, L, K] the target's own recording saw, generated tokens) of one replayed generation."""
    with replay(engine_or_model, trace), sl.record(engine_or_model, kinds=("experts",)) as rec:
        if isinstance(engine_or_model, Engine):
            tokens = engine_or_model.generate(prompt, n, stop_tokens=[]).tokens
        else:
            tokens = sl.generate(engine_or_model, prompt, n, stop_tokens=[]).tokens
    order = np.argsort(rec["tokens.position"], kind="stable")
    L = engine_or_model.config.num_hidden_layers
    return np.stack([rec[f"layers.{i}.moe.topk_ids"][order] for i in range(L)], axis=1), tokens


def _limited(folder, share: float, **kw) -> Engine:
    with Engine.from_pretrained(folder, memory_limit=None, progress=False) as e:
        plan = e.memory_plan()
    return Engine.from_pretrained(folder, memory_limit=limit_for_share(plan, share), progress=False, **kw)


@pytest.fixture(scope="module")
def tiny():
    """The default model in memory, two gsm8k prompts (cut to 16 tokens) and their recorded routing (6 ranks)."""
    model = sl.load_model(MODEL)
    tok = sl.load_tokenizer(MODEL)
    prompts = [tok(p)["input_ids"][:16] for p in load_prompt_set("gsm8k", 2)]
    traces = record_routing(model, prompts, NEW, ranks=6)
    return model, prompts, traces


def test_a_recorded_trace_covers_prompt_and_decode_steps(tiny):
    model, prompts, traces = tiny
    cfg = model.config
    for p, t in zip(prompts, traces):
        assert t.ids.shape == (len(p) + NEW - 1, cfg.num_hidden_layers, 6)
        assert t.top_k == cfg.top_k and t.num_experts == cfg.num_experts
        assert list(t.tokens[:len(p)]) == list(p)
        for row in t.ids.reshape(-1, 6):  # the padding ranks are other experts than the routed ones
            assert len(set(row.tolist())) == 6


def test_replay_on_the_default_model_reproduces_the_trace_in_the_engines_recording(tiny):
    model, prompts, traces = tiny
    own = traces[0].for_shape(model.config)  # the same shape: top-4 of the 6 ranks
    with _limited(MODEL, 0.25, lookahead=True) as engine:
        got, tokens = _recorded_ids(engine, own, prompts[0], NEW)
        np.testing.assert_array_equal(got, own.ids)
        # the model's own routing replayed: the tokens it generated unforced
        assert tokens == list(own.tokens[len(prompts[0]):]) + tokens[-1:]
        # another prompt's routing forced on this prompt: the recording is that trace, not the router's choice
        other = traces[1].for_shape(model.config)
        n = other.num_positions - len(prompts[0]) + 1
        got, _ = _recorded_ids(engine, other, prompts[0][:len(prompts[0])], min(n, NEW))
        np.testing.assert_array_equal(got, other.ids[:got.shape[0]])
        st = engine.stats()
        assert st["requests"] == st["hits"] + st["misses"]


def _synthetic(tmp_path, layers: int, experts: int, top_k: int):
    rope, swa = hybrid_layouts(layers)
    cfg = SmallThinkerConfig.from_name("smallthinker-test", num_hidden_layers=layers, rope_layout=rope,
                                       sliding_window_layout=swa, moe_num_primary_experts=experts,
                                       moe_num_active_primary_experts=top_k, vocab_size=8192)
    torch.manual_seed(0)
    model = SmallThinkerForCausalLM(cfg).eval()
    return model, save_pretrained(model, tmp_path / f"synthetic-{layers}x{experts}")


@pytest.mark.parametrize("layers,experts,top_k", [(12, 32, 4), (10, 64, 6)])
def test_replay_on_a_synthetic_shape_reproduces_the_mapped_trace(tiny, tmp_path, layers, experts, top_k):
    _, prompts, traces = tiny
    model, folder = _synthetic(tmp_path, layers, experts, top_k)
    mapped = traces[0].for_shape(model.config)
    assert mapped.ids.shape == (traces[0].num_positions, layers, top_k)
    with _limited(folder, 0.3, lookahead=True) as engine:
        got, tokens = _recorded_ids(engine, mapped, prompts[0], NEW)
        np.testing.assert_array_equal(got, mapped.ids)
        assert (np.asarray(engine.trace)[:, 1:] >= 0).all()
    # the model in memory under the same replay: the engine's tokens (the benchmark's check relies on it)
    got_model, model_tokens = _recorded_ids(model, mapped, prompts[0], NEW)
    np.testing.assert_array_equal(got_model, mapped.ids)
    assert model_tokens == tokens


def test_the_mapping_rule(tiny):
    _, _, traces = tiny
    src = traces[0]  # the default model's routing: L layers x E experts, top-k, 6 ranks
    L, E = src.num_layers, src.num_experts
    rope, swa = hybrid_layouts(20)
    big = SmallThinkerConfig.from_name("smallthinker-test", num_hidden_layers=20, rope_layout=rope,
                                       sliding_window_layout=swa, moe_num_primary_experts=4 * E,
                                       moe_num_active_primary_experts=6)
    m = src.for_shape(big)
    for layer in range(20):  # layer l takes layer l mod L; expert e -> e + E * (t mod 4); the ranks past k next-ranked
        np.testing.assert_array_equal(m.ids[:, layer] % E, src.ids[:, layer % L, :6])
    t = np.arange(src.num_positions)
    assert ((m.ids // E) == (t % 4)[:, None, None]).all()
    same = src.for_shape(SmallThinkerConfig.from_name("smallthinker-tiny", num_hidden_layers=3 * L,
                                                      rope_layout=hybrid_layouts(3 * L)[0],
                                                      sliding_window_layout=hybrid_layouts(3 * L)[1],
                                                      moe_num_primary_experts=E, moe_num_active_primary_experts=2))
    np.testing.assert_array_equal(same.ids, src.ids[:, np.arange(3 * L) % L, :2])
    assert f"l mod {L}" in same.description


def test_bad_traces_are_refused(tiny, tmp_path):
    model, prompts, traces = tiny
    src = traces[0]
    E = src.num_experts
    with pytest.raises(InterventionError, match=f"cannot map a trace of {E} experts onto {E + E // 2}"):
        src.for_shape(SmallThinkerConfig.from_name("smallthinker-tiny", moe_num_primary_experts=E + E // 2))
    four = RoutingTrace(src.ids[:, :, :4], 4, E)
    with pytest.raises(InterventionError, match="top_k=6 but the trace has 4 ranks"):
        four.for_shape(SmallThinkerConfig.from_name("smallthinker-tiny", moe_num_primary_experts=2 * E,
                                                    moe_num_active_primary_experts=6))
    with pytest.raises(InterventionError, match="map it with trace.for_shape"):
        replay(model, RoutingTrace(src.ids[:, :4, :4], 4, E))
    with pytest.raises(InterventionError, match=rf"ids must be in \[0, {E // 2}\)"):
        RoutingTrace(src.ids, 4, E // 2)
    own = src.for_shape(model.config)
    with pytest.raises(InterventionError, match="the trace covers 0..20"):  # 16 + 6 - 1 positions
        with replay(model, own):
            sl.generate(model, prompts[0], NEW + 3, stop_tokens=[])
    assert len(model.hooks) == 0  # removed after the error


def test_locality_table_trained_against_uniform_routing(tiny):
    """The report's "what locality buys": at one limit, the trained routing touches no more experts and hits more
    than uniform random routing replayed over the same positions, with fewer capacity misses; hits + compulsory +
    capacity misses = requests."""
    from smallthinker_lab.analysis.locality import locality_paragraph, locality_table

    _, prompts, _ = tiny
    with Engine.from_pretrained(MODEL, memory_limit=None, progress=False) as e:
        limit = limit_for_share(e.memory_plan(), 0.25)
    df = locality_table(MODEL, prompts, NEW, limit).set_index("routing")
    for r in ("trained", "uniform"):
        row = df.loc[r]
        assert row["requests"] > 0
        assert row["hit_rate"] + row["compulsory_share"] + row["capacity_share"] == pytest.approx(1.0)
    # (a prefill requests each expert its tokens share once: the trained routing, sharing more, requests fewer)
    assert df.loc["trained", "requests"] <= df.loc["uniform", "requests"]
    assert df.loc["trained", "distinct_experts"] <= df.loc["uniform", "distinct_experts"]
    assert df.loc["trained", "capacity_share"] < df.loc["uniform", "capacity_share"]  # it reuses what it keeps
    assert df.loc["trained", "hit_rate"] > df.loc["uniform", "hit_rate"]
    text = locality_paragraph(df.reset_index())
    assert f"{df.loc['trained', 'hit_rate']:.1%}" in text and f"{df.loc['uniform', 'hit_rate']:.1%}" in text
