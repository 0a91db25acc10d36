"""The engine's backend choice and options: auto picks the fastest backend that can run and says why the others
do not; a backend that cannot run is a clear error, never a silent fallback; options are one validated dataclass
whose fields are the keywords of from_pretrained."""

import dataclasses
import inspect

import pytest
import torch

import smallthinker_lab as sl
from smallthinker_lab.engine import BACKENDS, BackendUnavailable, Engine, EngineOptions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("default", memory_limit=None, progress=False) as e:
        yield e


def test_auto_on_the_cpu_is_eager_and_explains_the_others(engine):
    assert engine.backend == "eager" and engine.requested_backend == "auto"
    table = engine.explain()
    assert list(table["backend"]) == list(BACKENDS)
    row = table.set_index("backend")
    assert row.loc["eager", "chosen"] and row.loc["eager", "can_run"] and row.loc["eager", "reason"] is None
    for name in ("kernels", "graph", "fused"):
        assert not row.loc[name, "can_run"] and "CUDA" in row.loc[name, "reason"]
    assert "backend=eager" in repr(engine)


@pytest.mark.parametrize("backend", ["kernels", "graph", "fused"])
def test_a_backend_that_cannot_run_is_an_error_naming_why(backend):
    with pytest.raises(BackendUnavailable, match=f"backend '{backend}' cannot run: .*CUDA"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, backend=backend)


def test_unknown_backend_and_options_are_errors():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of kernels, fused, graph, eager"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, backend="fast")
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) prefill_chunks; EngineOptions has: .*prefill"):
        Engine.from_pretrained("default", memory_limit=None, prefill_chunks=8)
    with pytest.raises(TypeError, match="options must be an EngineOptions"):
        Engine.from_pretrained("default", memory_limit=None, options={"prefill_chunk": 8})


@pytest.mark.parametrize("bad, message", [
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer"),
    (dict(io_threads=0), "io_threads must be a positive integer"),
    (dict(compute_threads=True), "compute_threads must be a positive integer"),
    (dict(lookahead="soon"), "lookahead must be False, True or 'early'"),
    (dict(sparse_reglu="yes"), "sparse_reglu must be 'auto', True or False"),
    (dict(exact=True, sparse_reglu=True), "exact=True .* excludes sparse_reglu=True"),
    (dict(fill_value=float("nan")), "fill_value must be a number"),
])
def test_options_are_validated_together(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**bad)


def test_options_and_keywords_combine(engine):
    opts = EngineOptions(prefill_chunk=16, io_threads=2)
    with Engine.from_pretrained("default", memory_limit=None, options=opts, prefill_chunk=8, progress=False) as e:
        assert e.prefill_chunk == 8 and e.io_threads == 2  # the keyword overrides the options object
        assert e.options.prefill_chunk == 8 and opts.prefill_chunk == 16  # options are not mutated
        prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
        assert e.generate(prompt, 6, stop_tokens=[]).tokens == engine.generate(prompt, 6, stop_tokens=[]).tokens


def test_every_option_is_visible_to_introspection():
    params = inspect.signature(Engine.from_pretrained).parameters
    named = [p for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 10
    assert {"memory_limit", "device", "policy", "prefetch", "quantization", "backend", "options"} <= set(params)
    doc = EngineOptions.__doc__
    for f in dataclasses.fields(EngineOptions):
        assert f"``{f.name}``" in doc and f.metadata["doc"] in doc
    assert len(Engine.from_pretrained.__doc__.strip().splitlines()) <= 14
    assert sl.EngineOptions is EngineOptions


def test_legacy_cuda_graph_keyword_maps_to_a_backend():
    with pytest.raises(BackendUnavailable, match="backend 'graph'|backend 'fused'"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph and backend='eager' disagree"):
        Engine.from_pretrained("default", memory_limit=None, progress=False, cuda_graph="kernels", backend="eager")
    with Engine.from_pretrained("default", memory_limit=None, progress=False, cuda_graph=False) as e:
        assert e.backend == "eager"


@pytest.mark.gpu
def test_auto_on_cuda_with_bf16_picks_the_kernels():
    from smallthinker_lab.kernels import unavailable_reason

    if unavailable_reason("cuda"):
        pytest.skip(unavailable_reason("cuda"))
    with Engine.from_pretrained("default", memory_limit=None, device="cuda", dtype=torch.bfloat16,
                                progress=False) as e:
        assert e.backend == "kernels"
        row = e.explain().set_index("backend")
        assert row.loc["kernels", "chosen"] and row.loc["kernels", "can_run"] and row.loc["kernels", "reason"] is None
    with Engine.from_pretrained("default", memory_limit=None, device="cuda", dtype=torch.float32,
                                progress=False) as e:
        assert e.backend == "eager"
        assert "bfloat16" in e.explain().set_index("backend").loc["kernels", "reason"]
