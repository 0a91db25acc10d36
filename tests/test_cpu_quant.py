"""Low-bit CPU experts: the kernel formats' mapping from ggml Q4_0 / int8, the products through torch's kernels
against dequantise-then-multiply, and bundles stored in the kernels' packed layout.

Tolerances, from the arithmetic: each kernel product is the fp32 product of the bf16 input with the format's
dequantised weights, rounded to bf16, so |kernel - reference| <= 2^-8 |reference| (bf16's unit roundoff) plus fp32
accumulation error (bounded here by 1e-5 * sum_k |x_k w_k|). A whole expert also rounds its input, gate, up and
hidden to bf16: measured 0.4-0.5% of max |y| at the 4B shape (random weights), at most 0.9% over all 256 experts of
the default model (8 random tokens each); asserted <= 1.5% on random and real weights.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import dequantise_experts, greedy_gaps, random_model

from smallthinker_lab import load_model
from smallthinker_lab.engine.bundle import (
    CHECKSUMS,
    INDEX_NAME,
    BundleError,
    open_bundle,
    record_layout,
)
from smallthinker_lab.engine.conversion import convert, ensure_bundle
from smallthinker_lab.engine.cpu_kernels import expert_forward, expert_operands, linear, reglu
from smallthinker_lab.engine.quant import (
    KERNEL_FORMATS,
    as_uint8,
    dequantize_q4_0,
    dequantize_q4_0_cpu,
    get_format,
    int4pack_layout,
    quantize_int8,
    quantize_q4_0,
    repack_q4_0,
)
from smallthinker_lab.model.checkpoint import save_pretrained
from smallthinker_lab.model.moe import Expert

BF16_U = 2.0 ** -8
EXPERT_TOL = 0.015  # of max |y|, see the module docstring


def _weights(f: int, h: int, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = {m: torch.randn(shape, generator=gen) * std for m, shape in (("gate", (f, h)), ("up", (f, h)),
                                                                      ("down", (h, f)))}
    w["gate"][:, :32] *= 50  # rows with one large block: the per-row / per-block scales matter
    return w


def _encode(weights: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    codec = get_format(fmt)
    return {m: codec.encode(w) for m, w in weights.items()}


def _reference(x: torch.Tensor, mats: dict, fmt: str, f: int, h: int) -> torch.Tensor:
    """The model's Expert on the format's dequantised weights, in fp32."""
    codec = get_format(fmt)
    ex = Expert(h, f)
    with torch.no_grad():
        for m, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            getattr(ex, m).weight.copy_(codec.decode(mats[m], shape, torch.float32))
        return ex(x.to(torch.float32))


def test_q4_0_cpu_is_ggml_q4_0_with_the_scale_in_bf16():
    """Same q as ggml (so ggml's zero blocks and rounding edges carry over), weight (q - 8) * bf16(d) exactly,
    within 2^-8 of ggml's (q - 8) * fp16(d)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen) * torch.logspace(-4, 2, 32)[:, None]
    w[0, :32] = 0.0  # d = 0
    w[3, 64:96] = torch.linspace(-1, 1, 32)
    ggml = quantize_q4_0(w)
    ours = dequantize_q4_0_cpu(repack_q4_0(ggml, w.shape), w.shape)
    ref = dequantize_q4_0(ggml, w.shape)  # (q - 8) * fp16(d) in fp32
    d = torch.from_numpy(ggml.numpy().reshape(32, 8, 18)[:, :, :2].copy().view(np.float16)).float()  # (R, B, 1)
    q8 = torch.where(d != 0, ref.view(32, 8, 32) / d, torch.zeros(()))  # q - 8, integers
    assert torch.equal(q8, q8.round()) and q8.abs().max() <= 8
    assert torch.equal(ours, (q8 * d.bfloat16().float()).view(32, 256))
    assert torch.all((ours - ref).abs() <= BF16_U * ref.abs())
    assert torch.all(ours[0, :32] == 0)


def test_int8_cpu_scale_is_bf16_and_error_stays_half_a_step():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 96, generator=gen) * torch.logspace(-3, 1, 16)[:, None]
    w[5] = 0.0
    codec = get_format("int8_cpu")
    deq = codec.decode(codec.encode(w), w.shape)
    step = w.abs().amax(1, keepdim=True) / 127 * (1 + BF16_U)  # the scale, rounded up to bf16
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(deq[5] == 0)
    int8 = get_format("int8").decode(quantize_int8(w), w.shape)  # the fp32-scale int8 format: as close to w
    assert (deq - w).abs().max() <= 1.01 * (int8 - w).abs().max()


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@pytest.mark.parametrize("n", [1, 5, 16])
def test_kernel_products_equal_dequantised_products(fmt, n):
    """Each of an expert's three products at the 4B shape, 1 and several tokens: the kernel's bf16 output is the
    fp32 product with the dequantised weights, rounded to bf16."""
    f, h = 768, 1536
    weights = _weights(f, h, seed=n)
    mats = _encode(weights, fmt)
    ops = expert_operands(mats, fmt, (f, h))
    codec = get_format(fmt)
    gen = torch.Generator().manual_seed(10 + n)
    for m, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
        x = torch.randn(n, shape[1], generator=gen).bfloat16()
        w = codec.decode(mats[m], shape, torch.float32)
        got = linear(x, getattr(ops, m), fmt).float()
        ref = x.float() @ w.t()
        bound = BF16_U * ref.abs() + 1e-5 * (x.float().abs() @ w.abs().t())
        assert got.shape == (n, shape[0]) and torch.all((got - ref).abs() <= bound), (m, (got - ref).abs().max())


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_expert_forward_equals_the_model_expert_on_dequantised_weights(fmt):
    f, h = 768, 1536
    mats = _encode(_weights(f, h), fmt)
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 16):
        x = torch.randn(n, h, generator=gen)
        y = expert_forward(x, mats, fmt, (f, h))
        ref = _reference(x, mats, fmt, f, h)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert (y - ref).abs().max() <= EXPERT_TOL * ref.abs().max()
    one = expert_forward(x[0], mats, fmt, (f, h))  # a single (H,) token
    assert one.shape == (h,) and (one - ref[0]).abs().max() <= EXPERT_TOL * ref.abs().max()
    y, g = reglu(x[:0], expert_operands(mats, fmt, (f, h)))  # no tokens routed
    assert y.shape == (0, h) and g.shape == (0, f)


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_expert_forward_on_the_default_models_experts_and_activations(default_model, fmt):
    """The shipped model's expert weights, on the hidden states its MoE blocks receive for a real prompt."""
    model, cfg = default_model, default_model.config
    f, h = cfg.moe_ffn_hidden_size, cfg.hidden_size
    seen = {}

    def keep(i):
        def hook(module, args):
            seen[i] = args[0].reshape(-1, h).detach().float()  # (N, H) the normalised hidden the experts get
        return hook

    handles = [layer.block_sparse_moe.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)))
    finally:
        for hd in handles:
            hd.remove()
    checked = 0
    for layer in range(cfg.num_hidden_layers):
        for e in (0, cfg.num_experts - 1):
            ex = model.model.layers[layer].block_sparse_moe.experts[e]
            mats = _encode({"gate": ex.gate.weight, "up": ex.up.weight, "down": ex.down.weight}, fmt)
            x = seen[layer]
            for rows in (x[:1], x):  # one token and all 24
                y = expert_forward(rows, mats, fmt, (f, h))
                ref = _reference(rows, mats, fmt, f, h)
                assert (y - ref).abs().max() <= EXPERT_TOL * ref.abs().max(), (layer, e, rows.shape[0])
                checked += 1
    assert checked == 4 * cfg.num_hidden_layers


