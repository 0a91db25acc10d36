"""Hit-rate curves: one-pass LRU stack distances against replay; LFU and Belady by the engine's simulator."""

import random
from collections import OrderedDict

import numpy as np
import pytest

from smallthinker_lab.engine.cache import simulate
from smallthinker_lab.instruments import hit_rate_curves, lru_hit_curve, policy_hit_curve, stack_distances


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
    assert list(df.columns) == ["policy", "capacity_experts", "capacity_bytes", "hits", "misses", "hit_rate"]
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
