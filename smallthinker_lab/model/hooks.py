"""A tiny hook registry shared by the model and the engine: observer points and edit points.

Observer points (``registry.add(point, fn)``; ``fn(**payload)``, its return value ignored). Instruments subscribe
to them; the model and the engine fire them only when someone listens, so an unobserved forward pays one dict
lookup per point. Points and their payloads (keyword arguments):

- ``router``: layer, logits [N, E] (as routed: after edit hooks), topk_ids [N, k], topk_weights [N, k]
- ``expert``: layer, expert, token_index [n], gate [n, F] (pre-ReLU gate output); once per routed expert
- ``moe``: layer, experts [list of int], token_index [list of Tensor [n] | None (every row of the forward chunk)],
  gates [list of Tensor [n, F]]: the layer's ``expert`` payloads in one call, after its experts ran
- ``forward``: phase ("prefill" | "decode"), start (first position), tokens, cache (KVCache | None), seconds,
  input_ids (B, T) (the forward's tokens)
- ``cache`` (engine): step, layer, expert, event ("hit" | "miss" | "prefetch" | "evict"), nbytes
- ``cache_events`` (engine): events [list of (step, (layer, expert), event)], nbytes (per event): the forward's
  ``cache`` events in one call, at the end of the forward, before ``forward``
- ``timing`` (engine): step, layer, part ("router" | "attention" | "moe" | "lm_head"), seconds

The instruments listen to the batched points (``moe``, ``cache_events``) and read the engine's cumulative clocks at
each ``forward`` instead of ``timing``: one call per layer or per forward instead of one per expert or event.

Edit points (:data:`HOOK_POINTS`, TransformerLens-like names): ``fn(tensor, name)`` may return a replacement of the
same shape (cast to the tensor's dtype and device) or None to leave it. They are registered with the same ``add``
(``smallthinker_lab.hooks()`` does it in a ``with`` block) and fired by :meth:`HookRegistry.edit`. A forward with no
edit hook registered pays one integer test per layer. Registered hooks of either kind make the engine's graph and
kernel decoders step aside: such decode steps run eager (``Engine.explain()`` says so), except the hooks of a routing
replay (``routing``), which the kernel decoders carry out themselves.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch

# (name pattern, shape, what the tensor is): the one table of edit points. Letters: B batch, T new tokens, S keys
# attended (cached + new), H hidden, h query heads, k kv heads, D head_dim, N = B*T token rows, E experts,
# K active experts, n rows routed to the expert, F expert ffn size.
HOOK_POINTS: list[tuple[str, str, str]] = [
    ("blocks.{i}.hook_resid_pre", "(B, T, H)", "residual entering layer i (the router reads it, before the norm)"),
    ("blocks.{i}.attn.hook_q", "(B, h, T, D)", "queries, after RoPE on RoPE layers"),
    ("blocks.{i}.attn.hook_k", "(B, k, T, D)", "keys of the new tokens, after RoPE, before the KV cache stores them"),
    ("blocks.{i}.attn.hook_v", "(B, k, T, D)", "values of the new tokens, before the KV cache stores them"),
    ("blocks.{i}.attn.hook_pattern", "(B, h, T, S)",
     "attention probabilities; computed explicitly (not by the fused kernel) only while this point is hooked"),
    ("blocks.{i}.hook_attn_out", "(B, T, H)", "attention output (after o_proj), added to the residual"),
    ("blocks.{i}.hook_resid_mid", "(B, T, H)", "residual after attention, before the MoE"),
    ("blocks.{i}.moe.hook_router_logits", "(N, E)", "raw router logits (of hook_resid_pre), before the top-k"),
    ("blocks.{i}.moe.hook_topk_ids", "(N, K)", "chosen experts; an edit re-derives the weights from the logits "
                                               "of the new ids by the model's rule"),
    ("blocks.{i}.moe.hook_topk_weights", "(N, K)", "routing weights of the chosen experts"),
    ("blocks.{i}.moe.experts.{e}.hook_act", "(n, F)", "relu(gate(x)) * up(x) of expert e (its neurons), rows of "
                                                      "the tokens routed to it"),
    ("blocks.{i}.hook_moe_out", "(B, T, H)", "the MoE's output (weighted sum of the experts), added to the residual"),
    ("blocks.{i}.hook_resid_post", "(B, T, H)", "residual leaving layer i"),
    ("hook_final_norm", "(B, T, H)", "the final RMSNorm's output, the LM head's input (engine: the rows it "
                                     "scores, the last position unless exact)"),
]

_EDIT_PREFIXES = ("blocks.", "hook_final_norm")
_PATTERNS = [re.compile("^" + re.escape(p).replace(r"\{i\}", r"(\d+)").replace(r"\{e\}", r"(\d+)") + "$")
             for p, _, _ in HOOK_POINTS]


def is_edit_point(name: str) -> bool:
    return name.startswith(_EDIT_PREFIXES)


def hook_names(config) -> list[str]:
    """Every edit point of a model of ``config``, in forward order within each layer."""
    out = []
    for i in range(config.num_hidden_layers):
        for pattern, _, _ in HOOK_POINTS:
            if "{e}" in pattern:
                out += [pattern.format(i=i, e=e) for e in range(config.num_experts)]
            elif "{i}" in pattern:
                out.append(pattern.format(i=i))
    return out + ["hook_final_norm"]


def check_hook_name(name: str, config) -> None:
    """ValueError unless ``name`` is an edit point of a model of ``config`` (the message names the table)."""
    for pat in _PATTERNS:
        m = pat.match(name)
        if m:
            nums = [int(g) for g in m.groups()]
            if nums and nums[0] >= config.num_hidden_layers:
                raise ValueError(f"hook point {name!r}: layer {nums[0]} is out of range (the model has "
                                 f"{config.num_hidden_layers} layers)")
            if len(nums) > 1 and nums[1] >= config.num_experts:
                raise ValueError(f"hook point {name!r}: expert {nums[1]} is out of range (the model has "
                                 f"{config.num_experts} experts per layer)")
            return
    known = ", ".join(p for p, _, _ in HOOK_POINTS)
    raise ValueError(f"unknown hook point {name!r}; the points are: {known}")


def hook_points_table():
    """The edit points as a DataFrame (name pattern, shape, meaning)."""
    import pandas as pd

    return pd.DataFrame(HOOK_POINTS, columns=["name", "shape", "meaning"])


class HookHandle:
    def __init__(self, registry: HookRegistry, point: str, fn: Callable) -> None:
        self._registry, self._point, self._fn = registry, point, fn

    def remove(self) -> None:
        reg = self._registry
        fns = reg._hooks.get(self._point)
        if fns and self._fn in fns:
            fns.remove(self._fn)
            if is_edit_point(self._point):
                reg.edits -= 1
            if not fns:
                del reg._hooks[self._point]


class HookRegistry:
    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable]] = defaultdict(list)
        self.edits = 0  # edit hooks registered: the model and the engine skip every edit point while 0
        # a routing replay (interventions.replay) whose hooks the engine's decode kernels can carry out themselves
        # (forced routing in the kernels): its hooks are ``owned`` by it (``unowned`` counts the others)
        self.routing = None

    def add(self, point: str, fn: Callable) -> HookHandle:
        self._hooks[point].append(fn)
        if is_edit_point(point):
            self.edits += 1
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

    def edit(self, name: str, tensor: torch.Tensor, rules_only: bool = False) -> torch.Tensor:
        """``tensor`` through the edit hooks of ``name`` in registration order (each sees the previous one's
        result). ``rules_only``: only hooks marked ``speculative = True`` (the rules of ``intervene()``, which the
        engine's look-ahead applies to its predicted routing)."""
        fns = self._hooks.get(name)
        if not fns:
            return tensor
        for fn in tuple(fns):
            if rules_only and not getattr(fn, "speculative", False):
                continue
            out = fn(tensor, name)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"hook {getattr(fn, '__name__', fn)!r} on {name!r} returned "
                                f"{type(out).__name__}; return a tensor of shape {tuple(tensor.shape)} or None")
            if out.shape != tensor.shape:
                raise ValueError(f"hook {getattr(fn, '__name__', fn)!r} on {name!r} returned shape "
                                 f"{tuple(out.shape)}; the point's tensor has shape {tuple(tensor.shape)}")
            tensor = out.to(dtype=tensor.dtype, device=tensor.device)
        return tensor

    def __len__(self) -> int:
        return sum(len(v) for v in self._hooks.values())

    def unowned(self) -> int:
        """Hooks that do not belong to ``routing`` (every hook while none is set): a hook belongs to it when it is
        one of its bound methods or carries ``owner = routing``."""
        owner = self.routing
        return sum(1 for fns in self._hooks.values() for fn in fns
                   if owner is None or (getattr(fn, "__self__", None) is not owner
                                        and getattr(fn, "owner", None) is not owner))

    def forced_routing(self):
        """The routing replay whose hooks are the only ones registered (the decode kernels then route to its
        trace themselves), or None."""
        return self.routing if self.routing is not None and self.unowned() == 0 else None