def test_bad_input_is_named():
    f, h = 64, 128
    mats = _encode(_weights(f, h), "q4_0_cpu")
    with pytest.raises(ValueError, match=r"q4_0_cpu buffer for shape \(64, 128\) must be"):
        expert_forward(torch.randn(1, h), {**mats, "up": mats["up"][:-2]}, "q4_0_cpu", (f, h))
    with pytest.raises(ValueError, match="has no CPU kernel"):
        expert_forward(torch.randn(1, h), mats, "q4_0", (f, h))
    with pytest.raises(ValueError, match="lacks matrix 'down'"):
        expert_forward(torch.randn(1, h), {"gate": mats["gate"], "up": mats["up"]}, "q4_0_cpu", (f, h))
    with pytest.raises(ValueError, match="takes 128"):
        expert_forward(torch.randn(1, 64), mats, "q4_0_cpu", (f, h))
    with pytest.raises(ValueError, match="rows .* divisible by 16, got 24"):
        get_format("q4_0_cpu").encode(torch.randn(24, 64))
    with pytest.raises(BundleError, match="down_transposed must be False"):
        record_layout(h, f, "int8_cpu", down_transposed=True)


# ------------------------------------------------------------------ bundles in the packed layout
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpuq") / "model"
    model = random_model()
    save_pretrained(model, folder)
    return folder, model


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_packed_bundle_round_trip(ckpt, tmp_path, fmt):
    """Convert once, reopen, every record's checksum holds, its bytes are the format's encoding, and the expert
    computed from the memory-mapped file equals the model's expert on the dequantised weights."""
    folder, model = ckpt
    cfg = model.config
    f, h = cfg.moe_ffn_hidden_size, cfg.hidden_size
    b = open_bundle(convert(folder, tmp_path / fmt, quantization=fmt, progress=False), cfg)
    idx = json.loads((tmp_path / fmt / INDEX_NAME).read_text())
    assert b.format == fmt and b.down_transposed is False and b.matrices["down"].shape == (h, f)
    assert idx["packing"] == (int4pack_layout() if fmt == "q4_0_cpu" else None)
    data = np.memmap(b.data_path, dtype=np.uint8, mode="r")
    x = torch.randn(3, h, generator=torch.Generator().manual_seed(4))
    codec = get_format(fmt)
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            base = b.offset(layer, e)
            assert CHECKSUMS[b.checksum]()(data[base:base + b.payload_nbytes]) == int(b.checksums[layer, e])
            mats = {m: as_uint8(data[base + s.offset:base + s.offset + s.nbytes]) for m, s in b.matrices.items()}
            ex = model.model.layers[layer].block_sparse_moe.experts[e]
            for m in ("gate", "up", "down"):
                assert torch.equal(mats[m], codec.encode(getattr(ex, m).weight)), (layer, e, m)
            y = expert_forward(x, mats, fmt, b.matrices["gate"].shape)
            ref = _reference(x, mats, fmt, f, h)
            assert (y - ref).abs().max() <= EXPERT_TOL * ref.abs().max()


