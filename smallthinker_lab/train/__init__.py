"""Training from scratch: load-balance losses, the token-window sampler and the trainer."""

from .data import WindowSampler, validation_sets, validation_windows
from .flops import flops_per_token
from .losses import (
    balance_loss,
    balance_statistic,
    global_balance_loss,
    load_entropy,
    microbatch_balance_loss,
    router_z_loss,
    routing_probs,
)
from .trainer import (
    TrainArgs,
    evaluate,
    export_model,
    lr_at,
    read_checkpoint,
    read_log,
    train,
    training_forwards,
)

__all__ = [
    "TrainArgs", "WindowSampler", "balance_loss", "balance_statistic", "evaluate", "export_model", "flops_per_token",
    "global_balance_loss", "load_entropy", "lr_at", "microbatch_balance_loss", "read_checkpoint", "read_log",
    "router_z_loss", "routing_probs", "train", "training_forwards", "validation_sets", "validation_windows",
]
