"""The quantized expert kernels (smallthinker_lab.kernels.quant_experts, triton_quant.py) against a
dequantise-then-multiply reference in torch, over the bundle's own int8 / Q4_0 bytes (engine/quant.py writes them,
its bit-exact dequantisers give the reference weights). Without a GPU the kernels run in Triton's interpreter;
with one they run compiled (and the ``gpu`` test at the 4B shape).

Tolerance: the kernels factor the scale out of each Q4_0 block (int8: each row) and accumulate in fp32 in another
order than the reference (float64), then round to bf16 where the model rounds (each product, ReGLU, each weighted
expert, the combine, the residual). An output may then land one bf16 step away from the reference's at each
rounding, and a bf16 step is up to 2^-7 of the value: we allow 2^-5 of the value (four steps: gate, up and their
product each one step off) plus 2^-5 of the outputs' RMS (sums that cancel), and require most outputs to be
bit-identical, which a wrong computation would not give. Triton's interpreter rounds fp32 to bf16 toward zero (it
truncates the low 16 bits; CUDA rounds to nearest even): the reference rounds as the kernels' mode does."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from smallthinker_lab.engine import quant  # noqa: E402
from smallthinker_lab.kernels import interpreted  # noqa: E402
from smallthinker_lab.kernels import quant_experts as qe  # noqa: E402
from smallthinker_lab.kernels.tables import ExpertTable  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
BF = torch.bfloat16


def _bf(t):
    """fp32 -> bf16 as the kernels round (values as float64)."""
    f = t.float()
    if interpreted():
        f = (f.view(torch.int32) & -65536).view(torch.float32)
    return f.to(BF).double()


def _experts(fmt, E, H, F, seed=0, std=0.05):
    """E random experts packed as the kernels read them: (uint8 base, [E, 3] byte offsets, dequantised fp64
    weights [(gate, up, down)] from the format's own reference decoder)."""
    g = torch.Generator().manual_seed(seed)
    (og, ou, od), stride = qe.record_layout(fmt, H, F)
    base = torch.zeros(E * stride, dtype=torch.uint8)
    f = quant.get_format(fmt)
    weights = []
    for e in range(E):
        mats = []
        for off, shape in zip((og, ou, od), ((F, H), (F, H), (H, F))):
            w = torch.randn(shape, generator=g) * std
            b = f.encode(w)
            base[e * stride + off:e * stride + off + b.numel()] = b
            mats.append(f.decode(b, shape, torch.float32).double())
        weights.append(mats)
    offs = torch.arange(E)[:, None] * stride + torch.tensor([og, ou, od])
    return base.to(DEV), offs.to(DEV), weights


def _selection(M, E, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K].sort().values for _ in range(M)])  # [M, K] ascending
    w = (torch.rand(M, K, generator=g) + 0.1).to(BF)
    return ids, w


def _norm(x, ln):
    xf = x.double()
    rstd = 1.0 / torch.sqrt((xf * xf).mean(-1, keepdim=True) + EPS)
    return _bf(ln.double() * _bf(xf * rstd))


def _ref_gate_up(x, ln, weights, ids):
    u = _norm(x.cpu(), ln.cpu())  # [M, H]
    out = []
    for m in range(ids.shape[0]):
        row = []
        for e in ids[m].tolist():
            wg, wu, _ = weights[e]
            g = _bf(wg @ u[m])
            up = _bf(wu @ u[m])
            row.append(_bf(up * g.clamp(min=0)))
        out.append(torch.stack(row))
    return torch.stack(out)  # [M, K, F]