def test_bundle_of_another_version_or_packing_is_refused(ckpt, tmp_path):
    folder, model = ckpt
    out = convert(folder, tmp_path / "v", quantization="q4_0_cpu", progress=False)
    idx = json.loads((out / INDEX_NAME).read_text())
    (out / INDEX_NAME).write_text(json.dumps({**idx, "version": 2}))
    with pytest.raises(BundleError, match="has bundle version 2, this engine reads version 3: convert"):
        open_bundle(out)
    (out / INDEX_NAME).write_text(json.dumps({**idx, "packing": "AVX2-0123456789abcdef"}))
    with pytest.raises(BundleError, match="packed for kernel layout AVX2-0123456789abcdef, this process's torch "
                                          f"uses {int4pack_layout()}"):
        open_bundle(out)
    ensure_bundle(folder, out, "q4_0_cpu", progress=False)  # a stale packing is converted again
    assert open_bundle(out, model.config).bundle_id != idx["bundle_id"]


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="needs a vectorised torch CPU")
def test_bundle_packed_under_another_cpu_capability_is_refused(ckpt, tmp_path):
    """A bundle converted by a torch that dispatches to other kernels (here ATEN_CPU_CAPABILITY=default: the
    scalar kernels, whose nibble order differs) would compute garbage here: it is refused, naming both layouts."""
    folder, _ = ckpt
    code = ("from smallthinker_lab.engine.conversion import convert; import sys; "
            "convert(sys.argv[1], sys.argv[2], quantization='q4_0_cpu', progress=False)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "d")], env=env, check=True,
                   cwd=os.getcwd())
    assert json.loads((tmp_path / "d" / INDEX_NAME).read_text())["packing"].startswith("DEFAULT-")
    with pytest.raises(BundleError, match=r"packed for kernel layout DEFAULT-\w+, this process's torch uses "):
        open_bundle(tmp_path / "d")


def test_engine_with_q4_0_cpu_experts_tracks_the_model_on_the_same_weights():
    """The engine computing its experts through the int4 kernel against the in-memory model whose experts hold
    exactly the kernel's weights (dequantised q4_0_cpu), on 20 prompts of the default model: every token the engine
    picks is the model's argmax or within 0.5 of it (the kernel sums in another order than F.linear and rounds
    each product to bf16: measured 5 of 320 steps off the argmax, by at most 0.375), and at most 5% of steps are."""
    from smallthinker_lab import load_model
    from smallthinker_lab.engine import Engine

    torch.set_num_threads(1)
    model = load_model("default")
    dequantise_experts(model, "q4_0_cpu")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (12,), generator=gen).tolist() for _ in range(20)]
    # the model's own (bf16) head: the quantized head's test is tests/test_lm_head_quant.py
    with Engine.from_pretrained("default", memory_limit=None, quantization="q4_0_cpu", progress=False,
                                lm_head_format=None) as e:
        assert e.bundle.format == "q4_0_cpu" and e.state.lm_head_quant is None
        gaps = greedy_gaps(e, model, prompts)
    assert gaps.max() <= 0.5, gaps.max()
    assert (gaps > 0).float().mean() <= 0.05, (gaps > 0).sum()
