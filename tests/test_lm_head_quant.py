"""The LM head in a CPU kernel format (engine/lm_head_quant.py): the kernel's logits against dequantise-then-multiply,
the cache beside the bundle, and the engine with ``lm_head_format`` (greedy tokens against the model on the same
dequantised experts and head, the memory plan, stats, hooks, the sparse LM head, errors)."""

import pytest
import torch
from conftest import dequantise_experts, greedy_gaps, random_model

from smallthinker_lab.engine import Engine
from smallthinker_lab.engine import lm_head_quant as lq
from smallthinker_lab.engine.lm_head import LMHeadPredictor
from smallthinker_lab.engine.quant import KERNEL_FORMATS, get_format
from smallthinker_lab.model.checkpoint import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")
BF = torch.bfloat16


def _kernel_tolerance(h: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """What the kernel may differ from fp32 dequantise-then-multiply by: its bf16 output rounding (half a bf16 ulp,
    2^-9 relative) plus fp32 accumulation in another order (2^-20 of sum |h||w| is far above fp32's K * 2^-24)."""
    return ref.abs() * 2.0 ** -8 + (h.abs().float() @ w.abs().float().T) * 2.0 ** -20 + 1e-30


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_quantized_head_equals_dequantise_then_multiply(fmt, monkeypatch):
    """Random (1024, 128) bf16 head, chunked quantization (4 chunks) = the codec's whole-matrix bytes; logits
    through the kernel within the stated tolerance of fp32 products on the dequantised weights, for 1 and 7 rows."""
    monkeypatch.setattr(lq, "_CHUNK_ROWS", 256)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(1024, 128, generator=gen) * 0.05).to(BF)
    buf = lq.quantize(w, fmt)
    assert torch.equal(buf, get_format(fmt).encode(w))
    head = lq.QuantizedHead(buf, fmt, tuple(w.shape))
    deq = head.dequantize()
    assert torch.equal(deq, get_format(fmt).decode(buf, w.shape))
    assert head.nbytes == get_format(fmt).nbytes(w.shape)
    for n in (1, 7):
        h = torch.randn(n, 128, generator=gen).to(BF)
        out = head(h)
        assert out.dtype == BF and out.shape == (n, 1024)
        ref = h.float() @ deq.T
        assert ((out.float() - ref).abs() <= _kernel_tolerance(h, deq, ref)).all()
        assert torch.equal(head(h.float()), out.float())  # any dtype in, computed in bf16, back in its dtype


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_rows_of_the_quantized_head(fmt):
    """The sparse path's rows (int8: those rows; q4_0: the packing's blocks holding them) equal the full head's."""
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(512, 64, generator=gen) * 0.05).to(BF)
    head = lq.QuantizedHead(lq.quantize(w, fmt), fmt, tuple(w.shape))
    h = torch.randn(2, 64, generator=gen).to(BF)
    rows = torch.tensor([0, 3, 31, 32, 200, 511])
    part, computed = head.rows(h, rows)
    assert torch.equal(part, head(h)[:, rows])
    assert computed == (6 if fmt == "int8_cpu" else 4 * lq.int4_row_block())


def test_cache_beside_the_bundle(tmp_path):
    """Written once, read back (the same bytes); rebuilt when damaged, when the weight changes, per format."""
    w = (torch.randn(256, 64) * 0.05).to(BF)
    first = lq.load_or_quantize(w, "q4_0_cpu", tmp_path)
    assert first.source == "quantized, cached" and lq.cache_path(tmp_path, "q4_0_cpu").is_file()
    again = lq.load_or_quantize(w, "q4_0_cpu", tmp_path)
    assert again.source == "cache" and torch.equal(again.buf, first.buf)
    path = lq.cache_path(tmp_path, "q4_0_cpu")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a damaged payload: its checksum fails
    path.write_bytes(bytes(raw))
    assert lq.load_or_quantize(w, "q4_0_cpu", tmp_path).source == "quantized, cached"
    w2 = w.clone()
    w2[0, 0] += 1
    other = lq.load_or_quantize(w2, "q4_0_cpu", tmp_path)  # another weight: not the cached bytes
    assert other.source == "quantized, cached" and not torch.equal(other.buf, first.buf)
    assert lq.load_or_quantize(w, "int8_cpu", tmp_path).source == "quantized, cached"
    assert lq.load_or_quantize(w, "int8_cpu", None).source == "quantized"  # no folder: not cached
    stale = tmp_path / ".lm_head-int8_cpu.bin.tmp-999999999-1"  # a dead process's temporary
    stale.write_bytes(b"x")
    path.unlink()
    assert lq.load_or_quantize(w, "q4_0_cpu", tmp_path).source == "quantized, cached"
    assert stale.exists()  # another file's temporaries are its own to clean
    lq.cache_path(tmp_path, "int8_cpu").unlink()
    lq.load_or_quantize(w, "int8_cpu", tmp_path)
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_format_names_are_checked():
    with pytest.raises(ValueError, match="lm_head_format must be one of"):
        lq.check_format_name("q4_1")
    with pytest.raises(ValueError, match="lm_head_format must be one of"):
        Engine.from_pretrained("default", lm_head_format="int4", progress=False)
    cpu = torch.device("cpu")
    assert lq.resolve_format("auto", "q4_0_cpu", cpu, False) == "q4_0_cpu"
    assert lq.resolve_format("auto", "bf16", cpu, False) is None
    # ggml Q4_0 experts: the native kernel's head where it is built (engine/native.py), else the model's
    from smallthinker_lab.engine import native

    assert lq.resolve_format("auto", "q4_0", cpu, False) == ("q4_0" if native.available() else None)
    assert lq.resolve_format("auto", "q4_0", cpu, True) is None  # exact: the model's kernels
    assert lq.resolve_format("auto", "q4_0_cpu", torch.device("cuda"), False) is None
    assert lq.resolve_format("auto", "q4_0_cpu", cpu, False, (1000, 64)) is None  # 1000 rows: no int4 packing
    assert lq.resolve_format("auto", "q4_0_cpu", cpu, False, (1024, 64)) == "q4_0_cpu"
    assert lq.resolve_format("int8_cpu", "bf16", cpu, False) == "int8_cpu"
    with pytest.raises(ValueError, match="needs device='cpu'"):
        lq.resolve_format("q4_0_cpu", "bf16", torch.device("cuda"), False)
    with pytest.raises(ValueError, match="exact=True"):
        lq.resolve_format("q4_0_cpu", "bf16", cpu, True)


