"""The engine's CPU products come from a bounded set of shapes (engine/shapes.py), so oneDNN's per-shape kernels,
which stay resident outside every memory limit, stay few: decode compiles none, prefill's expert products use only
bucketed row counts. Observed through oneDNN's own log (ONEDNN_VERBOSE) in a child process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
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
    torch.set_num_threads(1)
    from smallthinker_lab.engine import Engine
    e = Engine.from_pretrained(sys.argv[1], memory_limit=None, progress=False)
    for n in (5, 11, 23, 37):
        e.generate(list(range(3, 3 + n)), 6, stop_tokens=[])
    print("MARK decode", flush=True)
    e.generate(list(range(3, 8)), 1, stop_tokens=[])  # prefill of a length seen before, one token
    for t in e.stream(list(range(3, 8)), 12, stop_tokens=[]):
        pass
    print("MARK end", flush=True)
""")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_decode_compiles_no_kernel_per_shape(tmp_path):
    rope, swa = hybrid_layouts(2)
    cfg = SmallThinkerConfig.from_name("smallthinker-test", hidden_size=512, moe_ffn_hidden_size=512,
                                       moe_num_primary_experts=4, num_hidden_layers=2, rope_layout=rope,
                                       sliding_window_layout=swa)
    sys.path.insert(0, str(REPO / "tests"))
    from test_engine_memory import _write

    _write(tmp_path / "ck", cfg)
    convert(tmp_path / "ck", progress=False)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ck")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    prefill = [ln for ln in lines[:lines.index("MARK decode")] if ",exec," in ln and "matmul" in ln]
    decode = [ln for ln in lines[lines.index("MARK decode"):] if ",exec," in ln and "matmul" in ln]
    # the expert products of prefill: (rows x 512) @ (512 x 512): rows only from the bucket set
    rows = {int(ln.split(",")[-2].split("x")[0]) for ln in prefill if ln.split(",")[-2].endswith(":512x512")}
    assert rows and rows <= {row_bucket(n) for n in range(1, 64)}, rows
    # decode (one token; the second generation's prefill is of a length seen before) adds no shape
    seen = {ln.split(",")[-2] for ln in prefill}
    new = {ln.split(",")[-2] for ln in decode} - seen
    assert not new, new
