"""The expert cache: one cache for all layers, sized in bytes, slots preallocated once and reused.

Kept here rather than a cache library (functools, cachetools): none has byte-sized preallocated slots, entries
pinned during a step, in-flight reads that count as hits, or a trace that replays to the same counts (Belady).

Hit semantics (exact, so a recorded trace replays to the same counts):

* A *demand request* is the engine asking for expert (layer, e) because the router of the layer being computed
  selected it. With prefetch on it is issued right after the router, before attention; with prefetch off after
  attention; the sequence of requests is the same either way, so the hit count is too.
* A demand request is a **hit** if the expert has an entry in the cache at that moment, whether its bytes have
  landed or its read is still in flight (an earlier request of the same or another step started it). Otherwise it
  is a **miss**: a slot is taken (a free one, else the policy's victim among unpinned entries) and one read of the
  whole record is issued. Every demand request is appended to the trace, hit or miss.
* Cache state changes only on the engine's thread, in request order (I/O threads only fill buffers), so the
  hits are a deterministic function of the request sequence, independent of I/O timing. :func:`simulate` replays
  a trace through the same policy objects; with no look-ahead it gives exactly the engine's hits, misses and
  evictions: pinned entries are always the most recently requested ones, so the policy's victim is never pinned
  while capacity >= the experts pinned at once (the engine plans requests so that holds).
* Look-ahead (speculative) reads insert entries that are not demand requests and are skipped when no settled
  victim exists (that depends on I/O timing), so with look-ahead on the equality does not hold.

Policies: ``lru`` (OrderedDict), ``lfu`` (demand counts kept across evictions, ties broken by least recent use),
``belady`` (evicts the entry whose next demand is farthest in a known future trace; the optimal hit count).

Misses, split (the "3C" view without associativity): a **compulsory** miss is the first touch of an expert, one
that has not been in the cache since it was last emptied (no cache of any size avoids it); a **capacity** miss is
an expert that was in the cache earlier (demanded, look-ahead read or preloaded) and was evicted before this
request. Always hits + compulsory + capacity = requests. Policy misses (the part of the capacity misses that the
optimal policy would have avoided: misses - Belady's misses at the same capacity) need the whole trace: two
:func:`simulate` replays (``instruments.curves.miss_breakdown``). ``clear()`` forgets which experts were touched;
``reset_stats()`` zeroes the counters but keeps that memory (a warm cache's later misses on experts it held are
capacity misses).

Counters: ``bytes_read`` = (misses + look-ahead reads + preloads) x expert bytes. ``prefetch_issued`` counts reads
started before the data was needed: with prefetch on every demand miss (issued before attention) plus every
look-ahead read; ``prefetch_used`` those a layer then consumed, ``prefetch_wasted`` those evicted (or failed) unused.
Hook events: "hit" / "miss" per demand request, "prefetch" per look-ahead read, "evict" per eviction.
"""

from __future__ import annotations

import mmap
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .policies import (  # noqa: F401
    POLICIES,
    BeladyPolicy,
    Key,
    LFUPolicy,
    LRUPolicy,
    SimResult,
    _groups,
    _key,
    layer_chunks,
    make_policy,
    simulate,
)


