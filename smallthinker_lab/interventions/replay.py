"""``replay(target, trace)``: forced routing that changes token by token, from a recorded routing trace.

``intervene(force=...)`` forces one list of experts on every token of a layer. A :class:`RoutingTrace` names the
experts of every position and layer of one sequence, as a recording of a generation holds them
(``layers.{i}.moe.topk_ids``); inside ``with replay(target, trace):`` the model or the engine routes position ``t``
of layer ``l`` to exactly ``trace.ids[t, l, :top_k]`` (weights from those experts' logits by the model's rule, as
``force``), whatever its own routers say. The block covers ONE sequence from position 0 (one generation: prompt,
then its decode steps); a forward past the trace's last position, or a batch of more than one sequence, raises
:class:`InterventionError`.

Mapping a trace onto another shape (:meth:`RoutingTrace.for_shape`), the rule, stated once:

* layers: layer ``l`` of the target takes the trace of layer ``l mod L_source``;
* experts: the same count, one to one; ``m`` times as many (E_target = m * E_source), expert ``e`` at position
  ``t`` becomes ``e + E_source * (t mod m)`` (each source expert is split over ``m`` target experts, alternating
  by token; all experts of one token move together, so they stay distinct); any other count is an error;
* top-k: the first ``top_k`` ranks of the trace; a target routing more experts than the source's top-k takes the
  next-ranked experts of the source router (by logit), so such a trace is recorded with ``ranks=`` (router logits).

On an engine, the look-ahead predicts the replayed experts (``oracle_lookahead=True``, the convention of
``intervene``: its predictions are then always right, its best case) or, with False, from the target's own router.
On an engine whose backend is the Triton kernels, decode steps stay on the kernels: the replay registers itself as
the engine's routing source and each step's kernels route to the trace's experts (forced routing inside the routing
kernel, weights by the model's rule), so the device-resolved LRU and the one-step-ahead decode run on the replayed
routing; any other hook in the block sends steps to the eager path (``Engine.explain()`` says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .edit import _target
from .intervene import InterventionError, _Rule


@dataclass(frozen=True)
class RoutingTrace:
    """Ranked experts of one sequence: ``ids[t, l, r]`` is the rank-``r`` expert of position ``t`` at layer ``l``.
    Ranks ``< top_k`` were routed to; later ranks are the next-ranked experts of the router (padding material for
    a shape with a larger top-k). ``tokens``: the sequence's token ids (prompt and fed-back tokens) in the source
    run; ``description`` says where the trace comes from and how it was mapped."""

    ids: np.ndarray  # (T, L, R) int64
    top_k: int
    num_experts: int
    tokens: np.ndarray | None = None
    description: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
            raise InterventionError(f"a routing trace's ids are an integer array (positions, layers, ranks), got "
                                    f"shape {ids.shape} of {ids.dtype}")
        if not 1 <= self.top_k <= ids.shape[2]:
            raise InterventionError(f"top_k={self.top_k} must be within the trace's {ids.shape[2]} ranks")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise InterventionError(f"trace ids must be in [0, {self.num_experts}), got [{ids.min()}, {ids.max()}]")
        object.__setattr__(self, "ids", ids.astype(np.int64, copy=False))

    @property
    def num_positions(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def ranks(self) -> int:
        return self.ids.shape[2]

    def __repr__(self) -> str:
        return (f"RoutingTrace({self.num_positions} positions, {self.num_layers} layers, top_k={self.top_k} of "
                f"{self.num_experts} experts, {self.ranks} ranks{', ' + self.description if self.description else ''})")

    @classmethod
    def from_recording(cls, rec, sequence: int = 0, ranks: int | None = None) -> RoutingTrace:
        """The routing of one recorded sequence (``record(target, kinds=("experts",))``; every layer recorded).
        ``ranks`` > top_k also takes the next-ranked experts by router logit, which needs the logits
        (``record(..., full=True)``)."""
        cfg = rec.config
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        ranks = K if ranks is None else int(ranks)
        if not K <= ranks <= E:
            raise InterventionError(f"ranks={ranks} must be between the model's top_k={K} and its {E} experts")
        if "experts" not in rec.kinds or sorted(rec.layers) != list(range(L)):
            raise InterventionError(f"a routing trace needs the 'experts' kind on every layer; the recording has "
                                    f"kinds {rec.kinds} on layers {rec.layers}")
        sel = np.flatnonzero(rec["tokens.sequence"] == sequence)
        if not len(sel):
            raise InterventionError(f"the recording has no sequence {sequence}")
        pos = rec["tokens.position"][sel]
        order = np.argsort(pos, kind="stable")
        sel, pos = sel[order], pos[order]
        if not np.array_equal(pos, np.arange(len(pos))):
            raise InterventionError(f"sequence {sequence} of the recording does not hold positions 0..{len(pos) - 1} "
                                    f"once each (record a generation from its first forward)")
        layers = []
        for i in range(L):
            chosen = np.asarray(rec[f"layers.{i}.moe.topk_ids"])[sel]  # (T, K)
            if ranks > K:
                name = f"layers.{i}.moe.router_logits"
                if name not in rec:
                    raise InterventionError(f"ranks={ranks} > top_k={K} needs the router logits: record with "
                                            f"full=True")
                logits = np.array(rec[name][sel], dtype=np.float64)
                np.put_along_axis(logits, chosen, -np.inf, axis=1)
                rest = np.argsort(-logits, axis=1, kind="stable")[:, :ranks - K]
                chosen = np.concatenate([chosen, rest], axis=1)
            layers.append(chosen)
        tokens = np.asarray(rec["tokens.id"])[sel]
        return cls(np.stack(layers, axis=1), K, E, tokens,
                   f"recorded: {getattr(cfg, 'num_hidden_layers', L)} layers x {E} experts, top-{K}")

    @classmethod
    def uniform(cls, num_positions: int, config, seed: int = 0) -> RoutingTrace:
        """Routing with no locality: every position and layer routes to ``top_k`` distinct experts drawn uniformly
        at random (seeded), the baseline that shows what a trained router's locality buys."""
        L, E, K = config.num_hidden_layers, config.num_experts, config.top_k
        if num_positions < 1:
            raise InterventionError(f"num_positions must be >= 1, got {num_positions}")
        g = torch.Generator().manual_seed(seed)
        ids = torch.rand(num_positions * L, E, generator=g).argsort(dim=-1)[:, :K].reshape(num_positions, L, K)
        return cls(ids.numpy(), K, E, None, f"uniform random top-{K} of {E} experts (seed {seed})")

    def for_shape(self, config) -> RoutingTrace:
        """This trace mapped onto a model of ``config`` by the module's rule (layers modulo, experts one to one or
        split alternating by token, top-k from the ranks)."""
        L, E, K = config.num_hidden_layers, config.num_experts, config.top_k
        if E % self.num_experts:
            raise InterventionError(f"cannot map a trace of {self.num_experts} experts onto {E}: the rule maps one to "
                                    f"one or splits each expert over a whole multiple of them")
        if K > self.ranks:
            raise InterventionError(f"the target routes top_k={K} but the trace has {self.ranks} ranks: record it "
                                    f"with ranks >= {K} (RoutingTrace.from_recording(rec, ranks={K}) of a recording "
                                    f"made with full=True)")
        m = E // self.num_experts
        ids = self.ids[:, [layer % self.num_layers for layer in range(L)], :K]  # (T, L, K)
        if m > 1:
            ids = ids + (self.num_experts * (np.arange(self.num_positions) % m))[:, None, None]
        split = f"expert e at position t -> e + {self.num_experts} * (t mod {m})"
        rule = (f"layer l <- l mod {self.num_layers}; " + ("experts one to one" if m == 1 else split)
                + (f"; top-{K} = top-{self.top_k} + next-ranked" if K > self.top_k else f"; top-{K}"))
        desc = f"{self.description}; mapped onto {L} layers x {E} experts ({rule})"
        return RoutingTrace(ids, K, E, self.tokens, desc)


