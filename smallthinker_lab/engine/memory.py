"""How the engine splits one memory limit: non-expert weights, KV cache, workspace, staging, expert cache.

Everything the engine keeps resident is counted against ``memory_limit``; the expert cache gets what is left,
in whole expert slots. The minimum working set is the fixed parts plus ``top_k`` slots (one layer's experts at
a time; prefill streams its experts through the cache in chunks). Not counted: the Python interpreter and the
torch runtime themselves (a process baseline measured before the engine opens), and on CUDA host memory
(the limit is the device's: weights, KV cache, workspace and cache slots on the GPU; pinned staging buffers or the
host copy of the bundle are host memory, reported as ``host_bytes``). The engine does not let libraries grow
outside the plan: oneDNN keeps a compiled kernel per product shape (about 0.7 MB each at the 4B shape), so the
engine's data-dependent CPU products come from a bounded set of shapes and one-token steps use none
(engine/shapes.py). Left: each new prefill chunk length adds the kernels of the non-expert projections at that
length (a few per length, the same as the in-memory model).

Shape letters: T tokens per forward chunk, S max context, H hidden, h query heads, k kv heads, D head_dim,
F expert ffn size, K active experts, E experts, V vocabulary.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass

import torch

from ..model.config import SmallThinkerConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20,
          "gi": 2**30, "ti": 2**40}


class MemoryLimitError(ValueError):
    """A memory limit below the engine's minimum working set; the message names the minimum."""

    def __init__(self, message: str, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


def parse_memory_limit(limit: int | float | str | None, total: int | None = None) -> int | None:
    """Bytes from 536870912, "512MiB", "1.5GiB", "800MB" (10^6); None, "unlimited" or "none" means no limit.

    "N%" is N percent of ``total`` bytes, accepted only when the caller passes ``total``. Anything else (NaN,
    infinity, "", "inf", a negative, zero or unparseable size, a bool) raises ValueError naming the value.
    """
    if limit is None:
        return None
    forms = "a size like 536870912, '512MiB', '1.5GiB' or 'unlimited'" + (", or 'N%'" if total is not None else "")
    if isinstance(limit, bool) or not isinstance(limit, (numbers.Real, str)):
        raise ValueError(f"memory_limit must be {forms}, got {limit!r}")
    if isinstance(limit, numbers.Real) and not math.isfinite(limit):
        raise ValueError(f"memory_limit must be a finite number of bytes, got {limit!r} (for no limit pass None "
                         f"or 'unlimited')")
    if isinstance(limit, numbers.Real):
        if limit <= 0:
            raise ValueError(f"memory_limit must be positive, got {limit!r}")
        value = int(limit)
    else:
        text = limit.strip().lower()
        if text in ("unlimited", "none"):
            return None
        if not text:
            raise ValueError(f"memory_limit is empty: give {forms}")
        if text.startswith("-"):
            raise ValueError(f"memory_limit must be positive, got {limit!r}")
        if text.endswith("%"):
            if total is None:
                raise ValueError(f"memory_limit {limit!r}: a percentage needs the total it is a share of; "
                                 f"give a size like '512MiB' here")
            m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", text)
            if not m or not 0 < float(m.group(1)) <= 100:
                raise ValueError(f"memory_limit {limit!r} is not a percentage in (0%, 100%]")
            value = int(float(m.group(1)) / 100 * total)
        else:
            m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", text)
            if not m or m.group(2) not in _UNITS:
                raise ValueError(f"memory_limit {limit!r} is not {forms}")
            value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"memory_limit must be at least one byte, got {limit!r}")
    return value


def share_of(limit) -> float | None:
    """The share (0..1) of a memory limit given as "NN%", None for any other form; ValueError naming a percentage
    that is not one. "NN%" means: the expert cache holds NN% of the model's expert bytes (:func:`limit_for_share`)."""
    if not (isinstance(limit, str) and limit.strip().endswith("%")):
        return None
    try:
        share = float(limit.strip()[:-1]) / 100.0
    except ValueError:
        raise ValueError(f"memory limit {limit!r} is not a percentage like '50%' or a size like '24MiB'") from None
    if not 0.0 <= share <= 1.0:  # NaN too
        raise ValueError(f"a memory limit given in percent must be 0%..100% of the expert bytes, got {limit}")
    return share