# ------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qhead") / "model"
    m = random_model("smallthinker-test-tied").to(BF)
    m.config.torch_dtype = "bfloat16"
    save_pretrained(m, folder)
    return folder


def _open(ckpt, fmt, **kw):
    return Engine.from_pretrained(ckpt, memory_limit=None, quantization=fmt, progress=False, max_context=64, **kw)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_engine_head_format_bytes_stats_and_hooks(ckpt, fmt):
    """'auto' (the default) quantizes the head of a kernel-format engine; its bytes are in the plan and the
    resident bytes; stats() names the head; hook_final_norm fires before it; prefill logits come from it."""
    with _open(ckpt, fmt, lm_head_format=None) as plain, _open(ckpt, fmt) as e:
        cfg = e.config
        nbytes = get_format(fmt).nbytes((cfg.vocab_size, cfg.hidden_size))
        assert e.state.lm_head_format == fmt and e.state.lm_head_quant.nbytes == nbytes
        assert e.plan.non_expert_bytes - plain.plan.non_expert_bytes == nbytes
        assert e.resident_bytes() - plain.resident_bytes() == nbytes
        assert e.stats()["lm_head"] == fmt and plain.stats()["lm_head"] == "model"
        seen = []
        from smallthinker_lab.interventions import hooks

        with hooks(e, {"hook_final_norm": lambda h, n: seen.append(h.clone()) or h}):
            logits = e.forward(torch.tensor([[3, 14, 15, 92]]))[0, -1]
        assert len(seen) == 1
        assert torch.equal(logits, e.state.lm_head_quant(seen[0][0, -1:])[0])  # the prefill's head is the kernel's


def test_engine_with_bf16_bundle_keeps_the_models_head_unless_asked(ckpt):
    with _open(ckpt, None) as e:
        assert e.state.lm_head_format is None and e.stats()["lm_head"] == "model"
    with _open(ckpt, None, lm_head_format="int8_cpu") as e:
        assert e.state.lm_head_quant.fmt == "int8_cpu"
    with pytest.raises(ValueError, match="exact=True"):
        _open(ckpt, None, lm_head_format="int8_cpu", exact=True)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_engine_sparse_head_over_the_quantized_head(ckpt, fmt):
    """The predictor's rows from the quantized head, the rest fill_value; every row selected: the full head."""
    with _open(ckpt, fmt) as e:
        cfg = e.config
        five = LMHeadPredictor(cfg.hidden_size, cfg.vocab_size, 4, mode="top_m", top_m=5).to(BF)
        e.state.lm_head_predictor = five
        x = torch.randn(1, 1, cfg.hidden_size).to(BF)
        logits = e.eager.lm_head(x, decode=True)[0, 0]
        full = e.state.lm_head_quant(e.model.model.norm(x))[0, 0]
        sel = five.select(e.model.model.norm(x).reshape(1, -1))[0]
        assert int(torch.isfinite(logits).sum()) == 5
        assert torch.equal(logits[sel], full[sel])
        assert e.stats()["lm_head"] == fmt + " + sparse"


