"""``intervene(target, ablate=..., force=..., scale=...)``: expert ablation, forced routing and scaling.

Semantics, per layer (the model and the engine alike, prefill and every decode step):

* ``ablate={layer: [expert, ...]}`` (``ablate_mode="route"``, the default): those experts leave the routing. Their
  router logits are set to -inf before the top-k, so the next-best experts are chosen, and the weights come from
  the chosen experts' logits by the model's rule (sigmoid renormalised to sum 1, or softmax, as the config says).
  At least top_k experts must remain in the layer.
* ``ablate_mode="zero"``: the routing is kept (the ablated experts are still chosen and computed, the other
  weights are not renormalised) and the ablated experts' outputs are zero: their neurons (``hook_act``) times 0.
* ``force={layer: [e1, ..., ek]}``: every token's top-k is replaced by exactly these k experts (in this order),
  their weights by the model's rule from their logits.
* ``scale={layer: {expert: factor}}``: the expert's contribution (its output, weight included) times ``factor``:
  its neurons (``hook_act``) times ``factor``, which the linear down projection carries to the output.

The rules are edit hooks (``smallthinker_lab.hooks``): ``hook_router_logits`` (route ablation), ``hook_topk_ids``
(force) and ``experts.{e}.hook_act`` (zero, scale). On an engine the pre-attention prefetch requests the intervened
experts and the look-ahead predicts with the rules applied, so the cache counters stay those of what is computed;
decode steps run eager while an intervention is active (the graph and kernel decoders cannot run edit hooks:
``Engine.explain()`` says so).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from .edit import _target

ABLATE_MODES = ("route", "zero")


class InterventionError(ValueError):
    """A bad ``intervene()`` argument; the message names the argument, layer, expert and value."""


def _int(value, what: str, bound: int, bound_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InterventionError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if not 0 <= value < bound:
        raise InterventionError(f"{what} {value} is out of range: the model has {bound} {bound_name}")
    return value


def _layers(arg, name: str, num_layers: int) -> dict[int, object]:
    if arg is None:
        return {}
    if not isinstance(arg, Mapping):
        raise InterventionError(f"{name} must be a dict {{layer: ...}}, got {type(arg).__name__}")
    out = {}
    for layer, v in arg.items():
        out[_int(layer, f"{name}: layer", num_layers, "layers")] = v
    return out


def _experts(values, what: str, num_experts: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InterventionError(f"{what} must be a list of experts, got {values!r}")
    experts = [_int(e, f"{what}: expert", num_experts, "experts per layer") for e in values]
    dup = sorted({e for e in experts if experts.count(e) > 1})
    if dup:
        raise InterventionError(f"{what}: expert(s) {dup} given more than once")
    return experts


class _Rule:
    """One edit hook of an intervention; ``speculative``: the engine's look-ahead applies it too."""

    def __init__(self, fn, speculative: bool) -> None:
        self.fn, self.speculative = fn, speculative

    def __call__(self, tensor: torch.Tensor, name: str):
        return self.fn(tensor)


class intervene:  # noqa: N801  (a function-like context manager, as record() and hooks())
    """Ablate, force or scale experts of ``target`` (a SmallThinkerForCausalLM or an Engine) inside a ``with``
    block; see the module docstring for the exact semantics. Arguments are checked when called, before anything is
    registered: an out-of-range layer or expert, a duplicate, a forced list whose length is not top_k, too many
    ablated experts, a non-finite factor, or one layer both ablated and forced raise :class:`InterventionError`."""

    def __init__(self, target, ablate: Mapping | None = None, force: Mapping | None = None,
                 scale: Mapping | None = None, ablate_mode: str = "route") -> None:
        from .edit import hooks

        self.target = _target(target)
        cfg = target.config
        L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.top_k
        if ablate_mode not in ABLATE_MODES:
            raise InterventionError(f"ablate_mode must be 'route' or 'zero', got {ablate_mode!r}")
        self.ablate_mode = ablate_mode
        self.ablate = {i: _experts(v, f"ablate[{i}]", E) for i, v in _layers(ablate, "ablate", L).items()}
        self.force = {i: _experts(v, f"force[{i}]", E) for i, v in _layers(force, "force", L).items()}
        self.scale: dict[int, dict[int, float]] = {}
        for i, v in _layers(scale, "scale", L).items():
            if not isinstance(v, Mapping):
                raise InterventionError(f"scale[{i}] must be a dict {{expert: factor}}, got {v!r}")
            self.scale[i] = {}
            for e, f in v.items():
                e = _int(e, f"scale[{i}]: expert", E, "experts per layer")
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
                    raise InterventionError(f"scale[{i}][{e}] must be a finite number, got {f!r}")
                self.scale[i][e] = float(f)
        for i, experts in self.ablate.items():
            if ablate_mode == "route" and E - len(experts) < K:
                raise InterventionError(f"ablate[{i}] removes {len(experts)} of {E} experts: at least top_k={K} "
                                        f"must remain to route to")
            if i in self.force:
                raise InterventionError(f"layer {i} is both ablated and forced: give one of ablate[{i}] and "
                                        f"force[{i}]")
            both = sorted(set(experts) & set(self.scale.get(i, {})))
            if both:
                raise InterventionError(f"layer {i}: expert(s) {both} are both ablated and scaled")
        for i, experts in self.force.items():
            if len(experts) != K:
                raise InterventionError(f"force[{i}] names {len(experts)} experts; the model routes each token to "
                                        f"top_k={K}")
        self._hooks = hooks(target, self._spec())

    def _spec(self) -> list[tuple[str, _Rule]]:
        spec: list[tuple[str, _Rule]] = []
        for i, experts in self.ablate.items():
            if self.ablate_mode == "route":
                spec.append((f"blocks.{i}.moe.hook_router_logits", _Rule(_mask_logits(experts), True)))
            else:
                spec += [(f"blocks.{i}.moe.experts.{e}.hook_act", _Rule(_times(0.0), False)) for e in experts]
        for i, experts in self.force.items():
            spec.append((f"blocks.{i}.moe.hook_topk_ids", _Rule(_forced(experts), True)))
        for i, factors in self.scale.items():
            spec += [(f"blocks.{i}.moe.experts.{e}.hook_act", _Rule(_times(f), False)) for e, f in factors.items()]
        return spec

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("ablate", self.ablate), ("force", self.force), ("scale", self.scale)) if v]
        mode = f", ablate_mode={self.ablate_mode!r}" if self.ablate else ""
        return f"intervene({', '.join(parts) or 'nothing'}{mode})"

    def __enter__(self) -> intervene:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self._hooks.__exit__(*exc)


def _mask_logits(experts: list[int]):
    cache: dict = {}

    def fn(logits: torch.Tensor) -> torch.Tensor:  # (N, E): the ablated columns -inf
        idx = cache.get(logits.device)
        if idx is None:
            idx = cache[logits.device] = torch.tensor(experts, dtype=torch.long, device=logits.device)
        return logits.index_fill(-1, idx, float("-inf"))

    return fn


def _forced(experts: list[int]):
    cache: dict = {}

    def fn(ids: torch.Tensor) -> torch.Tensor:  # (N, K): every row the forced experts
        row = cache.get(ids.device)
        if row is None:
            row = cache[ids.device] = torch.tensor(experts, dtype=ids.dtype, device=ids.device)
        return row.expand_as(ids).clone()

    return fn


def _times(factor: float):
    def fn(act: torch.Tensor) -> torch.Tensor:
        return act * factor

    return fn
