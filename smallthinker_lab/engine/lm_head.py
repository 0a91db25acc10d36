"""Sparse LM head: a low-rank predictor picks the vocabulary rows worth computing.

The reference engine (PowerInfer ``sparse_lmhead.cpp``) keeps an optional tensor ``lm_head_profiler.weight``: two
linear maps without a nonlinearity, z = W2 (W1 x), W1 (r, H), W2 (V, r); at decode only the vocabulary rows with
z > 0 are computed with the real lm_head and every other logit is set to **0**. Here the other logits get
``fill_value``, by default -inf, so that neither argmax nor sampling can pick a token whose logit was never
computed (with 0, an uncomputed token outranks every computed token with a negative logit).

Shape letters: N tokens, H hidden, V vocabulary, r predictor rank, K rows computed (union over the N tokens).

The predictor's rank and training are not published (PowerInfer issue #255). ``fit_predictor`` starts from the
best rank-r approximation of the logits on the given hidden states (z ~ logits) and then minimises a binary
cross-entropy on z with target "the token is in the true top-k of this state" (``pos_weight`` trades rows computed
for recall). In threshold mode the selection is homogeneous in x: the sets chosen for x and -x are complementary,
so computing well under half of the rows relies on hidden states having a non-zero mean, as real final hidden
states do; top-m mode has no such limit.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PREDICTOR_TENSOR = "model.lm_head_profiler.weight"  # HF name; GGUF drops the "model." prefix


class LMHeadPredictor(nn.Module):
    """z = W2 (W1 x); ``select`` marks the rows to compute.

    mode "threshold": rows with z > ``threshold`` (the reference: 0); mode "top_m": the ``top_m`` largest z.
    Either way the ``min_rows`` largest z are always included, so a token never has all logits at fill_value.
    """

    def __init__(self, hidden: int, vocab: int, rank: int, mode: str = "threshold", threshold: float = 0.0,
                 top_m: int | None = None, min_rows: int = 1) -> None:
        super().__init__()
        if mode not in ("threshold", "top_m"):
            raise ValueError(f"mode must be 'threshold' or 'top_m', got {mode!r}")
        if mode == "top_m" and not top_m:
            raise ValueError("mode 'top_m' needs top_m > 0")
        self.hidden, self.vocab, self.rank = hidden, vocab, rank
        self.mode, self.threshold, self.top_m, self.min_rows = mode, threshold, top_m, min_rows
        self.w1 = nn.Linear(hidden, rank, bias=False)  # (r, H)
        self.w2 = nn.Linear(rank, vocab, bias=False)  # (V, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) predictor scores z."""
        return self.w2(self.w1(x.to(self.w1.weight.dtype)))

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V) bool, the rows to compute for each token."""
        z = self(x)  # (N, V)
        keep = max(self.min_rows, self.top_m or 0) if self.mode == "top_m" else self.min_rows
        mask = torch.zeros_like(z, dtype=torch.bool)
        if keep > 0:
            mask.scatter_(-1, z.topk(min(keep, self.vocab), dim=-1).indices, True)
        if self.mode == "threshold":
            mask |= z > self.threshold
        return mask

    def extra_repr(self) -> str:
        sel = f"threshold={self.threshold}" if self.mode == "threshold" else f"top_m={self.top_m}"
        return f"hidden={self.hidden}, vocab={self.vocab}, rank={self.rank}, {sel}, min_rows={self.min_rows}"

    # ------------------------------------------------------------------ the reference's flat tensor
    def to_flat(self) -> torch.Tensor:
        """W1 (r, H) then W2 (V, r), row-major, one 1-D tensor of r (H + V) values."""
        return torch.cat([self.w1.weight.detach().reshape(-1), self.w2.weight.detach().reshape(-1)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, hidden: int, vocab: int, **kwargs) -> LMHeadPredictor:
        """Inverse of ``to_flat``; r = numel / (H + V)."""
        flat = flat.reshape(-1)
        rank, rest = divmod(flat.numel(), hidden + vocab)
        if rest or rank == 0:
            raise ValueError(f"a flat predictor of {flat.numel()} values is not r * (H + V) = r * {hidden + vocab}")
        pred = cls(hidden, vocab, rank, **kwargs).to(flat.dtype)
        with torch.no_grad():
            pred.w1.weight.copy_(flat[: rank * hidden].view(rank, hidden))
            pred.w2.weight.copy_(flat[rank * hidden:].view(vocab, rank))
        return pred


def save_predictor(predictor: LMHeadPredictor, path: str | Path, name: str = PREDICTOR_TENSOR) -> None:
    """Write the flat tensor to a safetensors file under ``name``."""
    from safetensors.torch import save_file

    save_file({name: predictor.to_flat().contiguous()}, str(path),
              metadata={"hidden": str(predictor.hidden), "vocab": str(predictor.vocab), "rank": str(predictor.rank)})


def load_predictor(path: str | Path, hidden: int, vocab: int, **kwargs) -> LMHeadPredictor:
    """Read a flat predictor from a safetensors file (any tensor named ``*lm_head_profiler.weight``, or the only
    tensor in the file) or from a ``.pt`` file holding a tensor or a dict of them. kwargs go to LMHeadPredictor.

    (The reference's ``model_lm_head.pt`` was not available to check against; the safetensors form is tested.)
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = {PREDICTOR_TENSOR: obj} if isinstance(obj, torch.Tensor) else dict(obj)
    names = [k for k in tensors if k.endswith("lm_head_profiler.weight")] or list(tensors)
    if len(names) != 1:
        raise ValueError(f"{path}: expected one lm_head_profiler tensor, found {sorted(tensors)}")
    return LMHeadPredictor.from_flat(tensors[names[0]], hidden, vocab, **kwargs)


# ------------------------------------------------------------------ the sparse head
@torch.no_grad()
def sparse_lm_head(hidden: torch.Tensor, lm_weight: torch.Tensor, predictor: LMHeadPredictor,
                   fill_value: float = -math.inf) -> tuple[torch.Tensor, int]:
    """Logits (N, V) in hidden's dtype with only the selected rows computed; returns (logits, K).

    Rows are read once for the union of the N tokens' selections (K rows of ``lm_weight``); each token keeps only
    its own selection and gets ``fill_value`` elsewhere, so a token's logits do not depend on the batch.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    mask = predictor.select(h)  # (N, V)
    rows = torch.nonzero(mask.any(dim=0)).flatten()  # (K,)
    part = F.linear(h.to(lm_weight.dtype), lm_weight.index_select(0, rows)).to(hidden.dtype)  # (N, K)
    logits = torch.full((h.shape[0], lm_weight.shape[0]), fill_value, dtype=hidden.dtype, device=hidden.device)
    logits[:, rows] = torch.where(mask[:, rows], part, torch.full_like(part, fill_value))
    return logits.reshape(*hidden.shape[:-1], -1), int(rows.numel())


# ------------------------------------------------------------------ fitting and scoring
@torch.no_grad()
def _true_topk(hidden: torch.Tensor, lm_weight: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Ids of the k largest true logits: (N, H) -> (N, k), computed in fp32 in chunks."""
    w = lm_weight.float()
    return torch.cat([F.linear(h.float(), w).topk(k, dim=-1).indices for h in hidden.split(chunk)])


@torch.no_grad()
def _low_rank_init(pred: LMHeadPredictor, hidden: torch.Tensor, lm_weight: torch.Tensor, chunk: int = 8192) -> None:
    """W2 W1 = the best rank-r approximation of lm_weight in the norm of the hidden states' second moment, i.e.
    z ~ logits on average over the data: with C = E[h h^T], the top-r right singular vectors v of W C^1/2 (from
    the H x H Gram, W read in chunks of rows), W1 = v^T C^-1/2, W2 = W C^1/2 v."""
    h = hidden.double()
    c = h.T @ h / h.shape[0]  # (H, H)
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(evals.max() * 1e-10)
    c_half = (evecs * evals.sqrt()) @ evecs.T
    c_ihalf = (evecs * evals.rsqrt()) @ evecs.T
    wtw = sum(w.double().T @ w.double() for w in lm_weight.split(chunk))  # (H, H)
    _, v = torch.linalg.eigh(c_half @ wtw @ c_half)  # ascending eigenvalues
    v = v[:, -pred.rank:]  # (H, r)
    pred.w1.weight.copy_(v.T @ c_ihalf)  # (r, H)
    proj = (c_half @ v).to(torch.float32)  # (H, r)
    pred.w2.weight.copy_(torch.cat([w.float() @ proj for w in lm_weight.split(chunk)]))  # (V, r)


def fit_predictor(hidden_states: torch.Tensor, lm_weight: torch.Tensor, rank: int, steps: int = 300,
                  lr: float = 1e-2, top_k: int = 10, pos_weight: float = 4.0, batch_size: int = 256,
                  seed: int = 0, **predictor_kwargs) -> LMHeadPredictor:
    """Fit a predictor on recorded final hidden states (N, H) (after the final norm, as fed to lm_head).

    Start: z ~ the logits (``_low_rank_init``). Then ``steps`` Adam steps on minibatches of ``batch_size`` states
    minimising BCE-with-logits(z, target) where target[v] = 1 iff v is among the ``top_k`` largest true logits,
    positives weighted ``pos_weight`` (higher: more recall, more rows). z is scaled by 1/std(z) at init so that the
    loss starts in a sensible range; the scale is folded into W2. Deterministic for a given seed. Returns an fp32
    predictor on CPU (threshold mode unless predictor_kwargs say otherwise).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden_states = hidden_states.detach().float().cpu()
    n, h = hidden_states.shape
    vocab = lm_weight.shape[0]
    pred = LMHeadPredictor(h, vocab, rank, **predictor_kwargs)
    _low_rank_init(pred, hidden_states, lm_weight.detach().cpu())
    with torch.no_grad():
        pred.w2.weight /= pred(hidden_states[: min(n, 1024)]).std().clamp_min(1e-12)
    targets = _true_topk(hidden_states, lm_weight.detach().cpu(), top_k)  # (N, k)
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    pw = torch.tensor(pos_weight)
    for _ in range(steps):
        ids = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        z = pred(hidden_states[ids])  # (b, V)
        y = torch.zeros_like(z).scatter_(1, targets[ids], 1.0)
        loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return pred.eval()


@torch.no_grad()
def predictor_recall(predictor: LMHeadPredictor, hidden: torch.Tensor, lm_weight: torch.Tensor,
                     k_values: tuple[int, ...] = (1, 5, 10), chunk: int = 256) -> dict[str, float]:
    """How well the selection covers the true top tokens on hidden states (N, H).

    ``recall@k``: share of the true top-k tokens (over all states) that the predictor selects; ``rows_share``: mean
    share of vocabulary rows selected per state; ``rows_mean``: the same as a count.
    """
    kmax = max(k_values)
    hits = {k: 0.0 for k in k_values}
    rows = 0.0
    n = 0
    for h in hidden.split(chunk):
        top = _true_topk(h, lm_weight, kmax)  # (b, kmax)
        mask = predictor.select(h)  # (b, V)
        sel = mask.gather(1, top).float()  # (b, kmax)
        for k in k_values:
            hits[k] += sel[:, :k].sum().item()
        rows += mask.sum().item()
        n += h.shape[0]
    out = {f"recall@{k}": hits[k] / (n * k) for k in k_values}
    out |= {"rows_mean": rows / n, "rows_share": rows / (n * predictor.vocab), "n_states": n}
    return out