def test_engine_tokens_equal_the_model_on_the_same_dequantised_weights():
    """The default model, q4_0_cpu experts and head ('auto'), against the in-memory model whose experts and head hold
    exactly the kernels' weights (dequantised q4_0_cpu, rounded to bf16 as the model stores them), 20 prompts x 16
    tokens: every token the engine picks is the model's argmax or within 0.5 of it (the kernels round each product
    to bf16 and sum in another order), and at most 5% of steps are off the argmax (measured: 3 of 320 steps, by at
    most 0.0625, the same 3 as with the model's bf16 head on both sides: the head adds no disagreement)."""
    from smallthinker_lab import load_model

    model = load_model("default")
    dequantise_experts(model, "q4_0_cpu")
    with torch.no_grad():
        head = lq.dequantized_head(model.lm_head.weight, "q4_0_cpu")
        model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)  # untied: the embedding stays bf16
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (12,), generator=gen).tolist() for _ in range(20)]
    with Engine.from_pretrained("default", memory_limit=None, quantization="q4_0_cpu", progress=False) as e:
        assert e.state.lm_head_format == "q4_0_cpu"
        gaps = greedy_gaps(e, model, prompts)
    assert gaps.max() <= 0.5, gaps.max()
    assert (gaps > 0).float().mean() <= 0.05, (gaps > 0).sum()


# ------------------------------------------------------------------ the screened head
@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_screened_bound_holds_and_argmax_is_the_full_heads(dtype):
    """Random heads and 200 random hidden states (scales 0.1 to 30, some with a dominant direction so that many rows
    are close): the full head's logits and the exact products lie in the certified interval; in bf16 the screened
    head's argmax and its logit are the full head's (the lowest id among ties, as argmax); in fp32 its argmax is a
    row whose full-head logit is the maximum up to fp32 rounding (a GEMV over other rows may round differently)."""
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(2048, 128, generator=gen) * 0.05).to(dtype)
    w[7] = w[9]  # two identical rows: a tie the argmax must break as the full head does (lowest id)
    head = lq.ScreenedHead(w, lq.load_or_quantize(w, "int8_cpu", None))
    for i in range(200):
        h = torch.randn(1 + i % 3, 128, generator=gen) * [0.1, 1.0, 30.0][i % 3]
        if i % 5 == 0:
            h += w[7].float() * 20  # rows 7 and 9 lead
        h = h.to(dtype)
        full = torch.nn.functional.linear(h, w)
        _, lo, hi = head.bounds(h)
        exact = h.double() @ w.double().T
        assert (full.double() >= lo.double()).all() and (full.double() <= hi.double()).all()
        assert (exact >= lo.double()).all() and (exact <= hi.double()).all()
        logits, rows = head(h)
        assert 1 <= rows <= 2048
        if dtype == BF:  # the survivors' F.linear is bitwise the full head's rows: the same argmax, ties too
            assert torch.equal(logits.argmax(-1), full.argmax(-1))
            best = full.argmax(-1, keepdim=True)
            assert torch.equal(logits.gather(-1, best), full.gather(-1, best))
        else:  # fp32: a GEMV over fewer rows may round a row differently (rows 7 and 9 tie only in exact arithmetic)
            pick = full.gather(-1, logits.argmax(-1, keepdim=True))
            assert (pick >= full.max(-1, keepdim=True).values * (1 - 1e-5) - 1e-6).all()


def test_screened_engine_keeps_the_greedy_tokens_of_the_default_model():
    """The default model's bf16 engine with the screened head: the greedy tokens of the model's own head on 20
    prompts; few rows computed exactly; the int8 screen's bytes in the plan; sampling, the predictor and exact
    refused with a reason."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (12,), generator=gen).tolist() for _ in range(20)]
    with Engine.from_pretrained("default", memory_limit=None, progress=False, lm_head_format=None) as plain, \
            Engine.from_pretrained("default", memory_limit=None, progress=False, lm_head_format="screened") as e:
        cfg = e.config
        assert e.plan.non_expert_bytes - plain.plan.non_expert_bytes == get_format("int8_cpu").nbytes(
            (cfg.vocab_size, cfg.hidden_size))
        for p in prompts:
            assert e.generate(p, 16, stop_tokens=[]).tokens == plain.generate(p, 16, stop_tokens=[]).tokens
        s = e.stats()
        assert s["lm_head"] == "screened" and 1 <= s["lm_head_rows_per_token"] < 0.01 * cfg.vocab_size
        with pytest.raises(ValueError, match="greedy decoding"):
            e.generate(prompts[0], 2, temperature=0.7)
    with pytest.raises(ValueError, match="give one or the other"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, lm_head_format="screened",
                               lm_head_predictor=LMHeadPredictor(256, 8192, 2, mode="top_m", top_m=4))
    with pytest.raises(ValueError, match="exact=True excludes"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, lm_head_format="screened", exact=True)


def test_head_benchmark_smoke(tmp_path):
    from benchmarks import cpu_lm_head

    out = cpu_lm_head.main(["--vocab", "512", "--hidden", "64", "--rounds", "1", "--calls", "1", "--out",
                            str(tmp_path)])
    assert set(out["variants"]) == {"bf16", "q4_0_cpu", "int8_cpu", "screened"}
    assert all(v["ms_median"] > 0 for v in out["variants"].values())
    assert out["open"]["q4_0_cpu"]["cached"] == "cache" and (tmp_path / "cpu_lm_head.json").is_file()
