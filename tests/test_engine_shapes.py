"""The engine's CPU products come from a bounded set of shapes (engine/shapes.py), so oneDNN's per-shape kernels,
which stay resident outside every memory limit, stay few: an expert's rows are buckets, the sparse up product's
neurons multiples of 64. Observed through oneDNN's own log (ONEDNN_VERBOSE) in a child process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from smallthinker_lab.engine import convert
from smallthinker_lab.engine.shapes import NEURON_BUCKET, neuron_bucket, pad_index, row_bucket
from smallthinker_lab.model.config import SmallThinkerConfig, hybrid_layouts

REPO = Path(__file__).resolve().parents[1]


def test_row_buckets_are_few_and_tight():
    sizes = {row_bucket(n) for n in range(1, 257)}
    assert len(sizes) <= 16
    for n in range(1, 2000):
        b = row_bucket(n)
        assert n <= b <= max(2, 1.5 * n) and row_bucket(b) == b


def test_padding_repeats_a_real_entry():
    idx = torch.tensor([3, 7, 9])
    assert pad_index(idx, 6).tolist() == [3, 7, 9, 9, 9, 9]
    assert pad_index(idx, 3) is idx
    assert neuron_bucket(1, 512) == NEURON_BUCKET and neuron_bucket(500, 512) == 512 and neuron_bucket(0, 512) == 0


CHILD = textwrap.dedent("""
    import sys, torch
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(1)
    from smallthinker_lab.engine import Engine

    def products(prof):  # (M, K, N) of every matrix product torch ran, from the operators' input shapes
        for ev in prof.events():
            sh = ev.input_shapes
            if ev.name == "aten::mm" and len(sh) >= 2 and len(sh[0]) == 2 and len(sh[1]) == 2:
                print("MM", sh[0][0], sh[0][1], sh[1][1])
            elif ev.name == "aten::addmm" and len(sh) >= 3 and len(sh[1]) == 2 and len(sh[2]) == 2:
                print("MM", sh[1][0], sh[1][1], sh[2][1])

    e = Engine.from_pretrained(sys.argv[1], memory_limit=None, progress=False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for n in (5, 11, 23, 37):
            e.generate(list(range(3, 3 + n)), 6, stop_tokens=[])
    products(prof)
    print("MARK decode", flush=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        e.generate(list(range(3, 8)), 1, stop_tokens=[])  # prefill of a length seen before, one token
        for t in e.stream(list(range(3, 8)), 12, stop_tokens=[]):
            pass
    products(prof)
    print("MARK end", flush=True)
""")


def test_product_shapes_come_from_a_bounded_set(tmp_path):
    """The CPU engine's matrix products take their row counts from a bounded set (one token, a prompt length, a
    row bucket) and their widths from the model's or the neuron buckets, so that a CPU backend's per-shape plans
    (oneDNN primitives, packed operands) stay few; observed through torch.profiler's operator input shapes (the
    earlier oneDNN verbose log is empty where torch runs fp32 products through another BLAS, as on AVX2 machines)."""
    rope, swa = hybrid_layouts(2)
    cfg = SmallThinkerConfig.from_name("smallthinker-test", hidden_size=512, moe_ffn_hidden_size=512,
                                       moe_num_primary_experts=4, num_hidden_layers=2, rope_layout=rope,
                                       sliding_window_layout=swa)
    sys.path.insert(0, str(REPO / "tests"))
    from test_engine_memory import _write

    _write(tmp_path / "ck", cfg)
    convert(tmp_path / "ck", progress=False)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ck")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env=os.environ)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    mark = lines.index("MARK decode")

    def shapes(part):
        return {tuple(int(v) for v in ln.split()[1:]) for ln in part if ln.startswith("MM ")}

    prefill, decode = shapes(lines[:mark]), shapes(lines[mark:])
    assert prefill and decode
    widths = {cfg.hidden_size, cfg.num_experts, cfg.vocab_size, cfg.num_attention_heads * cfg.head_dim,
              cfg.num_key_value_heads * cfg.head_dim, cfg.moe_ffn_hidden_size}
    lengths = {5, 11, 23, 37}  # the prompts: the non-expert projections of a prefill run on all its rows
    # rows: one token, a prompt length, or a bucket (an expert's tokens); neuron counts: multiples of 64
    for m, k, n in prefill | decode:
        assert m in lengths or m == row_bucket(m), (m, k, n)
        assert n in widths or n % NEURON_BUCKET == 0, (m, k, n)
    # decode (one token after a prefill of a length seen before) runs one-row products only
    assert {m for m, _, _ in decode - prefill} <= {1}, decode - prefill
