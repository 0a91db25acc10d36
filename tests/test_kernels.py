"""The Triton decode kernels (smallthinker_lab.kernels) against the eager model, and the engine's kernel decode
against the in-memory model's. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are first imported); tests/test_engine_gpu.py runs them compiled on CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import random_model  # noqa: E402

from smallthinker_lab.engine import Engine, convert, simulate  # noqa: E402
from smallthinker_lab.engine.decode import KernelDecoder  # noqa: E402
from smallthinker_lab.kernels import (  # noqa: E402
    DecodeKernels,
    ExpertTable,
    KernelRunner,
    pack_experts,
    unavailable_reason,
)
from smallthinker_lab.model import SmallThinkerConfig, SmallThinkerForCausalLM  # noqa: E402
from smallthinker_lab.model.checkpoint import load_model, save_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]  # longer than the test model's window of 8
NEW = 6


def _model(preset: str, seed: int = 1):
    cfg = SmallThinkerConfig.from_name(preset)
    return SmallThinkerForCausalLM(cfg).init_weights(seed=seed).to(torch.bfloat16).to(DEV).eval()


@pytest.mark.parametrize("preset", ["smallthinker-test", "smallthinker-test-tied"])  # sigmoid / softmax routing
def test_kernel_decode_matches_the_eager_model_up_to_rounding(preset):
    m = _model(preset)
    runner = KernelRunner(m, max_context=32, graph=False)
    cache = m.new_cache()
    ids = torch.tensor([PROMPT], device=DEV)
    with torch.inference_mode():
        assert torch.equal(runner.step(ids), m(ids, cache=cache).logits[:, -1:])  # prefill is the model's own
        for t in [5, 77, 2, 120, 64, 9, 31]:  # positions 10..16: the sliding ring wraps
            tok = torch.tensor([[t]], device=DEV)
            ref, got = m(tok, cache=cache).logits, runner.step(tok)
            diff = (ref.float() - got.float()).abs().max().item()
            assert diff < 0.1 * ref.float().std().item()  # bf16 rounding, not a wrong computation
            assert int(ref.argmax()) == int(got.argmax())
            layer0 = m.model.layers[0].block_sparse_moe
            assert runner.kernels.ids[0].tolist() == sorted(runner.kernels.ids[0].tolist())
    assert runner.kv.seq_len == len(PROMPT) + 7
    # the packed experts are the model's parameters: the eager model reads the same tensors
    base = pack_experts(m).bases[0]
    assert layer0.experts[0].gate.weight.data_ptr() == base.data_ptr()


def test_tiles_do_not_change_the_logits():
    """Rows per program of the product kernels (the interpreter's large tiles, the GPU's tuned small ones) do not
    change a bit of the logits: each row's dot product is computed alone."""
    from smallthinker_lab.kernels import DEFAULT_BLOCKS

    m = _model("smallthinker-test")
    small = {k: DEFAULT_BLOCKS[k] for k in ("pre", "oproj", "gate_up", "down")}
    out = []
    for blocks in (None, small):  # None: the defaults here (under the interpreter, 64 rows per program)
        runner = KernelRunner(m, max_context=32, graph=False, blocks=blocks)
        with torch.inference_mode():
            runner.step(torch.tensor([PROMPT], device=DEV))
            out.append([runner.step(torch.tensor([[t]], device=DEV)) for t in (5, 77)])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_kernel_generate_greedy_equals_the_model():
    m = _model("smallthinker-test-tied", seed=3)
    assert KernelRunner(m).generate(PROMPT, NEW, stop_tokens=[]) == m.generate(PROMPT, NEW, stop_tokens=[])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernels") / "model"
    m = random_model().to(torch.bfloat16)
    m.config.torch_dtype = "bfloat16"
    save_pretrained(m, folder)
    convert(folder, progress=False, down_transposed=False)
    return folder


