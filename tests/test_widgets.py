"""The memory-limit explorer without a browser: slider -> predicted hit rate, run -> measured stats, controls ->
engine. Real engine on the default model (or SMALLTHINKER_TEST_MODEL)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from smallthinker_lab.analysis.widgets import MemoryLimitExplorer, MiB, load_prompt_set  # noqa: E402
from smallthinker_lab.engine import Engine  # noqa: E402
from smallthinker_lab.instruments.curves import lru_hit_curve, policy_hit_curve  # noqa: E402

MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def prompt_sets():
    return {"gsm8k": load_prompt_set("gsm8k", 2), "zh-news": load_prompt_set("zh-news", 2)}


@pytest.fixture(scope="module")
def engines():
    """Every engine the explorer opened, with the keywords it was opened with."""
    return []


@pytest.fixture(scope="module")
def explorer(prompt_sets, engines):
    import torch

    torch.set_num_threads(1)

    def factory(**kw):
        engine = Engine.from_pretrained(MODEL, progress=False, **kw)
        engines.append((kw, engine))
        return engine

    return MemoryLimitExplorer(engine_factory=factory, prompt_sets=prompt_sets, max_new_tokens=NEW_TOKENS,
                               max_prompt_tokens=64)


def test_slider_range_is_the_engines_working_set(explorer):
    cfg_total = explorer.num_experts_total
    explorer.set_limit_mib(0)  # clamped to the minimum
    assert explorer.limit_mib == explorer.slider.min
    assert explorer.limit_bytes >= explorer.minimum_bytes
    assert explorer.capacity_experts >= 1
    explorer.set_limit_mib(1e9)
    assert explorer.capacity_experts == cfg_total
    assert "100%" in explorer.share_label.value


def test_capacity_is_what_the_engine_plans(explorer):
    explorer.set_limit_mib(explorer.slider.min + 0.4 * (explorer.slider.max - explorer.slider.min))
    with Engine.from_pretrained(MODEL, memory_limit=explorer.limit_bytes, progress=False) as engine:
        assert engine.cache.capacity_experts == explorer.capacity_experts
    share = explorer.capacity_experts / explorer.num_experts_total
    assert f"{share:.0%}" in explorer.share_label.value


def test_slider_updates_predicted_hit_rate_to_the_curve(explorer):
    explorer.policy.value = "lru"
    explorer.prompt_set.value = "gsm8k"
    curve = lru_hit_curve(explorer.trace(), np.arange(explorer.num_experts_total + 1))
    seen = set()
    for frac in (0.0, 0.1, 0.3, 0.6, 1.0):
        mib = explorer.slider.min + frac * (explorer.slider.max - explorer.slider.min)
        explorer.set_limit_mib(mib)
        cap = explorer.capacity_experts
        assert explorer.predicted_hit_rate == curve[cap]  # exactly the curve's value at that size
        assert f"{curve[cap]:.1%}" in explorer.predicted.value
        seen.add(round(explorer.predicted_hit_rate, 12))
    assert len(seen) >= 3, "the prediction should move with the limit"


def test_policy_and_prompt_set_change_the_prediction(explorer):
    explorer.set_limit_mib(explorer.slider.min + 0.3 * (explorer.slider.max - explorer.slider.min))
    cap = explorer.capacity_experts
    explorer.prompt_set.value = "gsm8k"
    explorer.policy.value = "lfu"
    lfu = policy_hit_curve(explorer.trace(), [cap], "lfu").iloc[0]
    assert explorer.predicted_hit_rate == lfu
    assert "lfu" in explorer.predicted.value and f"{lfu:.1%}" in explorer.predicted.value
    explorer.policy.value = "lru"
    explorer.prompt_set.value = "zh-news"
    assert explorer.trace("zh-news") != explorer.trace("gsm8k")
    assert explorer.predicted_hit_rate == lru_hit_curve(explorer.trace("zh-news"), [cap]).iloc[0]
    assert "zh-news" in explorer.predicted.value


def test_run_updates_measured_stats_bars_and_text(explorer):
    explorer.prompt_set.value = "gsm8k"
    explorer.policy.value = "lru"
    explorer.prefetch.value = True
    # a cache that holds at least one layer's experts: prefill requests come in the same order as in the
    # recorded trace, so the measured LRU hit rate is the curve's value exactly
    explorer.set_limit_mib(explorer.slider.min + 0.6 * (explorer.slider.max - explorer.slider.min))
    predicted = explorer.predicted_hit_rate
    before_bars = len(explorer.bars.outputs)
    stats = explorer.run()
    assert stats["requests"] > 0 and stats["decode_tokens"] > 0
    assert stats["hit_rate"] == predicted
    assert stats["capacity_experts"] == explorer.capacity_experts
    assert stats["memory_limit"] == explorer.limit_bytes
    assert f"{stats['hit_rate']:.1%}" in explorer.measured.value
    assert "tok/s" in explorer.measured.value and "I/O wait" in explorer.measured.value
    layers = explorer.last_layers.drop(index="all")
    assert len(layers) == explorer.num_layers
    assert layers["hits"].sum() == stats["hits"]
    outs = explorer.bars.outputs
    assert outs and any("image/png" in o.get("data", {}) for o in outs) and len(outs) >= before_bars
    assert "[1]" in explorer.text.value and "[2]" in explorer.text.value  # both prompts streamed
    assert not explorer.run_button.disabled
    assert explorer.status.value.startswith("done")


def test_policy_and_prefetch_reach_the_engine(explorer, engines):
    explorer.prompt_set.value = "gsm8k"
    explorer.set_limit_mib(explorer.slider.min + 0.2 * (explorer.slider.max - explorer.slider.min))
    explorer.policy.value = "lfu"
    explorer.prefetch.value = False
    n = len(engines)
    stats = explorer.run()
    kw, engine = engines[-1]
    assert len(engines) == n + 1
    assert kw == {"memory_limit": explorer.limit_bytes, "policy": "lfu", "prefetch": False}
    assert engine.policy == "lfu" and engine.prefetch is False and engine.closed
    assert stats["policy"] == "lfu" and stats["prefetch"] is False
    assert "lfu" in explorer.measured.value and "prefetch off" in explorer.measured.value
    explorer.policy.value, explorer.prefetch.value = "lru", True


def test_run_button_runs(explorer, engines):
    explorer.prompt_set.value = "zh-news"
    n = len(engines)
    explorer.run_button.click()
    assert len(engines) == n + 1
    assert explorer.last_stats["prompt_set"] == "zh-news"
    assert explorer.last_stats["memory_limit"] == explorer.limit_bytes
    assert abs(explorer.limit_bytes - explorer.limit_mib * MiB) <= 1 or explorer.limit_bytes == explorer.minimum_bytes


def test_predicted_misses_split_into_compulsory_capacity_and_policy(explorer):
    from smallthinker_lab.instruments.curves import compulsory_ceiling

    explorer.prompt_set.value = "gsm8k"
    explorer.policy.value = "lru"
    trace = explorer.trace()
    first_touch = len({t[1:] for t in trace}) / len(trace)
    explorer.set_limit_mib(1e9)  # every expert fits: only first touches miss, the hit rate is the ceiling
    m = explorer.predicted_misses()
    assert m["compulsory_share"] == pytest.approx(first_touch) and m["capacity_share"] == pytest.approx(0.0)
    assert explorer.predicted_hit_rate == m["ceiling"] == compulsory_ceiling(trace) < 1.0
    assert f"{first_touch:.1%}</b> compulsory" in explorer.breakdown.value
    assert f"Ceiling for these prompts: <b>{m['ceiling']:.1%}" in explorer.breakdown.value
    explorer.set_limit_mib(explorer.slider.min + 0.3 * (explorer.slider.max - explorer.slider.min))
    cap = explorer.capacity_experts
    m = explorer.predicted_misses()
    assert m["hit_rate"] + m["compulsory_share"] + m["capacity_share"] == pytest.approx(1.0)
    assert m["capacity_share"] > 0
    belady = policy_hit_curve(trace, [cap], "belady").iloc[0]
    assert m["policy_share"] == pytest.approx(belady - m["hit_rate"]) and 0 <= m["policy_share"] <= m["capacity_share"]
    assert f"{m['policy_share']:.1%}</b> lru misses" in explorer.breakdown.value


def test_warm_toggle_measures_cold_and_warm_side_by_side(explorer, engines):
    explorer.prompt_set.value = "gsm8k"
    explorer.policy.value, explorer.prefetch.value = "lru", True
    explorer.warm_from.value = "same prompts"
    explorer.warm.value = True
    try:
        explorer.set_limit_mib(1e9)  # every expert fits: the warm run never misses
        n = len(engines)
        stats = explorer.run()
        assert len(engines) == n + 1  # both runs on one engine, opened as a cold one is
        warm = stats["warm"]
        assert stats["hit_rate"] == explorer.predicted_hit_rate < 1.0 and stats["capacity_misses"] == 0
        assert stats["hits"] + stats["compulsory_misses"] + stats["capacity_misses"] == stats["requests"]
        assert warm["hit_rate"] == 1.0 and warm["misses"] == 0 and warm["requests"] == stats["requests"]
        assert warm["same_tokens"] is True and warm["warm_from"] == "gsm8k"
        html = explorer.measured.value
        assert "cold (empty cache)" in html and "warm (from gsm8k" in html
        assert f"{stats['hit_rate']:.1%}" in html and "100.0%" in html and "st-same-tokens'" in html
        assert len(explorer.last_warm_layers.drop(index="all")) == explorer.num_layers
        # warm from another domain under a limit: still the cold tokens
        explorer.warm_from.value = "zh-news"
        explorer.set_limit_mib(explorer.slider.min + 0.5 * (explorer.slider.max - explorer.slider.min))
        stats = explorer.run()
        assert stats["warm"]["warm_from"] == "zh-news" and stats["warm"]["same_tokens"] is True
        assert stats["warm"]["compulsory_misses"] <= stats["compulsory_misses"]
    finally:
        explorer.warm.value = False
    stats = explorer.run()
    assert stats["warm"] is None and "warm (from" not in explorer.measured.value


def test_warm_from_must_be_a_prompt_set(prompt_sets):
    with pytest.raises(ValueError, match="warm_from 'code' is not one of the prompt sets: gsm8k, zh-news"):
        MemoryLimitExplorer(engine_factory=lambda **kw: Engine.from_pretrained(MODEL, progress=False, **kw),
                            prompt_sets=prompt_sets, warm_from="code", max_new_tokens=2, max_prompt_tokens=16)
