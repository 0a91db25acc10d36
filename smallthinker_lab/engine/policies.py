"""Replacement policies of the expert cache (LRU, LFU, Belady's optimal) and the simulator that replays a recorded
request trace through any of them at any capacity, with the same layer chunking as the engine's cache."""

from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

Key = tuple[int, int]  # (layer, expert)


POLICIES = ("lru", "lfu", "belady")


# ------------------------------------------------------------------ policies
class LRUPolicy:
    """Least recently used: an OrderedDict from oldest to newest."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def on_request(self, key: Key, hit: bool) -> None:
        if hit:
            self.order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self.order[key] = None

    def on_remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        for key in self.order:
            if evictable(key):
                return key
        return None


class LFUPolicy:
    """Least frequently demanded (counts survive eviction), ties broken by least recent use."""

    def __init__(self) -> None:
        self.count: dict[Key, int] = defaultdict(int)
        self.last: dict[Key, int] = {}
        self.tick = 0
        self.heap: list[tuple[int, int, Key]] = []  # (count, last use, key), stale items skipped lazily

    def _push(self, key: Key) -> None:
        self.tick += 1
        self.last[key] = self.tick
        heapq.heappush(self.heap, (self.count[key], self.tick, key))

    def on_request(self, key: Key, hit: bool) -> None:
        self.count[key] += 1
        if hit:
            self._push(key)

    def on_insert(self, key: Key) -> None:
        self._push(key)

    def on_remove(self, key: Key) -> None:
        self.last.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        skipped, found = [], None
        while self.heap:
            item = heapq.heappop(self.heap)
            count, tick, key = item
            if self.last.get(key) != tick or self.count[key] != count:
                continue  # stale
            skipped.append(item)
            if evictable(key):
                found = key
                break
        for item in skipped:
            heapq.heappush(self.heap, item)
        if len(self.heap) > 4 * max(64, len(self.last)):  # compact stale items
            self.heap = [(self.count[k], t, k) for k, t in self.last.items()]
            heapq.heapify(self.heap)
        return found


class BeladyPolicy:
    """Optimal offline policy: evict the resident expert whose next demand request is farthest away."""

    def __init__(self, future: Iterable) -> None:
        self.next_uses: dict[Key, deque[int]] = defaultdict(deque)
        for i, item in enumerate(future):
            self.next_uses[_key(item)].append(i)
        self.position = 0
        self.resident: set[Key] = set()

    def on_request(self, key: Key, hit: bool) -> None:
        uses = self.next_uses.get(key)
        if not uses or uses[0] != self.position:
            raise ValueError(f"request {self.position} for expert {key} is not the one in the trace given to the "
                             f"belady policy: it needs the exact future request sequence")
        uses.popleft()
        self.position += 1

    def on_insert(self, key: Key) -> None:
        self.resident.add(key)

    def on_remove(self, key: Key) -> None:
        self.resident.discard(key)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        best, best_next = None, -1
        for key in sorted(self.resident):
            if not evictable(key):
                continue
            uses = self.next_uses.get(key)
            nxt = uses[0] if uses else float("inf")
            if nxt > best_next:
                best, best_next = key, nxt
        return best


def make_policy(name: str, future: Iterable | None = None):
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "belady":
        if future is None:
            raise ValueError("policy 'belady' needs the future request trace (e.g. a recorded engine.trace)")
        return BeladyPolicy(future)
    raise ValueError(f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}")


def _key(item) -> Key:
    """(layer, expert) from a (layer, expert) or (step, layer, expert) trace item."""
    return (int(item[-2]), int(item[-1]))


# ------------------------------------------------------------------ simulator
@dataclass
class SimResult:
    policy: str
    capacity_experts: int
    requests: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    compulsory_misses: int = 0  # first touch of an expert: no cache of any size avoids these
    capacity_misses: int = 0  # the expert was resident earlier and was evicted

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def compulsory_share(self) -> float:
        """Compulsory misses per request: 1 - this is the best hit rate any cache reaches on the trace."""
        return self.compulsory_misses / self.requests if self.requests else float("nan")


def simulate(trace: Sequence, capacity_experts: int, policy: str = "lru") -> SimResult:
    """Replay demand requests through a cache of ``capacity_experts`` entries, starting empty, with the engine's
    hit semantics (see the module docstring).

    Items are (layer, expert) or (step, layer, expert). With steps, the requests of one (step, layer) are one
    layer's demand and are pinned as the engine pins them (:func:`layer_chunks`): all of them while the layer
    computes when they fit the cache, else chunk by chunk. Pins never change an LRU victim (pinned entries are
    the most recent), but they can change an LFU or Belady one, so a trace with steps replays every policy
    exactly; (layer, expert) items are replayed without pins. Misses are split into compulsory (first request
    of a key) and capacity (the key was resident earlier), as the cache counts them.
    """
    if capacity_experts < 1:
        raise ValueError(f"capacity_experts must be >= 1, got {capacity_experts}")
    items = list(trace)
    keys = [_key(t) for t in items]
    pol = make_policy(policy, keys if policy == "belady" else None)
    resident: set[Key] = set()
    seen: set[Key] = set()
    res = SimResult(policy, capacity_experts)
    pinned: set[Key] = set()
    evictable = lambda k: k not in pinned
    for group in _groups(items, keys):
        chunks, double = layer_chunks(group, capacity_experts)
        for c, chunk in enumerate(chunks):
            pinned = set(chunks[c - 1]) if double and c > 0 else set()
            for key in chunk:
                res.requests += 1
                hit = key in resident
                pol.on_request(key, hit)
                if hit:
                    res.hits += 1
                else:
                    res.misses += 1
                    if key in seen:
                        res.capacity_misses += 1
                    else:
                        res.compulsory_misses += 1
                        seen.add(key)
                    if len(resident) >= capacity_experts:
                        victim = pol.victim(evictable)
                        resident.discard(victim)
                        pol.on_remove(victim)
                        res.evictions += 1
                    resident.add(key)
                    pol.on_insert(key)
                pinned.add(key)
    return res


def layer_chunks(experts: Sequence, capacity: int) -> tuple[list[list], bool]:
    """How the engine streams one layer's experts through a cache of ``capacity`` entries: one chunk when they fit;
    else chunks of capacity // 2 (at least 1), double buffered (chunk c + 1 requested while chunk c computes)
    when two chunks fit. Returns (chunks, double_buffered)."""
    experts = list(experts)
    if len(experts) <= capacity:
        return [experts], False
    size = max(1, capacity // 2)
    return [experts[j:j + size] for j in range(0, len(experts), size)], 2 * size <= capacity


def _groups(items: list, keys: list[Key]) -> Iterator[list[Key]]:
    """Consecutive requests of one (step, layer); single requests for (layer, expert) items."""
    group, gid = [], None
    for item, key in zip(items, keys):
        g = (item[0], item[1]) if len(item) >= 3 else object()
        if group and g != gid:
            yield group
            group = []
        gid = g
        group.append(key)
    if group:
        yield group
