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
