"""The benchmark suites' modes: which rows each suite (cpu, gpu, smoke) runs, in order, with its defaults
(prompt and new tokens, repeats, budget) and the synthetic shapes' presets and model keys. Used by
``benchmarks/run.py`` (which re-exports every name here).
"""

from __future__ import annotations

from . import bench_engine as be

SYNTHETIC_KEY = {"cpu": "4b-synthetic", "gpu": "4b-synthetic", "smoke": "test-synthetic"}
SHAPES = {"4b": "smallthinker-4b-a0.6b", "21b": "smallthinker-21b-a3b"}  # --shape: the synthetic preset


def synthetic_key(suite: str, shape: str = "4b") -> str:
    return SYNTHETIC_KEY[suite] if suite == "smoke" or shape == "4b" else f"{shape}-synthetic"

TRAINED_KEY = "tiny-trained"

DEFAULTS = {  # prompt tokens, new tokens (decode steps + 1), repeats, budget seconds
    "cpu": dict(prompt=16, tokens=9, repeats=3, budget=1380, trained_prompt=32, trained_tokens=33),
    "gpu": dict(prompt=32, tokens=33, repeats=3, budget=420, trained_prompt=32, trained_tokens=65),
    "smoke": dict(prompt=8, tokens=5, repeats=2, budget=600, trained_prompt=8, trained_tokens=5),
}


def _spec(mode, model, variant, share=None, policy=None, prefetch=None, **kw) -> be.ModeSpec:
    return be.ModeSpec(mode=mode, model=model, variant=variant, share=share, policy=policy, prefetch=prefetch, **kw)


