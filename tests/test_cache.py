"""The expert cache and its simulator: policies, hit semantics, pins, slot reuse, counters."""

import random
from concurrent.futures import Future

import pytest

from smallthinker_lab.engine.cache import ExpertCache, SlotArena, simulate
from smallthinker_lab.engine.io import aligned_buffer

A, B, C, D = (0, 0), (0, 1), (1, 0), (1, 1)
NB = 4096


class Loader:
    """Hands out futures the test completes; records (key, slot) of every load."""

    def __init__(self, complete: bool = True) -> None:
        self.complete, self.loads, self.futures = complete, [], {}

    def __call__(self, key, slot):
        fut = Future()
        if self.complete:
            fut.set_result(None)
        self.loads.append((key, slot))
        self.futures[key] = fut
        return fut


def make(capacity=2, policy="lru", complete=True, **kw):
    loader = Loader(complete)
    return ExpertCache(capacity * NB, NB, policy, loader=loader, **kw), loader


def replay(cache, trace):
    for key in trace:
        e = cache.request(key)
        cache.wait(e)
        cache.release(e)


def test_lru_and_lfu_on_known_traces():
    # capacity 2, A B A C B: C evicts B (least recently used), so B misses again
    assert simulate([A, B, A, C, B], 2, "lru").hits == 1
    # A A A B C A: LRU evicts A for C; LFU keeps A (3 demands) and evicts B
    assert simulate([A, A, A, B, C, A], 2, "lru").hits == 2
    assert simulate([A, A, A, B, C, A], 2, "lfu").hits == 3
    # (step, layer, expert) items work the same
    assert simulate([(0, *A), (0, *B), (1, *A)], 1, "lru").hits == 0


