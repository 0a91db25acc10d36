"""engine/decode/graph.py on a CPU: the graph decode's logic (pieces, static buffers, slot table, KV bookkeeping,
counters) with each "graph" run eagerly at replay. The CUDA graphs themselves: tests/test_engine_gpu.py."""

import pytest
import torch
from conftest import random_model

from smallthinker_lab.engine import Engine, convert, simulate
from smallthinker_lab.engine.decode import GraphDecoder
from smallthinker_lab.model.checkpoint import load_model, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]  # longer than the test model's window of 8
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph") / "model"
    m = random_model().to(torch.bfloat16)  # bf16: rounding differences would show
    m.config.torch_dtype = "bfloat16"
    save_pretrained(m, folder)
    convert(folder, progress=False)
    return folder


def _decoder(e, fused):
    g = GraphDecoder(e.state, fused=fused, compile=False)
    g.usable = lambda: True  # on a CPU (usable() needs CUDA)
    e.decoder = g
    return g


@pytest.mark.parametrize("prompt", [PROMPT, list(range(3, 63))])  # the second crosses 64 positions (fused buckets)
@pytest.mark.parametrize("fused", [False, True])
def test_graph_decode_logic_matches_the_model(ckpt, fused, prompt):
    ref = load_model(ckpt).generate(prompt, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True) as e:
        g = _decoder(e, fused)
        tokens = e.generate(prompt, NEW, stop_tokens=[]).tokens
        st, L, E, K = e.stats(), e.config.num_hidden_layers, e.config.num_experts, e.config.top_k
        assert g.replays == NEW - 1
        if not fused:  # the model's kernels: the model's bits
            assert tokens == ref
        assert st["hits"] + st["misses"] == st["requests"] == len(e.trace)
        assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == st["hits"]
        assert st["misses"] == L * E and st["decode_tokens"] == NEW - 1
        prefill = {(layer, x) for step, layer, x in e.trace if step == 1}
        assert len([t for t in e.trace if t[0] > 1]) == (NEW - 1) * L * K + L * E - len(prefill)
        assert e.kv.seq_len == len(prompt) + NEW - 1  # the host-side KV lengths advanced once per step
        again = e.generate(prompt, NEW, stop_tokens=[]).tokens
        assert again == tokens and g.replays == 2 * (NEW - 1)
        if fused:
            assert sorted(g._graphs) == ([64] if len(prompt) + NEW <= 64 else [64, 128])


def test_graph_decode_rebuilt_after_clear(ckpt):
    ref = load_model(ckpt).generate(PROMPT, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True) as e:
        _decoder(e, False)
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == ref
        e.reset_stats(clear_cache=True)  # new slots: the slot table and graphs are built again
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == ref
        assert e.stats()["misses"] == e.config.num_hidden_layers * e.config.num_experts


def test_cuda_graph_needs_cuda(ckpt):
    with pytest.raises(ValueError, match="cannot run: CUDA graphs need a CUDA device"):
        Engine.from_pretrained(ckpt, memory_limit=None, progress=False, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        Engine.from_pretrained(ckpt, memory_limit=None, progress=False, cuda_graph="yes")