def suite_modes(suite: str, gpu: bool, with_trained: bool, q4: bool = True, routing: tuple = (),
                key: str | None = None) -> list[be.ModeSpec]:
    """Modes in the order they run: the required ones first (always run), then the optional ones while the
    budget lasts. ``routing``: domains whose trained routing is replayed on the synthetic shape (rows after the
    trained model's; benchmarks/trained_routing.py)."""
    S, T = key or SYNTHETIC_KEY[suite], TRAINED_KEY
    naive = "accelerate_cpu_offload" if gpu else "accelerate_disk_offload"
    eager = {"backend": "eager"} if gpu else {}  # on a GPU backend="auto" is the kernels: these rows name eager
    req = [
        _spec("in_memory", S, "in memory", required=True),
        _spec("engine", S, "in memory", required=True, options=dict(eager)),
        _spec("engine", S, "full", 0.6, "lru", True, required=True, options=dict(eager)),
        _spec("engine", S, "no prefetch", 0.6, "lru", False, required=True, options=dict(eager)),
        _spec(naive, S, "naive offload", 0.6, required=True),
    ]
    if gpu:
        # decode steps replayed as CUDA graphs (engine/decode/graph.py), the model's kernels: the same tokens
        req.append(_spec("engine", S, "in memory", required=True, options={"cuda_graph": True}))
        # the Triton decode kernels (smallthinker_lab.kernels): the model with them first (their tokens' reference)
        req.append(_spec("in_memory", S, "in memory", required=True, options={"kernels": True}))
        req.append(_spec("engine", S, "in memory", required=True, options={"cuda_graph": "kernels"}))
        req.append(_spec("engine", S, "full", 0.6, "lru", True, required=True, options={"cuda_graph": "kernels"}))
        req.append(_spec("engine", S, "full", 0.6, "lru", True, required=True,
                         options={"cuda_graph": "kernels", "lookahead": True}))
        # what a user gets without choosing anything: Engine.from_pretrained(path, memory_limit=None, device="cuda")
        # (after the kernels' in-memory reference, whose tokens it must give)
        req.append(_spec("engine", S, "default options", required=True, options={"backend": "auto"}))
    trained = []
    if with_trained:
        trained = [
            _spec("in_memory", T, "in memory", required=True),
            # on a GPU the engine rows below run the kernels (backend="auto"): their reference decodes with them
            *([_spec("in_memory", T, "in memory", required=True, options={"kernels": True})] if gpu else []),
            _spec("in_memory", T, "in memory", instruments=True, required=True),
            _spec("engine", T, "in memory", required=True),
            _spec("engine", T, "in memory", instruments=True, required=True),
            _spec("engine", T, "full", 0.6, "lru", True, required=True),
            _spec("engine", T, "full", 0.6, "lru", True, instruments=True),
            _spec("engine", T, "no prefetch", 0.6, "lru", False),
            _spec("engine", T, "full", 0.25, "lru", True),
            _spec("engine", T, "no cache", 0.0, "lru", True),
        ]
    for d in routing:  # the synthetic shape on trained routing: its reference, the engine in memory, offloaded
        trained += [_spec("in_memory", S, "in memory", required=True, routing=d),
                    _spec("engine", S, "in memory", required=True, options=dict(eager), routing=d)]
        trained += [_spec("engine", S, variant, share, policy, prefetch, options=dict(eager) | extra, routing=d)
                    for variant, share, policy, prefetch, extra in (
                        ("full", 0.6, "lru", True, {}), ("no prefetch", 0.6, "lru", False, {}),
                        ("full", 0.6, "lru", True, {"lookahead": True}), ("full", 0.25, "lru", True, {}),
                        ("full", 0.9, "lru", True, {}), ("full", 0.6, "lfu", True, {}))]
        if gpu:  # the Triton kernels route to the trace's experts themselves: their reference, resident, device LRU
            kern = {"backend": "kernels"}
            trained += [_spec("in_memory", S, "in memory", required=True, options={"kernels": True}, routing=d),
                        _spec("engine", S, "in memory", required=True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.6, "lru", True, required=True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.6, "lru", True, options=kern | {"lookahead": True}, routing=d),
                        _spec("engine", S, "full", 0.25, "lru", True, options=dict(kern), routing=d),
                        _spec("engine", S, "full", 0.9, "lru", True, options=dict(kern), routing=d)]
    # (cuda_graph="fused", one graph of inductor kernels, is faster but not bit-identical: on the synthetic 4B its
    # greedy tokens differ from the first decode step, so it is not a row here; benchmarks/gpu_decode_graph.py times it)
    opt = [
        # the full system with the engine's other switches: look-ahead routing (a layer more of lead), checksums off
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": True}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": "early"}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"verify_checksums": False}),
        _spec("engine", S, "full", 0.6, "lru", True, options={"lookahead": True, "verify_checksums": False}),
    ]
    if not gpu:  # two compute threads: faster on a quiet 2-core machine, stalls when reads compete (engine notes)
        opt += [
            _spec("in_memory", S, "in memory", threads=2),
            _spec("engine", S, "in memory", threads=2),
            _spec("engine", S, "full", 0.6, "lru", True, threads=2),
            _spec("engine", S, "full", 0.6, "lru", True, threads=2,
                  options={"lookahead": True, "verify_checksums": False}),
        ]
    opt += [
        _spec("engine", S, "no cache", 0.0, "lru", True),
        _spec("engine", S, "full", 0.25, "lru", True),
        _spec("engine", S, "full", 0.9, "lru", True),
        _spec("engine", S, "full", 0.6, "lfu", True),
    ]
    if gpu:  # the engine reading storage through pinned staging buffers instead of a pinned host copy
        opt.append(_spec("engine", S, "full", 0.6, "lru", True,
                         options={"host_cache": False, "bypass_page_cache": True}))
    else:
        opt.append(_spec("accelerate_device_map", S, "naive offload", 0.6))
    opt += [
        _spec("engine", S, "no prefetch", 0.25, "lru", False),
        _spec("engine", S, "no prefetch", 0.9, "lru", False),
        _spec("engine", S, "no prefetch", 0.6, "lfu", False),
    ]
    if q4:  # on a GPU the Q4_0 experts run inside the Triton decode kernels (their reference: the model with them)
        ref, kern = ({"kernels": True}, {"cuda_graph": "kernels"}) if gpu else ({}, {})
        opt += [
            _spec("in_memory", S, "in memory", quantization="q4_0", options=ref),
            _spec("engine", S, "in memory", quantization="q4_0", options=kern),
            _spec("engine", S, "full", 0.6, "lru", True, quantization="q4_0", options=kern),
        ]
    return req + trained + opt
