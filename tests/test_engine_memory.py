"""The process's peak resident memory stays within the engine's memory limit (plus a documented margin).

A child process opens an engine on a checkpoint with ~150 MB of expert weights under a 60 MB limit and generates;
its peak RSS growth (VmHWM after, minus VmRSS before; the peak is reset through /proc/self/clear_refs) must stay
within the limit plus MARGIN. The baseline (interpreter, torch, its kernels and thread pools) is measured after a
warm-up run on a tiny model of the same dtype and is not part of the limit. The same child then opens an engine
without a limit, whose growth must cover the expert bytes: proof that the measurement sees the cache.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smallthinker_lab.engine import convert
from smallthinker_lab.model.checkpoint import expected_tensors
from smallthinker_lab.model.config import SmallThinkerConfig, hybrid_layouts

REPO = Path(__file__).resolve().parents[1]
LIMIT = 60_000_000
MARGIN = 16 * 2**20  # allocator slack and one-off buffers the warm-up did not trigger

CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    from smallthinker_lab.engine import Engine

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    big, warm, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompt = list(range(3, 40))
    with Engine.from_pretrained(warm, memory_limit=None, progress=False) as w:
        w.generate(prompt[:10], 4, stop_tokens=[])
    out = {}
    for name, lim in (("limited", limit), ("unlimited", None)):
        gc.collect()
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        e = Engine.from_pretrained(big, memory_limit=lim, progress=False, bypass_page_cache=True)
        e.generate(prompt, 16, stop_tokens=[])
        st = e.stats()
        out[name] = dict(growth=status("VmHWM") - base, accounted=st["peak_accounted_bytes"],
                         misses=st["misses"], capacity=st["capacity_experts"], expert=st["expert_nbytes"])
        e.close()
        del e
    print(json.dumps(out))
""")


def _write(folder: Path, config: SmallThinkerConfig) -> None:
    """A bf16 checkpoint without generating 150 MB of random numbers: experts share one random matrix set."""
    folder.mkdir(parents=True)
    config.replace(torch_dtype="bfloat16").save(folder)
    gen = torch.Generator().manual_seed(0)
    shared = {}
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif ".experts." in name:
            kind = name.rsplit(".", 2)[-2]
            if kind not in shared:
                shared[kind] = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
            tensors[name] = shared[kind]
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.2).to(torch.bfloat16)
    save_file({k: v.clone() if ".experts." in k else v for k, v in tensors.items()}, str(folder / "model.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_stays_within_the_limit(tmp_path):
    rope, swa = hybrid_layouts(6)
    big = SmallThinkerConfig.from_name("smallthinker-test", hidden_size=512, moe_ffn_hidden_size=512,
                                       moe_num_primary_experts=16, num_hidden_layers=6, rope_layout=rope,
                                       sliding_window_layout=swa)
    _write(tmp_path / "big", big)
    _write(tmp_path / "warm", SmallThinkerConfig.from_name("smallthinker-test"))
    convert(tmp_path / "big", progress=False)
    convert(tmp_path / "warm", progress=False)
    expert_bytes = 6 * 16 * 3 * 512 * 512 * 2
    assert expert_bytes > 2.4 * LIMIT
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "warm"), str(LIMIT)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    limited, unlimited = out["limited"], out["unlimited"]
    assert limited["accounted"] <= LIMIT and limited["capacity"] * limited["expert"] < LIMIT
    assert limited["misses"] > limited["capacity"]  # the cache was full and evicted
    assert limited["growth"] <= LIMIT + MARGIN, out
    assert unlimited["growth"] >= 0.9 * expert_bytes, out  # the measurement does see the expert cache