def _optimal_hits(trace, capacity):
    """Brute force over every eviction choice: the most hits any policy can get."""
    best = 0

    def go(i, resident, hits):
        nonlocal best
        if i == len(trace):
            best = max(best, hits)
            return
        key = trace[i]
        if key in resident:
            go(i + 1, resident, hits + 1)
        elif len(resident) < capacity:
            go(i + 1, resident | {key}, hits)
        else:
            for v in resident:
                go(i + 1, (resident - {v}) | {key}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_is_optimal_and_bounds_the_others():
    rng = random.Random(0)
    keys = [A, B, C, D, (2, 0)]
    for _ in range(30):
        trace = [rng.choice(keys) for _ in range(11)]
        for cap in (1, 2, 3):
            opt = simulate(trace, cap, "belady").hits
            assert opt == _optimal_hits(trace, cap)
            assert opt >= simulate(trace, cap, "lru").hits and opt >= simulate(trace, cap, "lfu").hits


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_cache_replays_exactly_like_the_simulator(policy):
    rng = random.Random(1)
    trace = [(rng.randrange(4), rng.randrange(6)) for _ in range(300)]
    cache, _ = make(5, policy, future_trace=trace if policy == "belady" else None)
    replay(cache, trace)
    sim = simulate(trace, 5, policy)
    st = cache.stats
    assert (st.hits, st.misses, st.evictions) == (sim.hits, sim.misses, sim.evictions)
    assert st.hits + st.misses == st.requests == len(cache.trace) == 300
    assert st.bytes_read == st.misses * NB


def test_in_flight_read_counts_as_hit_and_loads_once():
    cache, loader = make(2, complete=False)
    e1 = cache.request(A, ahead=True)
    e2 = cache.request(A)  # the read is still in flight: a hit, no second read
    assert e1 is e2 and cache.stats.hits == 1 and len(loader.loads) == 1
    loader.futures[A].set_result(None)
    cache.wait(e1)
    assert cache.stats.prefetch_issued == cache.stats.prefetch_used == 1


def test_pinned_entries_are_never_evicted_and_slots_are_reused():
    cache, loader = make(2)
    ea = cache.request(A)
    cache.request(B)
    with pytest.raises(RuntimeError, match="all 2 slots are pinned"):
        cache.request(C)
    cache.release(ea)  # A is now the only evictable entry, although B is older... B is pinned
    cache.request(D)
    assert A not in cache and B in cache and D in cache
    slot_a = loader.loads[0][1]
    assert loader.loads[-1] == (D, slot_a)  # the evicted entry's buffer goes to the next load
    assert {s for _, s in loader.loads} <= {0, 1}


def test_speculation_never_waits_and_counts_waste():
    cache, loader = make(2, complete=False)
    cache.request(A)
    cache.release(cache.entries[A])
    cache.request(B)
    cache.release(cache.entries[B])
    assert cache.speculate(C) is False  # only victims with reads in flight: skip, do not wait
    loader.futures[A].set_result(None)
    loader.futures[B].set_result(None)
    assert cache.speculate(C) is True and A not in cache  # A was least recently used
    assert cache.speculate(C) is False  # already resident
    loader.futures[C].set_result(None)
    cache.request(D)  # D evicts B (C is newer), then a demand for another key evicts the unused C
    cache.release(cache.entries[D])
    loader.futures[D].set_result(None)
    cache.request((3, 3))
    st = cache.stats
    assert st.speculative_reads == 1 and st.prefetch_wasted == 1 and st.wasted_bytes == NB
    assert st.bytes_read == (st.misses + st.speculative_reads) * NB


def test_failed_read_raises_and_frees_the_slot():
    cache, loader = make(2, complete=False)
    e = cache.request(A)
    loader.futures[A].set_exception(OSError("boom"))
    with pytest.raises(OSError, match="boom"):
        cache.wait(e)
    assert A not in cache and len(cache.free) == 2
    e = cache.request(A)  # asked again: a miss, read again
    assert cache.stats.misses == 2


def test_drain_settles_reads_and_unpins():
    cache, loader = make(3, complete=False)
    cache.request(A)
    cache.request(B)
    loader.futures[A].set_result(None)
    loader.futures[B].set_exception(OSError("x"))
    cache.drain()
    assert cache.pinned() == [] and A in cache and B not in cache


def test_arena_slots_are_page_aligned_and_allocated_once():
    arena = SlotArena(3, 2 * NB)
    base = arena.tensor(0).data_ptr()
    assert base % 4096 == 0
    assert [arena.tensor(i).data_ptr() - base for i in range(3)] == [0, 2 * NB, 4 * NB]
    arena.buffer(2)[:] = b"\1" * (2 * NB)
    assert int(arena.tensor(2).sum()) == 2 * NB and int(arena.tensor(1).sum()) == 0
    assert aligned_buffer(100)  # page-sized at least


def test_unknown_policy_and_belady_without_future():
    with pytest.raises(ValueError, match="unknown cache policy"):
        simulate([A], 1, "fifo")
    with pytest.raises(ValueError, match="future request trace"):
        make(2, "belady")


def test_miss_breakdown_by_hand():
    # capacity 2, A B A C B A: A, B, C are first touches; B (evicted by C) and A (evicted by B) come back
    res = simulate([A, B, A, C, B, A], 2, "lru")
    assert (res.hits, res.compulsory_misses, res.capacity_misses) == (1, 3, 2)
    assert res.compulsory_share == 0.5


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_compulsory_plus_capacity_plus_hits_is_requests(policy):
    rng = random.Random(2)
    trace = [(s, rng.randrange(3), rng.randrange(8)) for s in range(60) for _ in range(3)]
    distinct = len({t[1:] for t in trace})
    for cap in (1, 3, 7, distinct, distinct + 5):
        sim = simulate(trace, cap, policy)
        assert sim.hits + sim.compulsory_misses + sim.capacity_misses == sim.requests == len(trace)
        assert sim.compulsory_misses == distinct  # a cold cache misses each key once at least
        if cap >= distinct:
            assert sim.capacity_misses == 0
        keys = [t[1:] for t in trace]  # the cache replayed request by request (no pins): the simulator agrees
        cache, _ = make(cap, policy, future_trace=keys if policy == "belady" else None)
        replay(cache, keys)
        st, unpinned = cache.stats, simulate(keys, cap, policy)
        assert (st.compulsory_misses, st.capacity_misses) == (unpinned.compulsory_misses, unpinned.capacity_misses)
        assert st.miss_breakdown()["compulsory_share"] == distinct / len(trace)


def test_clear_forgets_touches_and_reset_stats_keeps_them():
    cache, _ = make(1)
    replay(cache, [A, B])  # A evicted by B
    cache.reset_stats()
    replay(cache, [A])  # A was in the cache before the reset: a capacity miss
    assert (cache.stats.compulsory_misses, cache.stats.capacity_misses) == (0, 1)
    cache.clear()
    cache.reset_stats()
    replay(cache, [A])  # an emptied cache: first touch again
    assert (cache.stats.compulsory_misses, cache.stats.capacity_misses) == (1, 0)


def test_failed_read_is_not_a_touch():
    cache, loader = make(2, complete=False)
    e = cache.request(A)
    loader.futures[A].set_exception(OSError("boom"))
    with pytest.raises(OSError):
        cache.wait(e)
    cache.request(A)
    assert cache.stats.compulsory_misses == 2 and cache.stats.capacity_misses == 0


def test_preload_fills_without_requests_and_warm_hits():
    cache, loader = make(3)
    assert cache.preload([A, B, (0, 0), C, D]) == 4  # A again: no read; D evicts A (least recent)
    st = cache.stats
    assert (st.requests, st.hits, st.misses, cache.trace) == (0, 0, 0, [])
    assert st.preloads == 4 and st.bytes_read == 4 * NB and st.evictions == 1
    assert A not in cache and all(k in cache for k in (B, C, D))
    assert cache.pinned() == [] and all(e.ready for e in cache.entries.values())
    replay(cache, [B, C, D, A])
    assert (cache.stats.hits, cache.stats.capacity_misses, cache.stats.compulsory_misses) == (3, 1, 0)


def test_preload_refuses_bad_keys_and_raises_read_errors():
    cache, _ = make(2)
    with pytest.raises(ValueError, match=r"\(-1, 0\)"):
        cache.preload([(-1, 0)])
    cache, loader = make(2, complete=False)

    def failing(key, slot):
        fut = Future()
        fut.set_exception(OSError(f"read of {key} failed"))
        return fut

    cache.loader = failing
    with pytest.raises(OSError, match=r"read of \(0, 0\) failed"):
        cache.preload([A, B])
    assert len(cache) == 0 and len(cache.free) == 2
