"""Miss breakdown on the engine's recorded traces, and warm starts: same tokens, a full warm cache never misses, the
warm state from a trace is the state the run left; per-domain and switch-domain runs add up to the engine's
counters. Real engine on the default model (or SMALLTHINKER_TEST_MODEL)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import smallthinker_lab as sl
from smallthinker_lab.analysis.report import limit_for_share
from smallthinker_lab.analysis.widgets import load_prompt_set
from smallthinker_lab.engine import Engine
from smallthinker_lab.engine.cache import simulate
from smallthinker_lab.engine.warm import domain_hit_rates, switch_domains, warm_order, warm_start
from smallthinker_lab.instruments.curves import compulsory_ceiling, hit_rate_curves, lru_hit_curve

MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")
NEW = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts():
    """Token ids of a few prompts per domain, cut short (the tests stay fast)."""
    with Engine.from_pretrained(MODEL, memory_limit=None, progress=False) as e:
        return {name: [e.encode(p)[0, :24].tolist() for p in load_prompt_set(name, 3)]
                for name in ("humaneval", "zh-news")}


def _limit(share: float) -> int:
    with Engine.from_pretrained(MODEL, memory_limit=None, progress=False) as e:
        plan = e.memory_plan()
    return limit_for_share(plan, share)


@pytest.fixture(scope="module")
def full():
    with Engine.from_pretrained(MODEL, memory_limit=None, progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def small():
    with Engine.from_pretrained(MODEL, memory_limit=_limit(0.2), progress=False) as e:
        yield e


def _generate(engine, ids_list, n=NEW):
    return [engine.generate(ids, n).tokens for ids in ids_list]


# ------------------------------------------------------------------ the miss breakdown on recorded traces
@pytest.mark.parametrize("which", ["full", "small"])
def test_compulsory_capacity_hits_add_up_on_recorded_traces(which, full, small, prompts):
    engine = full if which == "full" else small
    engine.reset_stats(clear_cache=True)
    with sl.record(engine, kinds=("experts",)) as rec:
        _generate(engine, prompts["humaneval"] + prompts["zh-news"])
    st, cap = engine.cache.stats, engine.cache.capacity_experts
    assert st.hits + st.compulsory_misses + st.capacity_misses == st.requests == len(engine.trace) > 0
    distinct = len({t[1:] for t in engine.trace})
    assert st.compulsory_misses == distinct  # a cold cache touches each used expert for the first time once
    if cap >= engine.config.num_hidden_layers * engine.config.num_experts:
        assert st.capacity_misses == 0  # nothing is ever evicted
    else:
        assert st.capacity_misses > 0
    # the simulator replays the engine's trace to the same split, for every policy the engine replays exactly
    sim = simulate(engine.trace, cap, "lru")
    assert (sim.hits, sim.compulsory_misses, sim.capacity_misses) == (st.hits, st.compulsory_misses,
                                                                      st.capacity_misses)
    # and the trace derived from a recording splits the same way in the curves, at every size
    trace = sl.metrics.trace_from_recording(rec)
    curves = hit_rate_curves(trace, capacities=[1, cap // 2, cap, distinct, 10 * distinct],
                             policies=("lru", "lfu", "belady"))
    assert (curves["hits"] + curves["compulsory_misses"] + curves["capacity_misses"] == len(trace)).all()
    assert (curves.loc[curves["capacity_experts"] >= distinct, "capacity_misses"] == 0).all()
    assert (curves["policy_misses"] >= 0).all()
    ceiling = compulsory_ceiling(trace)  # (n - d) / n: equal to 1 - d / n up to the last bit of a float
    assert lru_hit_curve(trace, [10**9]).iloc[0] == pytest.approx(ceiling, rel=1e-12)
    assert ceiling == pytest.approx(1 - st.compulsory_misses / len(trace), rel=1e-12)


# ------------------------------------------------------------------ warm starts
@pytest.mark.parametrize("which", ["full", "small"])
def test_warm_started_generations_give_the_cold_tokens(which, full, small, prompts):
    engine = full if which == "full" else small
    ids = prompts["humaneval"]
    engine.reset_stats(clear_cache=True)
    cold = _generate(engine, ids)
    cold_hit_rate, trace = engine.cache.stats.hit_rate, list(engine.trace)
    for source in (trace, prompts["zh-news"]):  # a recorded trace, then another domain's prompts
        w = warm_start(engine, source, max_new_tokens=NEW)
        assert w.source == ("trace" if source is trace else "prompts")
        assert engine.cache.stats.requests == 0 and len(engine.cache) == w.resident > 0
        assert _generate(engine, ids) == cold
    # warm from the very prompts at hand: never worse than cold
    warm_start(engine, trace)
    _generate(engine, ids)
    assert engine.cache.stats.hit_rate >= cold_hit_rate


def test_warm_hit_rate_at_full_capacity_is_one(full, prompts):
    ids = prompts["zh-news"]
    full.reset_stats(clear_cache=True)
    _generate(full, ids)
    cold = full.stats()
    assert cold["hit_rate"] < 1.0  # a cold cache misses each expert once
    assert cold["hit_rate"] == compulsory_ceiling(full.trace)  # ... and only then, at full capacity
    trace = list(full.trace)
    for source in (trace, ids):
        w = warm_start(full, source, max_new_tokens=NEW)
        _generate(full, ids)
        st = full.stats()
        assert st["hit_rate"] == 1.0 and st["misses"] == 0 and st["bytes_read"] == 0
        assert w.experts_read == len({t[1:] for t in trace})
        assert w.bytes_read == w.experts_read * full.cache.expert_nbytes


def test_warm_state_from_a_trace_is_the_state_the_run_left(small, prompts):
    small.reset_stats(clear_cache=True)
    _generate(small, prompts["humaneval"])
    left = list(small.cache.policy.order)  # LRU: oldest first
    trace = list(small.trace)
    assert warm_order([t[1:] for t in trace], small.cache.capacity_experts) == left
    warm_start(small, trace)
    assert list(small.cache.policy.order) == left
    # frequent: the most requested experts, least requested first
    keys = [t[1:] for t in trace]
    top = warm_order(keys, 5, "frequent")
    counts = sorted((keys.count(k) for k in set(keys)), reverse=True)
    assert len(top) == 5 and sorted(keys.count(k) for k in top) == sorted(counts[:5])
    assert [keys.count(k) for k in top] == sorted(keys.count(k) for k in top)


def test_warm_start_bad_input(small):
    L, E = small.config.num_hidden_layers, small.config.num_experts
    with pytest.raises(ValueError, match=rf"trace item 1 is \(0, {L}, 0\).*\[0, {L}\)"):
        warm_start(small, [(0, 0, 0), (0, L, 0)])
    with pytest.raises(ValueError, match=rf"\[0, {E}\)"):
        warm_start(small, [(0, E)], kind="trace")
    with pytest.raises(ValueError, match="kind must be"):
        warm_start(small, [(0, 0)], kind="recording")
    with pytest.raises(ValueError, match="no prompts"):
        warm_start(small, [], kind="prompts")
    with pytest.raises(ValueError, match="unknown warm-up selection"):
        warm_order([(0, 0)], 1, "newest")


# ------------------------------------------------------------------ domains
def test_domain_hit_rates_cold_and_warm(small, prompts):
    df = domain_hit_rates(small, prompts, warmup_prompts=1, max_new_tokens=4, progress=False)
    assert len(df) == 2 * 3  # per domain: cold, warm from each of the two
    assert set(df["warm_from"]) == {"none", "humaneval", "zh-news"}
    assert (df["hits"] + df["compulsory_misses"] + df["capacity_misses"] == df["requests"]).all()
    assert (df["capacity_experts"] == small.cache.capacity_experts).all()
    np.testing.assert_allclose(df["hit_rate"] + df["compulsory_share"] + df["capacity_share"], 1.0)
    for _, g in df.groupby("domain"):
        assert g["requests"].nunique() == 1  # the same prompts, the same requests, cold or warm
        cold = g[g["start"] == "cold"].iloc[0]
        # a warm cache turns some first touches into hits or capacity misses, never more first touches
        assert (g[g["start"] == "warm"]["compulsory_misses"] <= cold["compulsory_misses"]).all()
    with pytest.raises(ValueError, match="needs more than warmup_prompts=3"):
        domain_hit_rates(small, prompts, warmup_prompts=3, progress=False)


def test_switch_domains_adds_up_to_the_engine_counters(small, prompts):
    df = switch_domains(small, {"humaneval": prompts["humaneval"], "zh-news": prompts["zh-news"]},
                        max_new_tokens=4, progress=False)
    st, trace = small.cache.stats, small.trace
    assert df["requests"].sum() == st.requests == len(trace)
    assert (df["hits"].sum(), df["compulsory_misses"].sum(), df["capacity_misses"].sum()) == (
        st.hits, st.compulsory_misses, st.capacity_misses)
    assert list(df["step"]) == list(range(len(df))) and list(df["phase"].unique()) == ["humaneval", "zh-news"]
    # the second domain's first touches are exactly its experts the first domain never used
    first = df[df["phase"] == "humaneval"]["requests"].sum()
    seen = {t[1:] for t in trace[:first]}
    assert df[df["phase"] == "zh-news"]["compulsory_misses"].sum() == len({t[1:] for t in trace[first:]} - seen)
    assert (df[df["phase"] == "humaneval"]["phase_share"] == 1.0).all()  # every entry was read in phase one
    assert df["phase_share"].iloc[-1] > df[df["phase"] == "zh-news"]["phase_share"].iloc[0] - 1e-12
    assert (df["resident"] <= small.cache.capacity_experts).all()


def test_warm_start_engine_option(full, prompts):
    ids = prompts["zh-news"]
    full.reset_stats(clear_cache=True)
    cold = [full.generate(p, NEW, stop_tokens=[]).tokens for p in ids]
    trace = list(full.trace)
    with Engine.from_pretrained(MODEL, memory_limit=None, progress=False, warm_start=trace) as e:
        assert e.stats()["requests"] == 0 and len(e.cache.entries) == len({t[1:] for t in trace})
        assert [e.generate(p, NEW, stop_tokens=[]).tokens for p in ids] == cold
        assert e.stats()["hit_rate"] == 1.0 and e.stats()["compulsory_misses"] == 0