def record_routing(target, prompts: Sequence, new_tokens: int, ranks: int | None = None) -> list[RoutingTrace]:
    """One :class:`RoutingTrace` per prompt (token ids): greedy generation of ``new_tokens`` on ``target`` (a
    model or an engine), recorded; the trace covers the prompt and the decode steps (len(prompt) + new_tokens - 1
    positions: what a generation of ``new_tokens`` from that prompt feeds)."""
    from ..instruments import record
    from ..model.generate import generate

    K = target.config.top_k
    full = ranks is not None and ranks > K
    out = []
    for ids in prompts:
        with record(target, kinds=("experts",), full=full) as rec:
            if hasattr(target, "stream"):  # an engine
                target.generate(list(ids), new_tokens, stop_tokens=[])
            else:
                generate(target, list(ids), new_tokens, stop_tokens=[])
        out.append(RoutingTrace.from_recording(rec, 0, ranks))
    return out


class replay:  # noqa: N801  (a function-like context manager, as intervene())
    """Route ``target`` (a SmallThinkerForCausalLM or an Engine) by ``trace`` inside a ``with`` block: one
    sequence from position 0 (see the module docstring). The trace must have the target's layers, experts and
    top-k (map it first with ``trace.for_shape(target.config)``)."""

    def __init__(self, target, trace: RoutingTrace, oracle_lookahead: bool = True) -> None:
        from .edit import hooks

        self.target = _target(target)
        if not isinstance(trace, RoutingTrace):
            raise InterventionError(f"replay() needs a RoutingTrace, got {type(trace).__name__}")
        cfg = target.config
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        have = (trace.num_layers, trace.num_experts, trace.top_k)
        if have != (L, E, K):
            raise InterventionError(f"the trace has {have[0]} layers x {have[1]} experts, top-{have[2]}; the target "
                                    f"{L} x {E}, top-{K}: map it with trace.for_shape(target.config)")
        self.trace = trace
        self.position = 0  # the next position the target will route
        self._chunk = (0, 0)
        self._ids = torch.from_numpy(np.ascontiguousarray(trace.ids[:, :, :K]))
        self._on_device: dict = {}
        self.oracle_lookahead = oracle_lookahead
        rules = [_Rule(self._layer_rule(i), oracle_lookahead) for i in range(L)]
        for rule in rules:
            rule.owner = self  # the engine's kernels may carry these out themselves (HookRegistry.unowned)
        spec = [("blocks.0.hook_resid_pre", self._clock)]
        spec += [(f"blocks.{i}.moe.hook_topk_ids", rule) for i, rule in enumerate(rules)]
        self._hooks = hooks(target, spec)
        self._forward_handle = None

    def _clock(self, x: torch.Tensor, name: str) -> None:
        """Layer 0's input of every forward chunk (B, T, H): the positions this chunk routes."""
        if x.shape[0] != 1:
            raise InterventionError(f"replay() routes one sequence; this forward has a batch of {x.shape[0]}")
        start, end = self.position, self.position + x.shape[1]
        if end > self.trace.num_positions:
            raise InterventionError(f"replay(): this forward routes positions {start}..{end - 1} but the trace covers "
                                    f"0..{self.trace.num_positions - 1}: record a longer trace or generate fewer "
                                    f"tokens (one replay block per generation)")
        self._chunk, self.position = (start, end), end
        return None

    def _on_forward(self, start: int = 0, tokens: int = 0, **_) -> None:
        if start + tokens != self.position:
            raise InterventionError(f"replay(): a forward of positions {start}..{start + tokens - 1} after the trace "
                                    f"routed up to position {self.position - 1}: one replay block covers one "
                                    f"generation from position 0")

    def _layer_rule(self, layer: int):
        def fn(ids: torch.Tensor) -> torch.Tensor:
            start, end = self._chunk
            if ids.shape[0] != end - start:
                raise InterventionError(f"replay(): layer {layer} routes {ids.shape[0]} tokens, the forward chunk "
                                        f"has {end - start}")
            table = self._on_device.get(ids.device)
            if table is None:
                table = self._on_device[ids.device] = self._ids.to(ids.device)
            return table[start:end, layer].to(ids.dtype).contiguous()

        return fn

    def take(self, start: int, n: int = 1) -> torch.Tensor:
        """The experts (n, L, K) of positions ``start``.. on the target's device, for a decode kernel that routes
        them itself; advances the replay's position as a forward through the hooks would, with the same checks."""
        if start != self.position:
            raise InterventionError(f"replay(): a decode step at position {start} after the trace routed up to "
                                    f"position {self.position - 1}: one replay block covers one generation from "
                                    f"position 0")
        if start + n > self.trace.num_positions:
            raise InterventionError(f"replay(): this forward routes positions {start}..{start + n - 1} but the trace "
                                    f"covers 0..{self.trace.num_positions - 1}: record a longer trace or generate "
                                    f"fewer tokens (one replay block per generation)")
        device = self.target.device
        table = self._on_device.get(device)
        if table is None:
            table = self._on_device[device] = self._ids.to(device)
        self._chunk, self.position = (start, start + n), start + n
        return table[start:start + n]

    def rewind(self, n: int) -> None:
        """Give back the last ``n`` positions (a decode step launched past a stop token is not kept)."""
        if not 0 <= n <= self.position:
            raise InterventionError(f"replay(): cannot rewind {n} positions from position {self.position}")
        self.position -= n

    def __repr__(self) -> str:
        return f"replay({self.trace!r}, at position {self.position})"

    def __enter__(self) -> replay:
        self.position, self._chunk = 0, (0, 0)
        self._hooks.__enter__()
        try:
            self._forward_handle = self.target.hooks.add("forward", self._on_forward)
        except BaseException:
            self._hooks.__exit__(None, None, None)
            raise
        registry = self.target.hooks
        self._owns_routing = registry.routing is None  # the kernels of an Engine or a KernelRunner read it
        if self._owns_routing:
            registry.routing = self
        return self

    def __exit__(self, *exc) -> bool:
        if getattr(self, "_owns_routing", False):
            self.target.hooks.routing = None
            self._owns_routing = False
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None
        return self._hooks.__exit__(*exc)