# ------------------------------------------------------------------ slots
class SlotArena:
    """``n_slots`` buffers of ``slot_nbytes`` (a multiple of 4096) in one page-aligned allocation, made once.

    CPU: an anonymous mmap (page aligned, pages committed on first write, so an unused slot costs nothing);
    CUDA: one device tensor. ``tensor(i)`` is a uint8 view of slot i; ``buffer(i)`` a writable memoryview (CPU);
    ``flat_view(dtype)`` every slot as one flat tensor.
    """

    def __init__(self, n_slots: int, slot_nbytes: int, device: torch.device | str = "cpu") -> None:
        self.n_slots, self.slot_nbytes, self.device = n_slots, slot_nbytes, torch.device(device)
        size = max(1, n_slots * slot_nbytes)
        self._mm = None
        if self.device.type == "cpu":
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0)
            self._mm = mmap.mmap(-1, size, flags=flags)
            self._view = memoryview(self._mm)
            self._tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
        else:
            self._view = None
            self._tensor = torch.empty(size, dtype=torch.uint8, device=self.device)

    def tensor(self, slot: int) -> torch.Tensor:
        n = self.slot_nbytes
        return self._tensor[slot * n:(slot + 1) * n]

    def buffer(self, slot: int) -> memoryview:
        n = self.slot_nbytes
        return self._view[slot * n:(slot + 1) * n]

    def flat_view(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """Every slot, one after the other, as one flat tensor of ``dtype`` (a view: no copy). Slot i's record
        starts at element ``i * slot_nbytes // dtype.itemsize``."""
        if self._tensor is None:
            raise RuntimeError("the slot arena is closed")
        n = self.n_slots * self.slot_nbytes
        if n % dtype.itemsize:
            raise ValueError(f"{n} bytes of slots do not divide into elements of {dtype}")
        return self._tensor[:n].view(dtype)

    def close(self) -> None:
        # views handed out keep the mapping alive until they die; then the memory is returned
        self._tensor = self._view = self._mm = None


# ------------------------------------------------------------------ cache
@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    compulsory_misses: int = 0  # first touch since the cache was last emptied (see the module docstring)
    capacity_misses: int = 0  # the expert was in the cache earlier and was evicted
    bytes_read: int = 0
    evictions: int = 0
    prefetch_issued: int = 0  # reads started before the data was needed (pre-attention and look-ahead)
    prefetch_used: int = 0  # ... consumed by the MoE that needed them
    prefetch_wasted: int = 0  # ... evicted (or dropped after a failed read) without being used
    wasted_bytes: int = 0
    speculative_reads: int = 0  # look-ahead reads issued
    preloads: int = 0  # reads issued by preload() (a warm start), not demand requests
    io_wait_seconds: float = 0.0
    per_layer: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0.0]))  # layer -> hits, misses, wait

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    def miss_breakdown(self) -> dict[str, float]:
        """requests, hits, compulsory and capacity misses, and each as a share of the requests."""
        n = self.requests
        share = (lambda v: v / n) if n else (lambda v: float("nan"))
        return {"requests": n, "hits": self.hits, "compulsory_misses": self.compulsory_misses,
                "capacity_misses": self.capacity_misses, "hit_rate": share(self.hits),
                "compulsory_share": share(self.compulsory_misses), "capacity_share": share(self.capacity_misses)}


@dataclass(eq=False)
class Entry:
    """One expert in the cache: its slot, the read filling it (None once waited for), pins."""

    key: Key
    slot: int
    future: Future | None = None
    pins: int = 0
    ahead: bool = False  # read issued ahead of need and not consumed yet (prefetch accounting)
    speculative: bool = False  # inserted by look-ahead, not demanded yet
    result: object = None  # what the read's future returned (CUDA: the event the compute stream waits on)
    landed: Future | None = None  # set when the bytes are in the slot, before the read's checksum (if the loader
    # gives one: ``future.landed``); the entry may be computed then, and ``future`` tells later whether it verified

    @property
    def ready(self) -> bool:
        return self.future is None or self.future.done()


Loader = Callable[[Key, int], Future]  # (key, slot) -> future completing when the slot holds the record


