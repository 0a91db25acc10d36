"""The engine on CUDA: same tokens as the in-memory model, exact trace replay, peak device memory within the limit.

Run on a machine with a GPU:  python -m pytest tests/test_engine_gpu.py -m gpu -q
"""

import pytest
import torch
from conftest import random_model
from safetensors.torch import save_file

from smallthinker_lab.engine import Engine, convert, simulate
from smallthinker_lab.model.checkpoint import expected_tensors, load_model, save_pretrained
from smallthinker_lab.model.config import SmallThinkerConfig, hybrid_layouts

pytestmark = pytest.mark.gpu

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu") / "model"
    save_pretrained(random_model(), folder)
    convert(folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_model(ckpt, device="cuda").generate(PROMPT, NEW, stop_tokens=[])


def _minimum(ckpt, **kw):
    with Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", progress=False, **kw) as e:
        return e.plan.minimum_bytes, e.bundle.stride


@pytest.mark.parametrize("host_cache", [False, True])
@pytest.mark.parametrize("extra", [0, 3, None])
@pytest.mark.parametrize("prefetch,lookahead", [(True, False), (False, False), (True, True)])
def test_cuda_tokens_match_the_model(ckpt, reference, host_cache, extra, prefetch, lookahead):
    minimum, stride = _minimum(ckpt, host_cache=host_cache)
    limit = None if extra is None else minimum + extra * stride
    with Engine.from_pretrained(ckpt, memory_limit=limit, device="cuda", host_cache=host_cache, prefetch=prefetch,
                                lookahead=lookahead, progress=False) as e:
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == reference
        st = e.stats()
        assert st["hits"] + st["misses"] == st["requests"]
        if not lookahead:
            assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == st["hits"]
            assert st["bytes_read"] == st["misses"] * st["expert_nbytes"]


def test_cuda_interrupt_and_reuse(ckpt, reference):
    with Engine.from_pretrained(ckpt, memory_limit=_minimum(ckpt)[0], device="cuda", progress=False) as e:
        it = e.stream(PROMPT, NEW, stop_tokens=[])
        next(it)
        it.close()
        assert e.cache.pinned() == []
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == reference


def _big_checkpoint(folder):
    """bf16, 6 layers x 16 experts of 1.5 MiB (144 MiB of experts); experts share one random matrix set."""
    rope, swa = hybrid_layouts(6)
    cfg = SmallThinkerConfig.from_name("smallthinker-test", hidden_size=512, moe_ffn_hidden_size=512,
                                       moe_num_primary_experts=16, num_hidden_layers=6, rope_layout=rope,
                                       sliding_window_layout=swa, torch_dtype="bfloat16")
    folder.mkdir(parents=True)
    cfg.save(folder)
    gen = torch.Generator().manual_seed(0)
    shared, tensors = {}, {}
    for name, shape in expected_tensors(cfg).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif ".experts." in name:
            kind = name.rsplit(".", 2)[-2]
            shared.setdefault(kind, (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16))
            tensors[name] = shared[kind].clone()
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.2).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    convert(folder, progress=False)
    return folder


@pytest.mark.parametrize("host_cache", [False, True])
def test_cuda_peak_memory_within_the_limit(tmp_path, host_cache):
    folder = _big_checkpoint(tmp_path / "big")
    minimum, stride = _minimum(folder, host_cache=host_cache)
    limit = minimum + 30 * stride  # 32 of 96 experts
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with Engine.from_pretrained(folder, memory_limit=limit, device="cuda", host_cache=host_cache,
                                progress=False) as e:
        e.generate(list(range(3, 40)), 16, stop_tokens=[])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        st = e.stats()
    assert st["misses"] > st["capacity_experts"]  # the cache filled and evicted
    assert peak <= limit, (peak, limit)


# ------------------------------------------------------------------ CUDA-graph decode (engine/decode/)
def _graph_run(folder, prompt, new, **kw):
    kw.setdefault("cuda_graph", True)
    with Engine.from_pretrained(folder, memory_limit=None, device="cuda", progress=False, **kw) as e:
        tokens = e.generate(prompt, new, stop_tokens=[]).tokens
        out = {"tokens": tokens, "stats": e.stats(), "replays": e.decoder.replays, "trace": list(e.trace),
               "capacity": e.cache.capacity_experts, "L": e.config.num_hidden_layers, "E": e.config.num_experts,
               "K": e.config.top_k}
        # a hook makes the step eager (instruments see every expert), and the counters go on
        seen = []
        handle = e.hooks.add("router", lambda **p: seen.append(p["layer"]))
        out["hooked"] = e.generate(prompt, new, stop_tokens=[]).tokens
        handle.remove()
        out["hooked_replays"], out["seen"] = e.decoder.replays, seen
        out["again"] = e.generate(prompt, new, stop_tokens=[]).tokens  # graphs reused
        out["replays_after"] = e.decoder.replays
    return out


@pytest.mark.parametrize("mode", [True, "fused"])
def test_cuda_graph_decode_matches_the_model(ckpt, reference, mode):
    r = _graph_run(ckpt, PROMPT, NEW, exact=True, cuda_graph=mode)
    st, trace, L, E, K = r["stats"], r["trace"], r["L"], r["E"], r["K"]
    assert r["replays"] == NEW - 1  # every decode step was a graph replay
    assert r["tokens"] == reference  # exact: the model's kernels; fused: fp32 model, rounding far below the margins
    assert r["hooked"] == reference and r["hooked_replays"] == r["replays"] and r["seen"]  # hooked: eager path
    assert r["again"] == reference and r["replays_after"] == 2 * (NEW - 1)
    assert st["decode_tokens"] == NEW - 1 and st["decode_seconds"] > 0
    assert st["hits"] + st["misses"] == st["requests"] == len(trace)
    assert simulate(trace, r["capacity"], "lru").hits == st["hits"]
    prefill = {(layer, x) for step, layer, x in trace if step == 1}
    assert st["misses"] == L * E  # the first graph step read the experts the prefill had not: each once
    decode = [t for t in trace if t[0] > 1]
    assert len(decode) == (NEW - 1) * L * K + (L * E - len(prefill))  # every layer's K experts per step


def test_cuda_graph_fused_length_buckets(ckpt):
    """The fused graph attends over a power-of-two bucket of KV slots: a decode that crosses 64 positions uses two
    graphs and keeps the model's tokens (fp32 model)."""
    prompt = list(range(3, 63))
    ref = load_model(ckpt, device="cuda").generate(prompt, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", cuda_graph="fused", progress=False) as e:
        assert e.generate(prompt, NEW, stop_tokens=[]).tokens == ref
        assert sorted(e.decoder._graphs) == [64, 128] and e.decoder.replays == NEW - 1


def test_cuda_graph_decode_bf16_bit_identical(tmp_path):
    """bf16, where rounding differences show: exact=True graphs give the model's tokens, on hybrid layouts (NoPE and
    global, RoPE and a sliding window of 8 that the decode passes)."""
    folder = _big_checkpoint(tmp_path / "big")
    prompt, new = list(range(3, 40)), 24
    ref = load_model(folder, device="cuda").generate(prompt, new, stop_tokens=[])
    r = _graph_run(folder, prompt, new, exact=True, max_context=64)
    assert r["replays"] == new - 1
    assert r["tokens"] == ref and r["again"] == ref
