"""A tiny hook registry shared by the model and the engine.

Instruments subscribe to named points; the model and the engine fire them only when
someone listens, so an unobserved forward pays one dict lookup per point.

Points and their payloads (keyword arguments):

- ``router``: layer, logits [N, E] (raw), topk_ids [N, k], topk_weights [N, k]
- ``expert``: layer, expert, token_index [n], gate [n, F] (pre-ReLU gate output); once per routed expert
- ``moe``: layer, experts [list of int], token_index [list of Tensor [n] | None (every row of the forward chunk)],
  gates [list of Tensor [n, F]]: the layer's ``expert`` payloads in one call, after its experts ran
- ``forward``: phase ("prefill" | "decode"), start (first position), tokens, cache (KVCache | None), seconds
- ``cache`` (engine): step, layer, expert, event ("hit" | "miss" | "prefetch" | "evict"), nbytes
- ``cache_events`` (engine): events [list of (step, (layer, expert), event)], nbytes (per event): the forward's
  ``cache`` events in one call, at the end of the forward, before ``forward``
- ``timing`` (engine): step, layer, part ("router" | "attention" | "moe" | "lm_head"), seconds

The instruments listen to the batched points (``moe``, ``cache_events``) and read the engine's cumulative clocks at
each ``forward`` instead of ``timing``: one call per layer or per forward instead of one per expert or event.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class HookHandle:
    def __init__(self, registry: HookRegistry, point: str, fn: Callable) -> None:
        self._registry, self._point, self._fn = registry, point, fn

    def remove(self) -> None:
        fns = self._registry._hooks.get(self._point)
        if fns and self._fn in fns:
            fns.remove(self._fn)
            if not fns:
                del self._registry._hooks[self._point]


class HookRegistry:
    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable]] = defaultdict(list)

    def add(self, point: str, fn: Callable) -> HookHandle:
        self._hooks[point].append(fn)
        return HookHandle(self, point, fn)

    def active(self, point: str) -> bool:
        return point in self._hooks

    def fire(self, point: str, **payload) -> None:
        fns = self._hooks.get(point)
        if not fns:
            return
        if len(fns) == 1:  # the usual case: one listener, no copy of the list
            fns[0](**payload)
            return
        for fn in tuple(fns):  # a copy: a listener may remove itself
            fn(**payload)

    def __len__(self) -> int:
        return sum(len(v) for v in self._hooks.values())
