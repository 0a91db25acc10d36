"""Load-balance losses for the MoE router: the conventional micro-batch loss and the paper's DP-group global loss.

Per layer, over a set S of sequences, the balance statistic is

    bal(S) = E * sum_e f_e(S) * P_e(S)

- f_e(S): the fraction of routed (token, slot) assignments in S that went to expert e. The assignments are the
  top-k of the raw router logits, exactly what the model routes; f sums to 1 over experts and carries no gradient.
- P_e(S): the mean over the tokens of S of the router probability of expert e. The probabilities are the sigmoid
  scores normalised over all E experts, p_e = sigmoid(l_e) / sum_j sigmoid(l_j): SmallThinker routes with
  sigmoid scores (config default), so this normalisation keeps the loss's gradient on the same scores the router
  uses (as DeepSeek-V3's sequence-wise auxiliary loss does). P sums to 1 over experts and carries the gradient.

With this normalisation perfectly uniform routing gives bal = 1 for any k, fully collapsed routing (every token
to the same k experts, all probability on them) gives E / k, and bal >= 1 whenever f and P coincide.

The two losses differ only in the set S the statistics are pooled over:

- ``microbatch_balance_loss(..., microbatch_size=m)``: the conventional loss. The batch is cut into
  micro-batches of m sequences (what one data-parallel rank computes a step on), bal is computed on each and
  averaged over micro-batches and layers. Every micro-batch must be balanced on its own, so with m = 1 each
  sequence must spread its tokens over all experts.
- ``global_balance_loss(..., group_size=g)``: SmallThinker's DP-groups global load balance (technical report
  section 2.1, described there in prose only). f is computed from the expert counts summed over the g sequences
  of a group (in a data-parallel run: an all-reduce of the counts over the group's ranks) and P is the group mean,
  so only the group as a whole must be balanced and single sequences (one domain each) may specialise. In this
  single-process trainer a group is g consecutive sequences of the batch; g = None means the whole batch.

A group of g sequences pools exactly the same statistics as a micro-batch of g sequences, so
``global_balance_loss(x, k, g) == microbatch_balance_loss(x, k, g)``: the comparison the issue asks for is a
small micro-batch (1 sequence by default) against a large group (the whole batch by default).

``balance_loss(..., group)``: what the trainer optimises, by its ``balance_group`` argument: an int g (groups of g
sequences, the DP-group loss), "batch" (one group: the whole batch) or "micro-batch" (the conventional loss per
micro-batch of ``microbatch_size`` sequences). All are computed exactly from the one forward of the whole batch,
so arms of a sweep that differ in g differ in nothing else.

``router_z_loss``: the optional z-loss of ST-MoE, mean over tokens of logsumexp(logits)^2.

Shape letters: B sequences, T tokens, E experts, K active experts, G groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def routing_probs(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores normalised over experts, in fp32: (..., E) -> (..., E), summing to 1 over E."""
    s = torch.sigmoid(logits.float())
    return s / s.sum(dim=-1, keepdim=True)


def expert_counts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Routed (token, slot) assignments per sequence and expert: (B, T, E) -> (B, E) float, sum T*k per row."""
    B, T, E = logits.shape
    ids = torch.topk(logits.detach(), k, dim=-1).indices.reshape(B, T * k)  # (B, T*K)
    counts = torch.zeros(B, E, dtype=torch.float32, device=logits.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))


def balance_statistic(logits: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e per chunk of ``chunk`` consecutive sequences: (B, T, E) -> (B // chunk,).

    ``chunk=None`` pools the whole batch (one value). B must be a multiple of ``chunk``.
    """
    B, T, E = logits.shape
    chunk = B if chunk is None else int(chunk)
    if chunk < 1 or B % chunk:
        raise ValueError(f"batch of {B} sequences cannot be cut into chunks of {chunk} sequences")
    G = B // chunk
    counts = expert_counts(logits, k).view(G, chunk, E).sum(dim=1)  # (G, E)
    f = counts / counts.sum(dim=-1, keepdim=True)  # (G, E)
    P = routing_probs(logits).view(G, chunk * T, E).mean(dim=1)  # (G, E)
    return E * (f * P).sum(dim=-1)  # (G,)


def _mean_over_layers(router_logits: list[torch.Tensor], k: int, chunk: int | None) -> torch.Tensor:
    if not router_logits:
        raise ValueError("no router logits: call the model with output_router_logits=True")
    return torch.stack([balance_statistic(lg, k, chunk).mean() for lg in router_logits]).mean()


def microbatch_balance_loss(router_logits: list[torch.Tensor], k: int, microbatch_size: int | None = 1
                            ) -> torch.Tensor:
    """Conventional balance loss: bal per micro-batch of ``microbatch_size`` sequences, mean over micro-batches
    and layers. ``router_logits``: one (B, T, E) tensor per layer. Scalar, 1.0 for uniform routing."""
    return _mean_over_layers(router_logits, k, microbatch_size)


def global_balance_loss(router_logits: list[torch.Tensor], k: int, group_size: int | None = None) -> torch.Tensor:
    """DP-groups global balance loss: bal with f from the counts summed over each group of ``group_size``
    sequences and P the group mean; mean over groups and layers. ``None``: one group, the whole batch."""
    return _mean_over_layers(router_logits, k, group_size)


BATCH, MICRO_BATCH = "batch", "micro-batch"


def group_sequences(group: int | str, batch_size: int, microbatch_size: int = 1) -> int:
    """Sequences per balance group for a ``balance_group`` value (int g, "batch" or "micro-batch"); raises
    ValueError naming the value unless it is one of those and divides ``batch_size``."""
    if group == BATCH:
        g = batch_size
    elif group == MICRO_BATCH:
        g = microbatch_size
    elif isinstance(group, int) and not isinstance(group, bool):
        g = group
    else:
        raise ValueError(f"balance_group must be a number of sequences, {BATCH!r} or {MICRO_BATCH!r}, got {group!r}")
    if not isinstance(g, int) or g < 1 or batch_size % g:
        what = f"microbatch_size={g}" if group == MICRO_BATCH else f"balance_group={g}"
        raise ValueError(f"{what} must be a positive number of sequences dividing batch_size={batch_size}")
    return g


def balance_loss(router_logits: list[torch.Tensor], k: int, group: int | str, microbatch_size: int = 1
                 ) -> torch.Tensor:
    """The balance loss over groups of sequences (:func:`group_sequences`): mean over groups and layers."""
    if not router_logits:
        raise ValueError("no router logits: call the model with output_router_logits=True")
    B = router_logits[0].shape[0]
    return _mean_over_layers(router_logits, k, group_sequences(group, B, microbatch_size))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(logits)^2 (ST-MoE), in fp32."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in router_logits]).mean()


@torch.no_grad()
def load_entropy(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Per layer, the entropy of the batch's expert-load fractions f divided by log E: (L,), 1 = perfectly even."""
    out = []
    for lg in router_logits:
        E = lg.shape[-1]
        counts = expert_counts(lg, k).sum(dim=0)  # (E,)
        f = counts / counts.sum()
        out.append(-(f * torch.log(f.clamp_min(1e-30))).sum() / math.log(E))
    return torch.stack(out)


def cross_entropy_per_sequence(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy in fp32, averaged per sequence: logits (B, T, V), targets (B, T) -> (B,)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), reduction="none")
    return ce.view(B, T).mean(dim=1)
