"""The engine's state (engine/state.py): the one home of the parts and counters that the decoders work on, its
methods, and the accessors the decoders read slots and kernels through."""

import dataclasses
import gc
import types

import pytest
import torch
from conftest import random_model

from smallthinker_lab.engine import Engine, EngineState, convert
from smallthinker_lab.engine.cache import SlotArena
from smallthinker_lab.engine.decode import EagerDecoder, GraphDecoder, make_decoder
from smallthinker_lab.model.checkpoint import load_model, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
NEW = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state") / "model"
    m = random_model().to(torch.bfloat16)
    m.config.torch_dtype = "bfloat16"
    save_pretrained(m, folder)
    convert(folder, progress=False)
    return folder


def test_the_engine_keeps_its_parts_on_its_state(ckpt):
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False) as e:
        state = e.state
        assert isinstance(state, EngineState)
        for name in ("config", "model", "device", "dtype", "hooks", "bundle", "plan", "arena", "cache", "reader",
                     "kv", "exact", "prefetch", "lookahead"):
            assert getattr(e, name) is getattr(state, name), name
        assert state.layers == list(e.model.model.layers) and state.transfer is None  # CPU: no copies
        e.generate(PROMPT, NEW, stop_tokens=[])
        steps, _ = e.clocks()
        assert steps == state.step == NEW  # a prefill and NEW - 1 decode steps
        assert e.stats()["decode_tokens"] == state.counters.phases["decode_tokens"] == NEW - 1
        old = (state.cache, state.kv, state.arena)
        e.close()
        e.reopen()
        assert all(a is not b for a, b in zip(old, (state.cache, state.kv, state.arena)))
        assert all(a is b for a, b in zip((e.cache, e.kv, e.arena), (state.cache, state.kv, state.arena)))
        e.reset_stats()
        assert state.step == 0 and state.counters.phases["decode_tokens"] == 0


def test_a_decoder_over_the_state_follows_a_reopen(ckpt):
    ref = load_model(ckpt).generate(PROMPT, NEW, stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False, exact=True) as e:
        g = GraphDecoder(e.state, compile=False)
        assert g.state is e.state and not g.fused  # exact: the model's kernels
        g.usable = lambda: True  # on a CPU (usable() needs CUDA)
        e.decoder = g
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == ref
        e.close()
        e.reopen()  # a new cache, KV cache and slots: the decoder rebuilds its graphs over them
        assert e.generate(PROMPT, NEW, stop_tokens=[]).tokens == ref and g.replays == 2 * (NEW - 1)
    assert isinstance(make_decoder(e.state, "eager"), EagerDecoder)
    with pytest.raises(ValueError, match="unknown backend 'warp'"):
        make_decoder(e.state, "warp")


def _reaches(root, target, boundary) -> bool:
    """Whether ``target`` is reachable from ``root`` through gc referents, not walking past ``boundary`` (nor into
    classes and modules, which reach everything)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if obj is target:
            return True
        if obj is boundary or isinstance(obj, (type, types.ModuleType)):
            continue
        todo.extend(gc.get_referents(obj))
    return False


def test_the_eager_decoder_holds_the_state_not_the_engine(ckpt):
    """The eager backend is a decoder like the others: nothing it holds leads back to the Engine except through the
    state, and no field of the state is the Engine or one of its bound methods."""
    with Engine.from_pretrained(ckpt, memory_limit="50%", progress=False) as e:
        assert e.backend == "eager" and e.decoder is None and isinstance(e.eager, EagerDecoder)
        e.generate(PROMPT, NEW, stop_tokens=[])  # views of slots made, hooks observed
        assert e.eager.state is e.state and e.eager.experts.state is e.state
        assert not _reaches(e.eager, e, boundary=e.state)
        for f in dataclasses.fields(e.state):
            value = getattr(e.state, f.name)
            assert value is not e and getattr(value, "__self__", None) is not e, f.name
        probe = make_decoder(e.state, "eager")
        probe.owner = e  # the walk finds a reference when there is one
        assert _reaches(probe, e, boundary=e.state)


def test_make_decoder_eager_generates_the_engines_tokens(ckpt):
    """A decoder built by make_decoder over an engine's state, driven alone (prefill, then one decode step per
    token), gives the engine's greedy tokens, with experts streamed through a cache of half of them."""
    with Engine.from_pretrained(ckpt, memory_limit="50%", progress=False) as e:
        assert e.plan.capacity_experts < e.config.num_hidden_layers * e.config.num_experts
        want = e.generate(PROMPT, NEW, stop_tokens=[]).tokens
        e.reset_stats(clear_cache=True)
        e.kv.reset()
        dec = make_decoder(e.state, "eager")
        assert dec.usable()
        with torch.inference_mode():
            logits = dec.forward(torch.tensor([PROMPT]), 0)
            tokens = [int(logits[0, -1].argmax())]
            while len(tokens) < NEW:
                logits = dec.decode(torch.tensor([[tokens[-1]]]), e.kv.seq_len)
                assert logits.shape == (1, 1, e.config.vocab_size)
                tokens.append(int(logits[0, -1].argmax()))
        e.state.check_unverified()
        assert tokens == want and e.state.step == NEW and e.cache.stats.misses > 0


def test_state_counts_and_refuses_an_unknown_phase(ckpt):
    with Engine.from_pretrained(ckpt, memory_limit=None, progress=False) as e:
        state = e.state
        before = dict(state.counters.phases)
        state.count("decode", 2, 0.5, 1024)
        assert state.counters.phases["decode_tokens"] == before["decode_tokens"] + 2
        assert state.counters.phases["decode_bytes"] == before["decode_bytes"] + 1024
        assert state.counters.peak_accounted >= state.resident_bytes() == e.resident_bytes()
        with pytest.raises(ValueError, match="phase must be one of"):
            state.count("train", 1, 0.0, 0)
        state.record_lookahead(1, [2, 5, 7], [5, 7, 9])
        assert state.counters.lookahead_predicted[1] == 3 and state.counters.lookahead_correct[1] == 2
        assert e.stats()["lookahead_accuracy"] == pytest.approx(2 / 3)
        n = state.step
        assert state.next_step() == n + 1 == state.cache.step
        assert state.holds_all_experts()


def test_arena_flat_view_is_every_slot_in_order():
    arena = SlotArena(3, 4096)
    for slot in range(3):
        arena.tensor(slot).fill_(slot + 1)
    flat = arena.flat_view()
    assert flat.numel() == 3 * 4096 and [int(flat[i * 4096]) for i in range(3)] == [1, 2, 3]
    words = arena.flat_view(torch.int64)
    assert words.numel() == 3 * 4096 // 8 and words.data_ptr() == flat.data_ptr()  # a view, no copy
    flat[0] = 9
    assert int(arena.tensor(0)[0]) == 9
    arena.close()
    with pytest.raises(RuntimeError, match="closed"):
        arena.flat_view()
