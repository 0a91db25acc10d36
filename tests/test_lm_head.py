import math

import pytest
import torch
import torch.nn.functional as F

from smallthinker_lab.engine.lm_head import (
    PREDICTOR_TENSOR,
    LMHeadPredictor,
    fit_predictor,
    load_predictor,
    predictor_recall,
    save_predictor,
    sparse_lm_head,
)

V, H = 1000, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_problem(seed: int = 0, rank: int = 4):
    """An lm_head of low rank plus noise, and hidden states with a non-zero mean (as real final hidden states)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, rank, generator=g) @ torch.randn(rank, H, generator=g) / rank**0.5
    w += 0.05 * torch.randn(V, H, generator=g)
    mu = torch.randn(H, generator=g)
    return w, mu + torch.randn(2000, H, generator=g), mu + torch.randn(500, H, generator=g)


def random_predictor(rank: int = 6, seed: int = 0, **kw) -> LMHeadPredictor:
    torch.manual_seed(seed)
    return LMHeadPredictor(H, V, rank, **kw)


@pytest.mark.parametrize("mode", [{"mode": "threshold"}, {"mode": "top_m", "top_m": 50}])
def test_sparse_argmax_equals_dense_when_top1_selected(mode):
    """Property: with fill -inf, whenever the predictor selects the true top-1, the argmax is the dense argmax."""
    w, _, _ = low_rank_problem()
    pred = random_predictor(**mode)
    h = torch.randn(300, H)
    logits, k = sparse_lm_head(h, w, pred)
    dense = F.linear(h, w)
    top1 = dense.argmax(-1)
    selected = pred.select(h).gather(1, top1[:, None]).squeeze(1)
    assert 0 < selected.sum() < 300  # both cases occur with a random predictor
    assert torch.equal(logits.argmax(-1)[selected], top1[selected])
    mask = pred.select(h)
    assert torch.equal(logits[mask], dense[mask])  # computed rows carry the true logits
    assert torch.all(logits[~mask] == -math.inf)
    assert k == int(mask.any(0).sum())


def test_fill_value_and_batch_invariance():
    w, _, te = low_rank_problem()
    pred = random_predictor()
    one, k1 = sparse_lm_head(te[:1], w, pred, fill_value=0.0)  # the reference engine's fill
    batch, k = sparse_lm_head(te[:8], w, pred, fill_value=0.0)
    assert k >= k1
    assert torch.equal(batch[:1] == 0, one == 0)  # same rows computed for token 0 (up to BLAS rounding below)
    torch.testing.assert_close(batch[:1], one)
    assert (one == 0).sum() == V - k1
    vec, _ = sparse_lm_head(te[0], w, pred)
    assert vec.shape == (V,)


def test_min_rows_guarantees_a_finite_logit():
    w, _, te = low_rank_problem()
    pred = random_predictor(threshold=1e9)  # nothing passes the threshold
    logits, k = sparse_lm_head(te[:4], w, pred)
    assert torch.all(torch.isfinite(logits).sum(-1) == 1)
    logits, k = sparse_lm_head(te[:4], w, random_predictor(threshold=1e9, min_rows=0))
    assert k == 0 and torch.all(logits == -math.inf)


def test_top_m_mode_computes_m_rows_per_token():
    w, _, te = low_rank_problem()
    pred = random_predictor(mode="top_m", top_m=37)
    assert torch.all(pred.select(te).sum(-1) == 37)


def test_bf16_logits():
    w, _, te = low_rank_problem()
    pred = random_predictor()
    logits, _ = sparse_lm_head(te[:3].bfloat16(), w.bfloat16(), pred)
    assert logits.dtype == torch.bfloat16
    mask = pred.select(te[:3].bfloat16())
    torch.testing.assert_close(logits[mask], F.linear(te[:3].bfloat16(), w.bfloat16())[mask])


def test_fitted_predictor_recall_on_held_out_states():
    w, train, test = low_rank_problem()
    pred = fit_predictor(train, w, rank=8, steps=100, lr=1e-2, pos_weight=4.0, batch_size=128, seed=0)
    stats = predictor_recall(pred, test, w, k_values=(1, 5, 10))
    assert stats["recall@1"] > 0.95
    assert stats["rows_share"] < 0.1  # "well under half"; about 1.5% here
    assert stats["recall@5"] > 0.8 and stats["n_states"] == 500
    # an untrained predictor computes about half the rows and finds the top-1 about half the time
    base = predictor_recall(random_predictor(rank=8), test, w)
    assert base["recall@1"] < 0.8 and base["rows_share"] > 0.3
    # deterministic for a seed
    again = fit_predictor(train, w, rank=8, steps=100, lr=1e-2, pos_weight=4.0, batch_size=128, seed=0)
    assert torch.equal(again.to_flat(), pred.to_flat())


def test_flat_round_trip(tmp_path):
    pred = random_predictor(rank=5)
    flat = pred.to_flat()
    assert flat.shape == (5 * (H + V),)
    assert torch.equal(flat[: 5 * H].view(5, H), pred.w1.weight)  # W1 first, row-major
    path = tmp_path / "lm_head_profiler.safetensors"
    save_predictor(pred, path)
    back = load_predictor(path, H, V)
    assert back.rank == 5 and torch.equal(back.to_flat(), flat)
    x = torch.randn(7, H)
    assert torch.equal(back.select(x), pred.select(x))
    # the reference's own .pt, assumed to hold the tensor or a dict with it
    torch.save({PREDICTOR_TENSOR: flat.bfloat16()}, tmp_path / "model_lm_head.pt")
    back = load_predictor(tmp_path / "model_lm_head.pt", H, V, mode="top_m", top_m=10)
    assert back.w1.weight.dtype == torch.bfloat16 and back.mode == "top_m"
    with pytest.raises(ValueError, match="r \\* \\(H \\+ V\\)"):
        LMHeadPredictor.from_flat(flat[:-1], H, V)
