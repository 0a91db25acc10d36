"""Instruments: record what the model or the engine does, as named arrays and tidy DataFrames.

    with record(engine_or_model, kinds=("experts", "neurons", "kv", "cache", "timing"), layers=None) as rec:
        ...
    rec.to_dataframe("experts"); expert_frequency(...); hit_rate_curves(engine.trace, ...)
"""

from .curves import (
    hit_rate_curves,
    lru_hit_curve,
    policy_hit_curve,
    stack_distances,
    trace_from_recording,
    trace_items,
)
from .metrics import (
    cold_expert_share,
    expert_frequency,
    expert_usage_divergence,
    frequency_normalisations,
    frequency_shares,
    hit_rates,
    hot_expert_share,
    hot_share_cap,
    io_wait_share,
    js_divergence,
    kv_footprint,
    throughput,
    time_breakdown,
    top_tokens,
)
from .profile import profile
from .record import KINDS, record
from .recording import NAMES, Recording, names_table
from .sparsity import (
    dead_neurons,
    neuron_sparsity_by_expert,
    neuron_sparsity_by_layer,
    neuron_sparsity_by_neuron,
    neuron_sparsity_by_pair,
    neuron_sparsity_definitions,
)

__all__ = [
    "KINDS", "NAMES", "Recording", "cold_expert_share", "dead_neurons", "expert_frequency", "expert_usage_divergence",
    "frequency_normalisations", "frequency_shares", "hit_rate_curves", "hit_rates", "hot_expert_share",
    "hot_share_cap", "io_wait_share", "js_divergence", "kv_footprint", "lru_hit_curve", "names_table",
    "neuron_sparsity_by_expert", "neuron_sparsity_by_layer", "neuron_sparsity_by_neuron", "neuron_sparsity_by_pair",
    "neuron_sparsity_definitions", "policy_hit_curve",
    "profile", "record", "stack_distances", "throughput", "time_breakdown", "top_tokens",
    "trace_from_recording", "trace_items",
]