def _ref_down(a, weights, ids, sel_w, x):
    out = []
    for m in range(ids.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for j, e in enumerate(ids[m].tolist()):
            d = _bf(weights[e][2] @ a[m, j].double())
            y = _bf(y + _bf(d * sel_w[m, j].double()))
        out.append(_bf(x[m].double() + y))
    return torch.stack(out)


def _close(got, ref, what):
    got, ref = got.cpu().double(), ref.cpu().double()
    rms = ref.pow(2).mean().sqrt().item()
    err = (got - ref).abs()
    bad = err > 2 ** -5 * ref.abs() + 2 ** -5 * rms
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, max error {err.max():.3g}"
    same = (got == ref).double().mean().item()
    assert same > 0.8, f"{what}: only {same:.2f} of the outputs bit-identical to the reference"


def _run(fmt, M, E, K, H, F, rows, seed=0):
    base, offs, weights = _experts(fmt, E, H, F, seed)
    ids, sel_w = _selection(M, E, K, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = (torch.randn(M, H, generator=g)).to(BF).to(DEV)
    ln = (1 + 0.1 * torch.randn(H, generator=g)).to(BF).to(DEV)
    sel_off = offs[ids.to(DEV)].contiguous()  # [M, K, 3]
    a = torch.zeros(M, K, F, dtype=BF, device=DEV)
    out = torch.zeros(M, H, dtype=BF, device=DEV)
    blocks = {"gate_up": (rows, 2), "down": (rows, 2)}
    qe.launch_gate_up(fmt, x, ln, base, sel_off, a, EPS, H, F, K, M, blocks=blocks)
    qe.launch_down(fmt, a, base, sel_off, sel_w.to(DEV), x, out, H, F, K, M, blocks=blocks)
    _close(a, _ref_gate_up(x, ln, weights, ids), f"{fmt} gate/up")
    _close(out, _ref_down(a.cpu(), weights, ids, sel_w, x.cpu()), f"{fmt} down")
    return base, offs, ids, x, ln, sel_off, sel_w, a, out


# (decode rows M, experts E, top-k K, rows per program): H = 96 (3 Q4_0 blocks: masked tiles), F = 32 (the tests'
# model's shape, one block); small, as Triton's interpreter runs each program in Python
CASES = [(1, 4, 1, 1), (1, 8, 4, 2), (2, 6, 3, 4), (4, 16, 2, 4)]


@pytest.mark.parametrize("fmt", ["int8", "q4_0"])
@pytest.mark.parametrize("M,E,K,rows", CASES)
def test_quantized_expert_kernels_equal_dequantise_then_multiply(fmt, M, E, K, rows):
    _run(fmt, M, E, K, 96, 32, rows)


@pytest.mark.parametrize("fmt", ["int8", "q4_0"])
def test_write_through_copies_the_quantized_bytes_into_the_slot(fmt):
    """A missed expert read from its record is written, byte for byte, into its slot; a hit (-1) writes nothing."""
    H, F, E, K = 64, 32, 4, 2
    (og, ou, od), stride = qe.record_layout(fmt, H, F)
    base, offs, _ = _experts(fmt, E, H, F)
    arena = torch.cat([base, torch.full((2 * stride,), 0xAB, dtype=torch.uint8, device=DEV)])  # two empty slots
    ids = torch.tensor([[1, 3]])
    sel_off = offs[ids.to(DEV)].contiguous()
    dst = torch.tensor([[[E * stride + og, E * stride + ou, E * stride + od], [-1, -1, -1]]], device=DEV)
    x = torch.randn(1, H).to(BF).to(DEV)
    a = torch.zeros(1, K, F, dtype=BF, device=DEV)
    out = torch.zeros(1, H, dtype=BF, device=DEV)
    ln = torch.ones(H, dtype=BF, device=DEV)
    qe.launch_gate_up(fmt, x, ln, arena, sel_off, a, EPS, H, F, K, dst_off=dst.view(-1))
    qe.launch_down(fmt, a, arena, sel_off, torch.ones(1, K, dtype=BF, device=DEV), x, out, H, F, K,
                   dst_off=dst.view(-1))
    rec = base[1 * stride:2 * stride].cpu()
    slot = arena[E * stride:(E + 1) * stride].cpu()
    for off, shape in zip((og, ou, od), ((F, H), (F, H), (H, F))):
        n = quant.get_format(fmt).nbytes(shape)
        assert torch.equal(slot[off:off + n], rec[off:off + n])
    assert bool((arena[(E + 1) * stride:] == 0xAB).all())  # the second slot: a hit wrote nothing
    assert torch.equal(arena[:E * stride], base)  # the records are read, never written


def test_layouts_and_bytes():
    H, F = 1536, 768  # the 4B shape
    bf, i8, q4 = (qe.expert_bytes(f, H, F) for f in ("bf16", "int8", "q4_0"))
    assert bf == 3 * H * F * 2
    assert 1.98 < bf / i8 < 2.0 and 3.5 < bf / q4 < 3.6
    for fmt in ("int8", "q4_0"):  # the kernels' matrix layouts are the bundle formats' byte counts
        assert qe.matrix_nbytes(fmt, F, H) == quant.get_format(fmt).nbytes((F, H))
        (og, ou, od), stride = qe.record_layout(fmt, H, F)
        assert og % 64 == ou % 64 == od % 64 == stride % 64 == 0 and od + qe.matrix_nbytes(fmt, H, F) <= stride
    with pytest.raises(ValueError, match="divisible by 32"):
        qe.record_layout("q4_0", 100, 64)
    with pytest.raises(ValueError, match="expert format"):
        qe.matrix_nbytes("q8_0", 4, 32)
    x = torch.zeros(1, 64, dtype=BF)
    with pytest.raises(ValueError, match="flat uint8 tensor"):
        qe.launch_gate_up("int8", x, x[0], x[0], torch.zeros(3, dtype=torch.long), x, EPS, 64, 32, 1)
    with pytest.raises(ValueError, match="compute"):
        qe.launch_down("bf16", x, x[0], torch.zeros(3, dtype=torch.long), x, x, x, 64, 32, 1)
    with pytest.raises(ValueError, match="divisible by 32"):
        qe.launch_down("q4_0", x, torch.zeros(8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), x, x, x, 64,
                       40, 1)
    with pytest.raises(ValueError, match="uint8 bases"):
        ExpertTable([torch.zeros(10, dtype=BF)], torch.zeros(1, 1, 3, dtype=torch.long), "int8").check(1, 1, 64, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "q4_0"])
def test_quantized_kernels_compiled_at_the_4b_shape(fmt):
    """Compiled on CUDA at the 4B expert shape (H 1536, F 768, 32 experts, top-4), one and four decode rows."""
    for M in (1, 4):
        _run(fmt, M, 32, 4, 1536, 768, qe.DEFAULT_QUANT_BLOCKS[fmt]["gate_up"][0])


@pytest.mark.parametrize("fmt", ["int8", "q4_0"])
def test_kernel_runner_decodes_with_quantized_experts(fmt):
    """The in-memory model decoding through the kernels over quantized experts (``kernel_experts``) against the same
    model with the dequantised weights (bf16) through the bf16 kernels: the same tokens, logits within rounding."""
    from smallthinker_lab.kernels import KernelRunner
    from smallthinker_lab.model import SmallThinkerConfig, SmallThinkerForCausalLM

    m = SmallThinkerForCausalLM(SmallThinkerConfig.from_name("smallthinker-test")).init_weights(seed=3)
    m = m.to(BF).to(DEV).eval()
    table = quant.kernel_experts(m, fmt)  # the model's experts now hold the dequantised values
    assert table.format == fmt and table.bases[0].dtype == torch.uint8
    qrun = KernelRunner(m, max_context=32, graph=False, experts=table)
    ref = KernelRunner(m, max_context=32, graph=False)
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]], device=DEV)
    with torch.inference_mode():
        assert torch.equal(qrun.step(prompt), ref.step(prompt))  # prefill: the model's own forward in both
        for t in [5, 77, 2]:  # positions 10..12: the sliding window (8) wraps
            tok = torch.tensor([[t]], device=DEV)
            got, want = qrun.step(tok).float(), ref.step(tok).float()
            assert (got - want).abs().max().item() < 0.05 * want.std().item()
            assert int(got.argmax()) == int(want.argmax())
            assert torch.equal(qrun.kernels.ids, ref.kernels.ids)


def test_benchmark_runs_at_the_tiny_shape(tmp_path):
    """benchmarks/bench_quant_kernels.py end to end at the test shape (interpreted without a GPU): one row per
    format, each checked against the reference, the bytes per step as the layouts say."""
    import json

    from benchmarks import bench_quant_kernels as bench

    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_quant_kernels_tiny.json").read_text())
    rows = {r["format"]: r for r in res["rows"]}
    assert list(rows) == ["bf16", "int8", "q4_0"] and all(r["check_ok"] for r in rows.values())
    L, K, H, F = 4, 2, 64, 32  # smallthinker-test
    for fmt, r in rows.items():
        assert r["bytes_per_step"] == L * K * qe.expert_bytes(fmt, H, F)
        assert r["seconds_per_step"]["median"] > 0 and r["gb_per_s"] > 0
    assert rows["q4_0"]["bytes_vs_bf16"] > rows["int8"]["bytes_vs_bf16"] > 1.8
    assert "| q4_0 |" in (tmp_path / "bench_quant_kernels_tiny.md").read_text()

