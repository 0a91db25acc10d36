"""Model FLOPs per trained token and model FLOPs utilisation (MFU).

Model FLOPs count the work the model's definition needs, not what the training kernels happen to do (the dense
MoE forward multiplies every expert, and that extra work is not counted):

    flops per token = 6 * active matmul parameters + attention term

- active matmul parameters per layer: the q/k/v/o projections, the router, and top_k experts (gate, up, down);
  plus the LM head (vocab x hidden, also when tied to the embedding: the head's matmul runs). The embedding lookup
  and the norms are not matmuls and are not counted. 6 = 2 (multiply-add) x 3 (forward, and backward's two
  products per weight).
- attention term per layer: 12 * heads * head_dim * c, where c is the mean number of keys a query attends under
  the layer's mask (causal: (T + 1) / 2; sliding window w: mean of min(t + 1, w)): QK^T and AV are 2 * heads *
  head_dim * c multiply-adds each forward, x3 with the backward. Kernels that skip masked blocks do about this.

MFU = tokens/s * flops per token / peak. The peak is stated wherever MFU is written: by default the dense bf16
spec of the GPU where it is known (H100 / H200 SXM: 989.4 TFLOP/s); the H200 of the device machine measured
about 790 TFLOP/s on an 8192^3 bf16 matmul, so MFU against the measured peak is spec/790 = 1.25x the spec MFU.
On a CPU no peak is known: MFU is left empty unless a peak is given.
"""

from __future__ import annotations

from ..model.config import SmallThinkerConfig

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
SPEC_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
MEASURED_H200_TFLOPS = 790.0


def mean_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends over positions 0..T-1: causal, and at most ``window`` if given."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    w = seq_len if window is None else min(int(window), seq_len)
    # positions t < w attend t + 1 keys, the others w
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(cfg: SmallThinkerConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one trained token (forward + backward) at ``seq_len``: the parts and the total."""
    H, hq, hkv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn_params = H * hq + 2 * H * hkv + hq * H
    router_params = H * cfg.num_experts
    expert_params = cfg.top_k * 3 * H * cfg.moe_ffn_hidden_size
    L = cfg.num_hidden_layers
    active = L * (attn_params + router_params + expert_params) + cfg.vocab_size * H
    attention = sum(12 * hq * mean_context(seq_len, cfg.sliding_window_size if cfg.is_sliding(i) else None)
                    for i in range(L))
    return {"active_matmul_params": float(active), "dense": 6.0 * active, "attention": attention,
            "total": 6.0 * active + attention}


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU: ``override`` if given, else the spec of a known GPU."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override}")
        return float(override), "given"
    for key, tf in SPEC_PEAK_TFLOPS.items():
        if key in device_name:
            return tf, f"{key} dense bf16 spec"
    return None, "unknown (no MFU)"