class ExpertCache:
    """Entries keyed (layer, expert); a slot pool; a replacement policy; counters kept where events happen.

    ``loader(key, slot)`` starts filling a slot and returns a future (its exception is the read error).
    ``on_evict(entry)`` lets the device layer fence a slot before it is reused. ``hook(event, key, nbytes)``
    is called for "hit", "miss", "prefetch" and "evict" when set; ``log``, when a list, gets ``(step, key, event)``
    for each (the instruments' cheap path: one append, no call).
    """

    def __init__(self, capacity_bytes: int, expert_nbytes: int, policy: str = "lru", loader: Loader | None = None,
                 future_trace: Iterable | None = None, arena: SlotArena | None = None,
                 on_evict: Callable[[Entry], None] | None = None) -> None:
        if expert_nbytes <= 0:
            raise ValueError("expert_nbytes must be positive")
        self.capacity_bytes = int(capacity_bytes)
        self.expert_nbytes = int(expert_nbytes)
        self.capacity_experts = self.capacity_bytes // self.expert_nbytes
        if self.capacity_experts < 1:
            raise ValueError(f"a cache of {capacity_bytes} bytes holds no expert of {expert_nbytes} bytes")
        self.policy_name = policy
        self._future_trace = list(future_trace) if future_trace is not None else None
        self.policy = make_policy(policy, self._future_trace)
        self.loader = loader
        self.arena = arena
        self.on_evict = on_evict
        self.hook: Callable[[str, Key, int], None] | None = None
        self.log: list[tuple[int, Key, str]] | None = None  # when a list: (step, key, event) appended per event
        self.entries: dict[Key, Entry] = {}
        self.free: list[int] = list(range(self.capacity_experts - 1, -1, -1))
        self.stats = CacheStats()
        self.step = 0  # set by the engine: the forward step the next requests belong to
        self.trace: list[tuple[int, int, int]] = []  # (step, layer, expert) of every demand request
        self.touched: set[Key] = set()  # experts inserted since the cache was last emptied (compulsory vs capacity)

    # ------------------------------------------------------------ queries
    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def resident_bytes(self) -> int:
        """Bytes of slots holding an expert (loaded or in flight)."""
        return len(self.entries) * self.expert_nbytes

    def pinned(self) -> list[Key]:
        return [k for k, e in self.entries.items() if e.pins]

    # ------------------------------------------------------------ requests
    def request(self, key: Key, ahead: bool = False) -> Entry:
        """A demand request: pins the entry (release it after use); starts its read on a miss."""
        st = self.stats
        st.requests += 1
        self.trace.append((self.step, key[0], key[1]))
        entry = self.entries.get(key)
        hit = entry is not None
        self.policy.on_request(key, hit)
        layer_stats = st.per_layer[key[0]]
        if hit:
            self._count_hit(key, entry, layer_stats)
        else:
            st.misses += 1
            layer_stats[1] += 1
            if key in self.touched:
                st.capacity_misses += 1
            else:
                st.compulsory_misses += 1
            if self.hook:
                self.hook("miss", key, self.expert_nbytes)
            if self.log is not None:
                self.log.append((self.step, key, "miss"))
            entry = self._insert(key, self._take_slot(wait=True), ahead)
        entry.pins += 1
        return entry

    def _count_hit(self, key: Key, entry: Entry, layer_stats: list) -> None:
        self.stats.hits += 1
        layer_stats[0] += 1
        entry.speculative = False
        if self.hook:
            self.hook("hit", key, self.expert_nbytes)
        if self.log is not None:
            self.log.append((self.step, key, "hit"))

    def record_hits(self, rows, step: int) -> None:
        """Count requests that were served on the device from experts this cache holds (a graph decode step that
        read every expert from its slot): ``rows[layer]`` lists the expert ids of that layer. Requests, hits,
        per-layer hits, trace, policy and hooks exactly as :meth:`request`'s hit branch; nothing is pinned."""
        st = self.stats
        for layer, row in enumerate(rows):
            layer_stats = st.per_layer[layer]
            for x in row:
                key = (layer, int(x))
                st.requests += 1
                self.trace.append((step, layer, key[1]))
                self.policy.on_request(key, True)
                entry = self.entries.get(key)
                if entry is None:
                    raise RuntimeError(f"a device step counted a hit of {key}, which the expert cache does not hold")
                saved, self.step = self.step, step
                try:
                    self._count_hit(key, entry, layer_stats)
                finally:
                    self.step = saved

    @contextmanager
    def replaying(self, step: int):
        """Within: requests are counted at ``step`` and their misses read nothing (the device already wrote those
        experts into the slots this cache assigns): the host replays a device-resolved step through the cache."""
        saved = self.step, self.loader
        self.step, self.loader = step, _written_elsewhere
        try:
            yield self
        finally:
            self.step, self.loader = saved

    def lru_order(self) -> list[Key]:
        """The held experts from least to most recently used (the LRU policy only)."""
        order = getattr(self.policy, "order", None)
        if order is None:
            raise ValueError(f"lru_order() needs the LRU policy; this cache's is {self.policy_name!r}")
        return list(order)

    def speculate(self, key: Key) -> bool:
        """A look-ahead read: inserts ``key`` if a slot is free or a settled unpinned victim exists; never waits.
        Returns True if a read was issued."""
        if key in self.entries:
            return False
        slot = self._take_slot(wait=False)
        if slot is None:
            return False
        entry = self._insert(key, slot, ahead=True)
        entry.speculative = True
        self.stats.speculative_reads += 1
        if self.hook:
            self.hook("prefetch", key, self.expert_nbytes)
        if self.log is not None:
            self.log.append((self.step, key, "prefetch"))
        return True

    def _insert(self, key: Key, slot: int, ahead: bool) -> Entry:
        entry = Entry(key, slot, ahead=ahead)
        self.entries[key] = entry
        self.touched.add(key)
        self.policy.on_insert(key)
        self.stats.bytes_read += self.expert_nbytes
        if ahead:
            self.stats.prefetch_issued += 1
        try:
            entry.future = self.loader(key, slot)
            entry.landed = getattr(entry.future, "landed", None)
        except BaseException:
            self._drop(entry)
            raise
        return entry

    def _take_slot(self, wait: bool) -> int | None:
        if self.free:
            return self.free.pop()
        if wait:
            victim = self.policy.victim(lambda k: self.entries[k].pins == 0)
        else:
            victim = self.policy.victim(lambda k: self.entries[k].pins == 0 and self.entries[k].ready)
        if victim is None:
            if not wait:
                return None
            raise RuntimeError(f"expert cache full: all {self.capacity_experts} slots are pinned "
                               f"(the engine requested more experts at once than the cache holds)")
        entry = self.entries[victim]
        if entry.future is not None:
            self._wait_future(entry, swallow=True)  # the slot's buffer may still be being written
            if victim not in self.entries:  # its read failed: the entry was dropped and its slot freed
                return self.free.pop()
        self.stats.evictions += 1
        if entry.ahead:
            self.stats.prefetch_wasted += 1
            self.stats.wasted_bytes += self.expert_nbytes
        if self.hook:
            self.hook("evict", victim, self.expert_nbytes)
        if self.log is not None:
            self.log.append((self.step, victim, "evict"))
        if self.on_evict is not None:
            self.on_evict(entry)
        del self.entries[victim]
        self.policy.on_remove(victim)
        return entry.slot

    def _drop(self, entry: Entry) -> None:
        """Forget an entry whose read failed or was abandoned; its slot becomes free."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
            self.policy.on_remove(entry.key)
            self.free.append(entry.slot)
            self.touched.discard(entry.key)  # its bytes never arrived: asking again is still a first touch
            if entry.ahead:
                self.stats.prefetch_wasted += 1
                self.stats.wasted_bytes += self.expert_nbytes

    # ------------------------------------------------------------ waiting
    def _block(self, futures: list[Future], layer: int, return_when: str = ALL_COMPLETED) -> set[Future]:
        """Wait for ``futures``, the time blocked counted as I/O wait (overall and for ``layer``); the done set."""
        t0 = time.perf_counter()
        done, _ = wait_futures(futures, return_when=return_when)
        dt = time.perf_counter() - t0
        self.stats.io_wait_seconds += dt
        self.stats.per_layer[layer][2] += dt
        return done

    def _wait_future(self, entry: Entry, swallow: bool = False) -> None:
        fut = entry.future
        if fut is None:
            return
        if not fut.done():
            self._block([fut], entry.key[0])
        exc = fut.exception()
        if exc is not None:
            entry.pins = 0
            self._drop(entry)
            if swallow:
                return
            raise exc
        entry.result = fut.result()
        entry.future = None

    @staticmethod
    def _usable_signal(entry: Entry) -> Future | None:
        """What to wait for before computing with the entry: its bytes landing when the loader signals that (the
        checksum may still run), else the whole read."""
        if entry.future is None or entry.future.done() or entry.landed is None:
            return entry.future
        return entry.landed

    def wait(self, entry: Entry) -> Entry:
        """Block until the entry's bytes are in its slot; raise its read error (and drop the entry). With a loader
        that signals landed bytes, this returns once they landed and ``entry.future`` (not None then) completes
        after the checksum: the caller checks it before using the results."""
        sig = self._usable_signal(entry)
        if sig is not None and sig is entry.landed:
            if not sig.done():
                self._block([sig], entry.key[0])
            if sig.cancelled() or sig.exception() is not None:
                self._wait_future(entry)  # the read failed: raise its error, drop the entry
        else:
            self._wait_future(entry)
        if entry.ahead:
            entry.ahead = False
            self.stats.prefetch_used += 1
        return entry

    def as_completed(self, entries: Sequence[Entry]) -> Iterator[Entry]:
        """Yield entries ready to use: those already resident first (in the given order), then in the order
        their reads complete. Time blocked here counts as I/O wait."""
        pending = []
        for entry in entries:
            if entry.ready:
                yield self.wait(entry)
            else:
                pending.append(entry)
        while pending:
            by_future = {self._usable_signal(e): e for e in pending}
            done = self._block(list(by_future), pending[0].key[0], FIRST_COMPLETED)
            done_entries = [by_future[f] for f in done]
            done_ids = {id(e) for e in done_entries}
            pending = [e for e in pending if id(e) not in done_ids]
            for entry in sorted(done_entries, key=lambda e: e.key):
                yield self.wait(entry)

    def release(self, entry: Entry) -> None:
        if entry.pins > 0:
            entry.pins -= 1

    def drain(self) -> None:
        """After an interruption: wait for every read in flight (dropping failed ones) and unpin everything."""
        for entry in list(self.entries.values()):
            entry.pins = 0
            if entry.future is not None:
                fut = entry.future
                wait_futures([fut])
                if fut.exception() is not None:
                    self._drop(entry)
                else:
                    entry.future = None

    def clear(self) -> None:
        """Empty the cache (after draining) and start a fresh policy; counters and trace are kept. The next
        request of every expert is a first touch (compulsory) again."""
        self.drain()
        self.entries.clear()
        self.touched.clear()
        self.free = list(range(self.capacity_experts - 1, -1, -1))
        self.policy = make_policy(self.policy_name, self._future_trace)

    def reset_stats(self) -> None:
        """Zero the counters and the trace; the entries, the policy's state and which experts were touched stay
        (a warm cache stays warm)."""
        self.stats = CacheStats()
        self.trace = []

    # ------------------------------------------------------------ warm starts
    def preload(self, keys: Iterable[Key]) -> int:
        """Fill the cache with ``keys`` in the given order (the last ones count as the most recently used) and
        wait until their bytes are in their slots: a warm start. Not demand requests: requests, hits, misses and
        the trace are unchanged; ``bytes_read`` and ``preloads`` count the reads. A key already resident is left
        as it is (no read, no change to the policy's order); when the cache is full each new key takes the
        policy's victim, so only the last ``capacity_experts`` distinct keys are sure to stay. Raises the first
        read error (that entry is dropped). Returns the reads issued."""
        if any(e.pins for e in self.entries.values()):
            raise RuntimeError("preload() needs an idle cache: experts are pinned by a forward in progress")
        issued = []
        for item in keys:
            key = _key(item)
            if key[0] < 0 or key[1] < 0:
                raise ValueError(f"preload: expert key {key} must be (layer >= 0, expert >= 0)")
            if key in self.entries:
                continue
            entry = self._insert(key, self._take_slot(wait=True), ahead=False)
            self.stats.preloads += 1
            issued.append(entry)
        try:
            for entry in issued:
                if self.entries.get(entry.key) is entry:
                    self._wait_future(entry)
        except BaseException:
            self.drain()  # settle the other reads in flight before the error leaves
            raise
        return len(issued)


_DONE: Future = Future()
_DONE.set_result(None)


def _written_elsewhere(key, slot) -> Future:
    """The loader while a device-resolved step is replayed: the device already wrote the expert into its slot."""
    return _DONE
