"""Hit-rate curves: one-pass LRU stack distances against replay; LFU and Belady by the engine's simulator."""

import random
from collections import OrderedDict

import numpy as np
import pytest

from smallthinker_lab.engine.cache import simulate
from smallthinker_lab.instruments import hit_rate_curves, lru_hit_curve, policy_hit_curve, stack_distances
from smallthinker_lab.instruments.curves import compulsory_ceiling, miss_breakdown


def _trace(seed: int, n: int = 300, layers: int = 4, experts: int = 8, k: int = 2) -> list[tuple[int, int, int]]:
    """A MoE-like demand trace: per step and layer, k distinct experts in ascending order, some hot experts."""
    rng = random.Random(seed)
    weights = [rng.random() ** 3 for _ in range(experts)]
    out = []
    for step in range(n // (layers * k)):
        for layer in range(layers):
            chosen = set()
            while len(chosen) < k:
                chosen.add(rng.choices(range(experts), weights)[0])
            out += [(step, layer, e) for e in sorted(chosen)]
    return out


def _lru_replay(trace, capacity):
    """Brute force: an OrderedDict LRU cache of ``capacity`` (layer, expert) keys, starting empty; hits."""
    cache, hits = OrderedDict(), 0
    for item in trace:
        key = tuple(item[-2:])
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        elif capacity > 0:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[key] = None
    return hits


def test_stack_distances_by_hand():
    A, B, C = (0, 0), (0, 1), (1, 0)
    #                     A   B   A  C  B  B  A
    assert stack_distances([A, B, A, C, B, B, A]).tolist() == [-1, -1, 1, -1, 2, 0, 2]


@pytest.mark.parametrize("seed", range(5))
def test_lru_curve_equals_replay_at_every_size(seed):
    trace = _trace(seed)
    curve = lru_hit_curve(trace)
    distinct = len({t[1:] for t in trace})
    assert list(curve.index) == list(range(distinct + 1))
    for c in curve.index:
        hits = _lru_replay(trace, int(c))
        assert curve[c] == hits / len(trace)
        if c >= 1:
            assert simulate(trace, int(c), "lru").hits == hits  # the engine's simulator (with pins) agrees
    assert curve.iloc[0] == 0.0 and curve.iloc[-1] == (len(trace) - distinct) / len(trace)  # cold misses only


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_policy_curve_is_the_engine_simulator(policy):
    trace = _trace(1, n=200)
    curve = policy_hit_curve(trace, range(0, 33), policy)
    assert curve.iloc[0] == 0.0  # an empty cache never hits
    for c in range(1, 33):
        assert curve[c] == simulate(trace, c, policy).hits / len(trace)


@pytest.mark.parametrize("seed", range(4))
def test_belady_bounds_lru_and_lfu_and_curves_are_monotone(seed):
    trace = _trace(seed, n=400)
    df = hit_rate_curves(trace, capacities=range(0, 34), expert_nbytes=1000)
    wide = df.pivot(index="capacity_experts", columns="policy", values="hit_rate")
    assert (wide["belady"] >= wide["lru"] - 1e-12).all()
    assert (wide["belady"] >= wide["lfu"] - 1e-12).all()
    assert (np.diff(wide["lru"]) >= 0).all() and (np.diff(wide["belady"]) >= 0).all()
    assert list(df.columns) == ["policy", "capacity_experts", "capacity_bytes", "hits", "misses", "compulsory_misses",
                                "capacity_misses", "policy_misses", "hit_rate", "ceiling"]
    assert (df["capacity_bytes"] == df["capacity_experts"] * 1000).all()
    assert (df["hits"] + df["misses"] == len(trace)).all()
    np.testing.assert_array_equal(wide["lru"].to_numpy(), lru_hit_curve(trace, range(0, 34)).to_numpy())


def test_curve_inputs():
    trace = [(0, 1), (0, 2), (0, 1)]
    assert lru_hit_curve(trace, [2]).iloc[0] == pytest.approx(1 / 3)
    assert lru_hit_curve(trace, 1).iloc[0] == 0.0  # a scalar capacity
    with pytest.raises(ValueError, match=">= 0"):
        lru_hit_curve(trace, [-1])
    with pytest.raises(ValueError, match="unknown cache policy"):
        policy_hit_curve(trace, [1], "fifo")
    assert np.isnan(lru_hit_curve([], [1]).iloc[0])


@pytest.mark.parametrize("seed", range(3))
def test_misses_split_into_compulsory_capacity_and_policy(seed):
    trace = _trace(seed, n=300)
    distinct = len({t[1:] for t in trace})
    df = hit_rate_curves(trace, capacities=range(0, distinct + 3), policies=("lru", "lfu", "belady"))
    assert (df["hits"] + df["compulsory_misses"] + df["capacity_misses"] == len(trace)).all()
    assert (df["compulsory_misses"] == distinct).all()
    assert (df.loc[df["capacity_experts"] >= distinct, "capacity_misses"] == 0).all()  # nothing is ever evicted
    wide = df.pivot(index="capacity_experts", columns="policy", values="misses")
    for policy in ("lru", "lfu"):
        got = df[df["policy"] == policy].set_index("capacity_experts")["policy_misses"]
        np.testing.assert_array_equal(got.to_numpy(), (wide[policy] - wide["belady"]).to_numpy())
        assert (got >= 0).all() and (got <= df[df["policy"] == policy]["capacity_misses"].to_numpy()).all()
    assert (df.loc[df["policy"] == "belady", "policy_misses"] == 0).all()
    for c in (1, 5, 17):  # one capacity: the same numbers
        one = miss_breakdown(trace, c, "lfu")
        row = df[(df["policy"] == "lfu") & (df["capacity_experts"] == c)].iloc[0]
        assert (one["hits"], one["capacity_misses"], one["policy_misses"]) == (
            row["hits"], row["capacity_misses"], row["policy_misses"])
        assert one["hit_rate"] + one["compulsory_share"] + one["capacity_share"] == pytest.approx(1.0)
    assert np.isnan(hit_rate_curves(trace, [4], policies=["lru"])["policy_misses"]).all()  # no optimal to compare


@pytest.mark.parametrize("seed", range(3))
def test_lru_limit_at_infinite_capacity_is_the_compulsory_ceiling(seed):
    trace = _trace(seed, n=240)
    ceiling = compulsory_ceiling(trace)
    assert ceiling == pytest.approx(1 - len({t[1:] for t in trace}) / len(trace), abs=1e-15)
    for huge in (10**6, 10**9):
        assert lru_hit_curve(trace, [huge]).iloc[0] == ceiling
        assert simulate(trace, huge, "lfu").hit_rate == ceiling
    curves = hit_rate_curves(trace, capacities=range(0, 80, 7))
    assert (curves["hit_rate"] <= curves["ceiling"] + 1e-12).all() and (curves["ceiling"] == ceiling).all()
    assert np.isnan(compulsory_ceiling([]))


def test_report_hit_rate_table_splits_each_run():
    import pandas as pd

    from smallthinker_lab.analysis.report import hit_rate_table

    trace = _trace(3, n=400)
    distinct = len({t[1:] for t in trace})
    caps = [4, 16, distinct]
    curves = hit_rate_curves(trace, capacities=range(0, distinct + 1), policies=("lru", "lfu", "belady"))
    rows = [{"mode": "in_memory", "variant": "in memory", "policy": None, "prefetch": None, "capacity_experts": np.nan,
             "limit_share_of_expert_bytes": 1.0, "hit_rate": np.nan, "requests": np.nan,
             "compulsory_misses": np.nan, "capacity_misses": np.nan}]
    for policy in ("lru", "lfu"):
        for c in caps:  # what the engine's counters give for a cold run of these requests
            sim = simulate(trace, c, policy)
            rows.append({"mode": "offload", "variant": "full", "policy": policy, "prefetch": True,
                         "capacity_experts": c, "limit_share_of_expert_bytes": c / distinct, "hit_rate": sim.hit_rate,
                         "requests": sim.requests, "compulsory_misses": sim.compulsory_misses,
                         "capacity_misses": sim.capacity_misses})
    table = hit_rate_table(pd.DataFrame(rows), curves)
    assert len(table) == 2 * len(caps)  # engine runs only
    np.testing.assert_allclose(table["hit_rate"] + table["compulsory_share"] + table["capacity_share"], 1.0)
    np.testing.assert_allclose(table["compulsory_share"], 1 - compulsory_ceiling(trace))
    assert (table["policy_share"] >= -1e-12).all() and (table["policy_share"] <= table["capacity_share"] + 1e-12).all()
    full = table[table["capacity_experts"] == distinct]
    assert (full["capacity_share"] == 0).all() and (full["hit_rate"] == full["ceiling"]).all()