def test_engine_kernel_decode_equals_the_kernel_model_bit_for_bit(ckpt):
    model = load_model(ckpt, device=DEV)
    runner = KernelRunner(model, max_context=64, graph=DEV == "cuda")
    with torch.inference_mode():
        runner.step(torch.tensor([PROMPT], device=DEV))
        ref_logits = [runner.step(torch.tensor([[t]], device=DEV)) for t in (7, 8, 9)]
    ref = runner.generate(PROMPT, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as e:
        g = KernelDecoder(e.state)
        g.usable = lambda: True  # on a CPU (usable() needs CUDA)
        e.decoder = g
        e.forward(torch.tensor([PROMPT]))
        for t, r in zip((7, 8, 9), ref_logits):
            assert torch.equal(e.forward(torch.tensor([[t]])), r)  # the same kernels on the same bytes
        e.reset_stats(clear_cache=True)  # a replay through simulate() starts from the same empty cache
        tokens = e.generate(PROMPT, NEW, stop_tokens=[]).tokens
        st, L, K = e.stats(), e.config.num_hidden_layers, e.config.top_k
        assert tokens == ref
        assert g.replays == 3 + NEW - 1
        steps = [t for t in e.trace if t[0] > 1]
        prefill = {(layer, x) for step, layer, x in e.trace if step == 1}
        # every decode expert request counted (as a hit), and the graph build's reads of the experts not yet cached
        assert len(steps) == (NEW - 1) * L * K + L * e.config.num_experts - len(prefill)
        assert st["hits"] + st["misses"] == st["requests"] and st["misses"] == L * e.config.num_experts
        assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == st["hits"]


@pytest.mark.parametrize("extra,lookahead,policy", [(0, False, "lru"), (5, False, "lru"), (5, True, "lru"),
                                                    (5, False, "lfu")])  # the minimum, a few slots more
def test_offloaded_kernel_decode_equals_the_kernel_model(ckpt, extra, lookahead, policy):
    model = load_model(ckpt, device=DEV)
    ref = KernelRunner(model, max_context=64, graph=DEV == "cuda").generate(PROMPT, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as probe:
        limit = probe.plan.minimum_bytes + extra * probe.bundle.stride
    with Engine.from_pretrained(ckpt, memory_limit=limit, progress=False, exact=True, device=DEV, policy=policy,
                                max_context=64, lookahead=lookahead, host_cache=DEV == "cuda") as e:
        L, E = e.config.num_hidden_layers, e.config.num_experts
        assert e.cache.capacity_experts < L * E
        g = KernelDecoder(e.state)
        g.usable = lambda: True  # on a CPU (usable() needs CUDA)
        e.decoder = g
        # LRU without look-ahead: the cache resolved on the device; otherwise the host resolves each layer
        assert g.device_lru() == (policy == "lru" and not lookahead)
        e.reset_stats(clear_cache=True)
        tokens = e.generate(PROMPT, NEW, stop_tokens=[]).tokens
        st = e.stats()
        assert tokens == ref  # the same kernels, the experts read from whichever slots the cache gave them
        assert g.replays == NEW - 1 and st["misses"] > 0
        assert st["hits"] + st["misses"] == st["requests"] == len(e.trace)
        if lookahead:  # predictions counted per layer; speculative reads
            counted = e.state.counters
            assert st["speculative_reads"] > 0
            assert 0 < sum(counted.lookahead_correct) <= sum(counted.lookahead_predicted)
        else:  # the cache's own counts (with a device LRU: the device's decisions, checked at every request)
            assert simulate(e.trace, e.cache.capacity_experts, policy).hits == st["hits"]
        assert all(entry.pins == 0 for entry in e.cache.entries.values())
        if g.device_lru() and extra:
            # a second generation: the prefill changed the host's cache, which the device takes up again
            runner = KernelRunner(model, max_context=64, graph=DEV == "cuda")
            tokens = e.generate(PROMPT[:4], NEW, stop_tokens=[]).tokens
            assert tokens == runner.generate(PROMPT[:4], NEW, stop_tokens=[])
            assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == e.stats()["hits"]
            # the kernels wrote each missed expert into its slot: every slot holds its expert's record
            host, b = g._host_records(), e.bundle
            for (layer, x), entry in e.cache.entries.items():
                slot = e.arena.tensor(entry.slot)[:b.stride].cpu()
                assert torch.equal(slot, host[b.offset(layer, x):b.offset(layer, x) + b.stride].cpu()), (layer, x)


@pytest.mark.parametrize("extra", [None, 5])  # every expert resident; offloaded, the cache resolved on the device
def test_greedy_kernel_decode_one_step_ahead_stops_and_gives_positions_back(ckpt, extra):
    model = load_model(ckpt, device=DEV)
    ref = KernelRunner(model, max_context=64, graph=DEV == "cuda").generate(PROMPT, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as probe:
        limit = None if extra is None else probe.plan.minimum_bytes + extra * probe.bundle.stride
    with Engine.from_pretrained(ckpt, memory_limit=limit, progress=False, exact=True, device=DEV, max_context=64,
                                host_cache=DEV == "cuda") as e:
        g = KernelDecoder(e.state)
        g.usable = lambda: True
        e.decoder = g
        assert g.pipelines()
        e.reset_stats(clear_cache=True)
        k = ref.index(ref[3])
        out = e.generate(PROMPT, NEW, stop_tokens=[ref[3]]).tokens
        assert out == ref[:k + 1]
        # the step launched past the stop token ran and was counted; its position was given back
        assert g.replays == len(out) and e.kv.seq_len == len(PROMPT) + len(out) - 1
        st = e.stats()
        assert st["decode_tokens"] == len(out) - 1
        assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == st["hits"]
        it = e.stream(PROMPT, NEW, stop_tokens=[])  # a consumer that stops early
        assert [next(it) for _ in range(3)] == ref[:3]
        it.close()
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == ref
        assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == e.stats()["hits"]
        assert all(entry.pins == 0 for entry in e.cache.entries.values())


def test_device_lru_that_disagrees_with_the_engine_cache_is_an_error(ckpt):
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as probe:
        c = probe.config
        limit = probe.plan.minimum_bytes + (c.num_hidden_layers * c.num_experts - c.top_k - 1) * probe.bundle.stride
    with Engine.from_pretrained(ckpt, memory_limit=limit, progress=False, exact=True, device=DEV, max_context=64,
                                host_cache=DEV == "cuda") as e:  # all experts but one: most requests hit
        g = KernelDecoder(e.state)
        g.usable = lambda: True
        e.decoder = g
        it = e.stream(PROMPT, NEW, stop_tokens=[])
        next(it), next(it)  # the prefill's token, one decode step
        with torch.inference_mode():
            g._lru["lru"].owner.fill_(-1)  # the device forgets what its slots hold: its next step misses
        with pytest.raises(RuntimeError, match="expert cache and the engine's disagree at step"):
            list(it)
        # the engine stays usable: its cache was emptied, and the next generation reads what it needs again
        assert len(e.cache.entries) == 0
        model = load_model(ckpt, device=DEV)
        runner = KernelRunner(model, max_context=64, graph=DEV == "cuda")
        assert e.generate(PROMPT, 3, stop_tokens=[]).tokens == runner.generate(PROMPT, 3, stop_tokens=[])


def test_kernels_refuse_what_they_cannot_compute(monkeypatch):
    m = _model("smallthinker-test")
    with pytest.raises(ValueError, match="bf16"):
        KernelRunner(_model("smallthinker-test").float())
    runner = KernelRunner(m, max_context=16, graph=False)
    with pytest.raises(ValueError, match="max_context=16"):
        runner.step(torch.zeros(1, 17, dtype=torch.long, device=DEV))
    table = pack_experts(m)
    bad = ExpertTable(table.bases, table.offsets + 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        DecodeKernels(m, m.new_cache(), bad)
    short = ExpertTable([b[:100] for b in table.bases], table.offsets)
    with pytest.raises(ValueError, match="fewer than its offsets address"):
        DecodeKernels(m, m.new_cache(), short)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in unavailable_reason("cpu")
    with pytest.raises(ValueError, match="backend 'kernels' cannot run: the decode kernels run on a CUDA device"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, cuda_graph="kernels")
    with pytest.raises(ValueError, match="backend 'kernels' cannot run: the decode kernels run on a CUDA device"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, backend="kernels")


@pytest.mark.parametrize("extra,lookahead", [(None, False), (5, True)])  # resident; offloaded, resolved by the host
def test_kernel_decode_carries_out_a_routing_replay(ckpt, extra, lookahead):
    """Under ``replay`` the kernel decode routes each step to the trace's experts itself (no eager fallback): the
    engine's own requests of every decode step are the trace's, the logits agree with the eager engine replaying
    the same trace up to bf16 rounding, and a second hook sends steps back to the eager path."""
    from smallthinker_lab.instruments import record
    from smallthinker_lab.interventions import RoutingTrace, replay

    feed = [5, 77, 2]  # teacher-forced decode tokens
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as probe:
        limit = None if extra is None else probe.plan.minimum_bytes + extra * probe.bundle.stride
        cfg = probe.config
    trace = RoutingTrace.uniform(len(PROMPT) + len(feed), cfg, seed=7)
    K = cfg.top_k

    def run(kernels: bool):
        with Engine.from_pretrained(ckpt, memory_limit=limit, progress=False, exact=True, device=DEV, max_context=64,
                                    lookahead=lookahead, host_cache=DEV == "cuda") as e:
            g = KernelDecoder(e.state)
            if kernels:
                e.decoder = g
                g.usable = g.hooks_allowed  # on a CPU (usable() also needs CUDA): the hook rule alone
            e.reset_stats(clear_cache=True)
            if limit is None:  # every expert resident first: the kernel graph's build reads none (not requests)
                e.cache.preload((layer, x) for layer in range(cfg.num_hidden_layers) for x in range(cfg.num_experts))
            out = []
            with torch.inference_mode(), replay(e, trace):
                assert g.hooks_allowed() and e.hooks.routing is not None
                out.append(e.forward(torch.tensor([PROMPT])))
                for t in feed:
                    out.append(e.forward(torch.tensor([[t]])))
                if kernels:
                    with record(e, kinds=("experts",)):
                        assert not g.hooks_allowed()  # a recording's hooks: the eager path
            assert e.hooks.routing is None
            decode = [(step, layer, x) for step, layer, x in e.trace if step > 1]
            return out, decode, g.replays

    eager, eager_trace, _ = run(False)
    kern, kern_trace, replays = run(True)
    assert replays == len(feed)  # every decode step ran on the kernels
    for step in range(2, 2 + len(feed)):
        pos = len(PROMPT) + step - 2
        for layer in range(cfg.num_hidden_layers):
            want = sorted(trace.ids[pos, layer, :K].tolist())
            got = sorted(x for s, ly, x in kern_trace if s == step and ly == layer)
            assert got == want, (step, layer)
    assert sorted(kern_trace) == sorted(eager_trace)  # the same requests as the eager path's replay
    assert torch.equal(kern[0], eager[0])  # the prefill is the eager path's in both
    for ref, got in zip(eager[1:], kern[1:]):
        diff = (ref.float() - got.float()).abs().max().item()
        assert diff < 0.1 * ref.float().std().item()  # bf16 rounding, not another routing


def test_kernel_decode_ahead_under_a_replay_gives_back_what_it_overshot(ckpt):
    """Greedy generation one step ahead on the kernels (offloaded, the cache resolved on the device) under a
    replay: tokens equal the eager path's replay, the hits are the LRU's on the replayed requests; a step launched
    past a stop token gives its position back to the replay as to the KV cache."""
    from smallthinker_lab.interventions import RoutingTrace, replay

    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True, device=DEV,
                                max_context=64) as probe:
        limit = probe.plan.minimum_bytes + 5 * probe.bundle.stride

    def gen(kernels: bool, stop=()):
        with Engine.from_pretrained(ckpt, memory_limit=limit, progress=False, exact=True, device=DEV,
                                    max_context=64, host_cache=DEV == "cuda") as e:
            trace = RoutingTrace.uniform(len(PROMPT) + NEW, e.config, seed=11)
            g = KernelDecoder(e.state)
            if kernels:
                e.decoder = g
                g.usable = g.hooks_allowed
            with replay(e, trace) as r:
                if kernels:
                    assert g.pipelines() and g.device_lru()
                tokens = e.generate(PROMPT, NEW, stop_tokens=list(stop)).tokens
                assert r.position == e.kv.seq_len  # replay and KV cache agree on the positions kept
            assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == e.stats()["hits"]
            return tokens, g.replays

    ref, _ = gen(False)
    got, replays = gen(True)
    assert replays == NEW - 1
    assert got == ref
    short, _ = gen(True, stop=[ref[2]])
    assert short == ref[:ref.index(ref[2]) + 1]
