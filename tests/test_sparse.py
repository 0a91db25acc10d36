import pytest
import torch
import torch.nn.functional as F

from smallthinker_lab.engine.quant import FORMATS
from smallthinker_lab.engine.sparse import (
    MIN_SPARSITY,
    active_neurons,
    default_min_sparsity,
    reglu,
    reglu_dense,
    reglu_from_rows,
    reglu_sparse,
)
from smallthinker_lab.model.moe import Expert


def expert_weights(hidden=256, ffn=64, dtype=torch.float32, seed=0):
    """An nn.Module expert and its weights in the engine's layout (gate, up, down transposed)."""
    torch.manual_seed(seed)
    ex = Expert(hidden, ffn)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, hidden**-0.5)
    ex = ex.to(dtype)
    return ex, ex.gate.weight.detach(), ex.up.weight.detach(), ex.down.weight.detach().t().contiguous()


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("fn", [reglu_dense, reglu_sparse, reglu])
def test_fp32_equals_the_model_expert(fn, n):
    ex, wg, wu, wd_t = expert_weights()
    x = torch.randn(n, 256)
    y, n_active = fn(x, wg, wu, wd_t)
    torch.testing.assert_close(y, ex(x), atol=1e-5, rtol=1e-5)
    assert n_active == int((F.linear(x, wg) > 0).any(0).sum())
    assert 0 < n_active < 64 or n > 1  # a random expert: about half the neurons active per token


def test_bf16_sparse_matches_dense_to_bf16_tolerance():
    ex, wg, wu, wd_t = expert_weights(dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y_s, k_s = reglu_sparse(x, wg, wu, wd_t)
    y_d, k_d = reglu_dense(x, wg, wu, wd_t)
    assert y_s.dtype == torch.bfloat16 and k_s == k_d
    torch.testing.assert_close(y_s, y_d, atol=2e-2, rtol=2e-2)
    ref = ex.float()(x.float())
    torch.testing.assert_close(y_s.float(), ref, atol=3e-2, rtol=3e-2)


def test_single_token_vector_and_sparsity_count():
    _, wg, wu, wd_t = expert_weights()
    x = torch.randn(256)
    y, n_active = reglu_sparse(x, wg, wu, wd_t)
    assert y.shape == (256,)
    assert n_active == int((wg @ x > 0).sum())
    torch.testing.assert_close(y, reglu_dense(x[None], wg, wu, wd_t)[0][0], atol=1e-5, rtol=1e-5)


def test_union_masks_neurons_inactive_for_a_token():
    """A neuron active for token 0 only must contribute nothing to token 1 (relu applied per token)."""
    _, wg, wu, wd_t = expert_weights()
    x = torch.randn(2, 256)
    g = F.linear(x, wg)
    assert ((g[0] > 0) & (g[1] <= 0)).any()
    y, _ = reglu_sparse(x, wg, wu, wd_t)
    for t in range(2):
        torch.testing.assert_close(y[t], reglu_sparse(x[t], wg, wu, wd_t)[0], atol=1e-5, rtol=1e-5)


def test_all_inactive_gives_zero_and_all_active_equals_dense():
    _, wg, wu, wd_t = expert_weights()
    x = torch.randn(3, 256)
    wg_neg = -wg.abs()
    x_pos = x.abs()
    for dtype in (torch.float32, torch.bfloat16):
        y, k = reglu_sparse(x_pos.to(dtype), wg_neg.to(dtype), wu.to(dtype), wd_t.to(dtype))
        assert k == 0 and y.shape == (3, 256) and torch.all(y == 0)
    y_s, k = reglu_sparse(x_pos, wg.abs(), wu, wd_t)
    assert k == 64
    torch.testing.assert_close(y_s, reglu_dense(x_pos, wg.abs(), wu, wd_t)[0], atol=1e-5, rtol=1e-5)


def test_reglu_threshold_picks_the_path(monkeypatch):
    _, wg, wu, wd_t = expert_weights()
    x = torch.randn(1, 256)
    calls = []
    import smallthinker_lab.engine.sparse as sp
    real_sparse, real_dense = sp._sparse_from_gate, sp._dense_from_gate
    monkeypatch.setattr(sp, "_sparse_from_gate", lambda *a: calls.append("sparse") or real_sparse(*a))
    monkeypatch.setattr(sp, "_dense_from_gate", lambda *a: calls.append("dense") or real_dense(*a))
    _, k = reglu(x, wg, wu, wd_t, min_sparsity=1.0)
    _, _ = reglu(x, wg, wu, wd_t, min_sparsity=-1.0)
    sparsity = 1 - k / 64
    _, _ = reglu(x, wg, wu, wd_t, min_sparsity=sparsity - 1e-6)
    _, _ = reglu(x, wg, wu, wd_t, min_sparsity=sparsity)  # not strictly above: dense
    assert calls == ["dense", "sparse", "sparse", "dense"]


def test_default_thresholds_are_sparsities():
    assert all(0.0 <= v <= 1.0 for v in MIN_SPARSITY.values())
    assert default_min_sparsity(torch.float32, 1) == MIN_SPARSITY[(torch.float32, True)]
    assert default_min_sparsity(torch.bfloat16, 4) == MIN_SPARSITY[(torch.bfloat16, False)]
    assert default_min_sparsity(torch.float32, 1, 768 * 1536) == MIN_SPARSITY[(torch.float32, True)]
    assert default_min_sparsity(torch.float32, 1, 64 * 256) == 1.0  # tiny experts: sparse never paid off


def test_reglu_default_keeps_tiny_experts_dense(monkeypatch):
    _, wg, wu, wd_t = expert_weights()
    import smallthinker_lab.engine.sparse as sp
    monkeypatch.setattr(sp, "_sparse_from_gate", lambda *a: pytest.fail("sparse path taken"))
    x = torch.randn(1, 256).abs()
    y, k = reglu(x, -wg.abs(), wu, wd_t)  # every gate negative, sparsity 1.0: still dense for a 64 x 256 expert
    assert k == 0 and torch.all(y == 0)


def test_sparse_on_weights_decoded_from_q4_0():
    """The engine's path: decode the Q4_0 matrices, run sparse; equal to dense on the same decoded weights."""
    _, wg, wu, wd_t = expert_weights()
    fmt = FORMATS["q4_0"]
    wg, wu, wd_t = (fmt.decode(fmt.encode(w), w.shape) for w in (wg, wu, wd_t))
    x = torch.randn(1, 256)
    torch.testing.assert_close(reglu_sparse(x, wg, wu, wd_t)[0], reglu_dense(x, wg, wu, wd_t)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["q4_0", "int8", "bf16"])
def test_reglu_from_rows_decodes_only_active_rows(name):
    """Gate decoded in full, then only the active rows of up and down: equal to the dense expert on the decoded
    matrices."""
    _, wg, wu, wd_t = expert_weights()
    fmt = FORMATS[name]
    bufs = [fmt.encode(w) for w in (wg, wu, wd_t)]
    x = torch.randn(2, 256)
    g = F.linear(x, fmt.decode(bufs[0], wg.shape, torch.float32))
    idx = active_neurons(g)
    y = reglu_from_rows(x, g, idx, fmt.decode_rows(bufs[1], wu.shape, idx, torch.float32),
                        fmt.decode_rows(bufs[2], wd_t.shape, idx, torch.float32))
    full = [fmt.decode(b, w.shape, torch.float32) for b, w in zip(bufs, (wg, wu, wd_t))]
    torch.testing.assert_close(y, reglu_dense(x, *full)[0], atol=1e-5, rtol=1e-5)