def limit_for_share(plan, share: float) -> int:
    """The limit whose expert cache holds ``share`` of all experts, on top of the fixed working set (at least the
    minimum working set). ``plan``: a MemoryPlan or its ``as_dict()``."""
    plan = plan.as_dict() if isinstance(plan, MemoryPlan) else plan
    slot, total = int(plan["expert_slot_bytes"]), int(plan["total_expert_bytes"])
    n = int(math.floor(share * (total // slot) + 1e-9))
    return max(int(plan["fixed_bytes"]) + n * slot, int(plan["minimum_bytes"]))


def resolve_memory_limit(limit, plan=None) -> int | None:
    """Bytes of a memory limit in any form the project accepts (Engine, CLI, report, widgets): bytes, "512MiB",
    "1.5GiB", "unlimited"/None, or "NN%" (the expert cache holds NN% of the expert bytes: needs the engine's
    ``plan``). Anything else (NaN, inf, "", negative, unparseable) raises ValueError naming the value."""
    share = share_of(limit)
    if share is None:
        return parse_memory_limit(limit)
    if plan is None:
        raise ValueError(f"memory limit {limit!r}: a percentage of the expert bytes needs the engine's memory plan")
    return limit_for_share(plan, share)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def workspace_bytes(config: SmallThinkerConfig, dtype: torch.dtype, tokens: int, max_context: int,
                    expert_bytes: int = 0) -> int:
    """Peak temporaries of one forward chunk of ``tokens`` tokens (an upper estimate).

    Activations (residual, norms, attention in/out, q/k/v, router logits, expert gate/up/product, per-expert
    outputs kept for the ordered combine), attention scores and mask over the whole context in fp32, the
    sliding-window concat, one token's logits in fp32, plus ``expert_bytes`` (the engine's estimate for computing
    one expert: gathered rows, decoded matrices).
    """
    a = max(itemsize(dtype), 4)  # some temporaries are fp32 whatever the dtype (norms, softmax)
    T, S, H, D = tokens, max_context, config.hidden_size, config.head_dim
    h, k, F, K, E = (config.num_attention_heads, config.num_key_value_heads, config.moe_ffn_hidden_size,
                     config.top_k, config.num_experts)
    act = a * T * (10 * H + (h + 2 * k) * D * 2 + 2 * E + 4 * F + 2 * K * H)
    attn = 4 * h * T * S * 2 + T * S  # scores + softmax in fp32, bool mask
    swa = 2 * a * k * D * (min(S, config.sliding_window_size) + T) if any(config.sliding_window_layout) else 0
    logits = 4 * config.vocab_size * 3
    return int(act + attn + swa + logits + expert_bytes)


@dataclass
class MemoryPlan:
    """The split of ``limit`` (bytes). ``capacity_experts`` slots of ``expert_slot_bytes`` make the cache."""

    limit: int | None
    device: str
    non_expert_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    staging_bytes: int
    expert_slot_bytes: int
    capacity_experts: int
    expert_cache_bytes: int
    total_expert_bytes: int
    minimum_bytes: int
    top_k: int
    max_context: int
    host_bytes: int = 0

    @property
    def fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.workspace_bytes + self.staging_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.expert_cache_bytes

    @property
    def cached_fraction(self) -> float:
        return self.expert_cache_bytes / self.total_expert_bytes if self.total_expert_bytes else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(fixed_bytes=self.fixed_bytes, planned_bytes=self.planned_bytes, cached_fraction=self.cached_fraction)
        return d

    def to_frame(self):
        """One row per component: bytes, MiB and share of the limit (a pandas DataFrame)."""
        import pandas as pd

        parts = [("non-expert weights", self.non_expert_bytes), ("KV cache", self.kv_cache_bytes),
                 ("workspace", self.workspace_bytes), ("staging", self.staging_bytes),
                 (f"expert cache ({self.capacity_experts} experts)", self.expert_cache_bytes)]
        rows = [{"component": n, "bytes": b, "MiB": b / 2**20,
                 "share": (b / self.limit) if self.limit else float("nan")} for n, b in parts]
        rows.append({"component": "total", "bytes": self.planned_bytes, "MiB": self.planned_bytes / 2**20,
                     "share": self.planned_bytes / self.limit if self.limit else float("nan")})
        return pd.DataFrame(rows).set_index("component")


def plan_memory(limit: int | None, *, device: str, non_expert: int, kv_cache: int, workspace: int, staging: int,
                slot_bytes: int, num_experts_total: int, top_k: int, max_context: int, host_bytes: int = 0
                ) -> MemoryPlan:
    """Split ``limit``; raise :class:`MemoryLimitError` naming the minimum when it cannot hold top_k experts."""
    fixed = non_expert + kv_cache + workspace + staging
    minimum = fixed + top_k * slot_bytes
    if limit is None:
        capacity = num_experts_total
    else:
        if limit < minimum:
            raise MemoryLimitError(
                f"memory_limit {limit} bytes ({limit / 2**20:.1f} MiB) is below the minimum working set of "
                f"{minimum} bytes ({minimum / 2**20:.1f} MiB): non-expert weights {non_expert / 2**20:.1f} MiB + "
                f"KV cache for {max_context} tokens {kv_cache / 2**20:.1f} MiB + workspace "
                f"{workspace / 2**20:.1f} MiB + staging {staging / 2**20:.1f} MiB + {top_k} experts of "
                f"{slot_bytes / 2**20:.2f} MiB", minimum)
        capacity = min(num_experts_total, (limit - fixed) // slot_bytes)
    return MemoryPlan(limit, device, non_expert, kv_cache, workspace, staging, slot_bytes, capacity,
                      capacity * slot_bytes, num_experts_total * slot_bytes, minimum, top_k, max_context, host_bytes)
