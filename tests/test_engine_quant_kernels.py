"""The engine decoding int8 / q4_0 experts with the Triton decode kernels (a bundle in the kernels' layout, the slot
arena and host records in its bytes) against the in-memory model through the same kernels over the same bytes.
Without a GPU the kernels run in Triton's interpreter (the decoder is forced usable on the CPU, as in
tests/test_kernels.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import random_model  # noqa: E402

from smallthinker_lab.engine import Engine, convert, quant, simulate  # noqa: E402
from smallthinker_lab.engine.decode import KernelDecoder  # noqa: E402
from smallthinker_lab.kernels import KernelRunner  # noqa: E402
from smallthinker_lab.model.checkpoint import load_model, save_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF = torch.bfloat16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant_kernels") / "model"
    m = random_model().to(BF)
    m.config.torch_dtype = "bfloat16"
    save_pretrained(m, folder)
    return folder


# every expert resident (None); the minimum limit (0: offloaded). Interpreted (minutes a case), one of each
CASES = ([(None, "int8"), (0, "q4_0")] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
         else [(extra, fmt) for extra in (None, 0) for fmt in ("int8", "q4_0")])


@pytest.mark.parametrize("extra,fmt", CASES)
def test_engine_kernel_decode_of_quantized_experts_equals_the_kernel_model(ckpt, tmp_path, fmt, extra):
    """The engine over an int8 / q4_0 bundle in the kernels' layout (down [H, F], quantized along F), decoding with
    the quantized kernels from its slots: the greedy tokens of the in-memory model through the same kernels over the
    same bytes (``kernel_experts``), resident and at the minimum limit, with exact counters."""
    prompt, new = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38], 4  # the window of 8 wraps
    bundle = convert(ckpt, tmp_path / fmt, fmt, progress=False, down_transposed=False)
    model = load_model(ckpt, device=DEV)
    table = quant.kernel_experts(model, fmt)
    ref = KernelRunner(model, max_context=64, graph=DEV == "cuda", experts=table).generate(prompt, new, stop_tokens=[])
    # attention in the model's modules: the decode kernels read its weights (on a CUDA device attention_format's
    # "auto" keeps them; on the CPU it would choose the native Q4_0 projections)
    opts = dict(progress=False, device=DEV, max_context=64, quantization=fmt, bundle_dir=bundle, attention_format=None)
    limit = None
    if extra is not None:
        with Engine.from_pretrained(ckpt, memory_limit=None, **opts) as probe:
            limit = probe.plan.minimum_bytes + extra * probe.bundle.stride
    with Engine.from_pretrained(ckpt, memory_limit=limit, host_cache=DEV == "cuda", **opts) as e:
        assert e.bundle.format == fmt and not e.bundle.down_transposed and not e.exact
        g = KernelDecoder(e.state)
        g.usable = lambda: True  # on a CPU (usable() needs CUDA)
        e.decoder = g
        assert g._expert_format() == fmt
        e.reset_stats(clear_cache=True)
        tokens = e.generate(prompt, new, stop_tokens=[]).tokens
        st = e.stats()
        assert tokens == ref
        assert g.replays == new - 1
        assert st["hits"] + st["misses"] == st["requests"] == len(e.trace)
        assert simulate(e.trace, e.cache.capacity_experts, "lru").hits == st["hits"]
        if extra is not None:
            assert e.cache.capacity_experts < e.config.num_hidden_layers * e.config.num_experts and st["misses"] > 0


def test_backend_reasons_name_the_expert_formats_the_kernels_read():
    from smallthinker_lab.engine.options import EngineOptions, static_reasons

    cuda, opts = torch.device("cuda"), EngineOptions()
    for fmt in (None, "int8", "q4_0"):
        assert static_reasons(cuda, BF, fmt, opts)["kernels"] is None
    for fmt in ("q4_0_cpu", "int8_cpu", "fp16"):
        why = static_reasons(cuda, BF, fmt, opts)["kernels"]
        assert "bfloat16, int8 or q4_0 experts" in why and repr(fmt) in why


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "q4_0"])
def test_engine_from_pretrained_decodes_quantized_experts_with_the_kernels_on_cuda(ckpt, fmt):
    """``Engine.from_pretrained(..., device="cuda", quantization=fmt, backend="kernels")``: the bundle in the kernels'
    layout made on first use, the kernel decoder usable, the kernel model's greedy tokens."""
    prompt, new = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38], 8
    model = load_model(ckpt, device="cuda")
    ref = KernelRunner(model, max_context=64, experts=quant.kernel_experts(model, fmt)).generate(prompt, new,
                                                                                                stop_tokens=[])
    with Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", quantization=fmt, backend="kernels",
                                progress=False, max_context=64) as e:
        assert e.backend == "kernels" and e.bundle.format == fmt and not e.bundle.down_transposed
        assert e.explain().set_index("backend").loc["kernels", "reason"] is None
        assert isinstance(e.decoder, KernelDecoder) and e.decoder.usable()
        assert e.generate(prompt, new, stop_tokens=[]).tokens == ref


def test_auto_keeps_eager_for_quantized_experts_and_says_why():
    from smallthinker_lab.engine.options import AUTO_QUANTIZED_NOTE, EngineOptions, choose, static_reasons

    reasons = static_reasons(torch.device("cuda"), BF, "q4_0", EngineOptions())
    assert choose("auto", reasons, "q4_0") == "eager" and choose("kernels", reasons, "q4_0") == "kernels"
    assert choose("auto", static_reasons(torch.device("cuda"), BF, None, EngineOptions())) == "kernels"
    assert "backend='kernels'" in AUTO_QUANTIZED_NOTE


@pytest.mark.gpu
def test_kernels_refuse_a_quantized_bundle_with_down_transposed(ckpt, tmp_path):
    """The decode kernels read a quantized record's down in the model's [H, F] layout: an explicit bundle_dir that
    stores it transposed (the eager path's layout, convert's default) is refused with an error naming the layout,
    instead of decoding garbage; the same bundle still opens on the eager backend."""
    from smallthinker_lab.engine.bundle import BundleError

    fh = convert(ckpt, tmp_path / "fh", "q4_0", progress=False)
    with pytest.raises(BundleError, match=r"down transposed.*down_transposed=False"):
        Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", quantization="q4_0", backend="kernels",
                               bundle_dir=fh, progress=False)
    with Engine.from_pretrained(ckpt, memory_limit=None, device="cuda", quantization="q4_0", backend="eager",
                                bundle_dir=fh, progress=False) as e:
        assert e.bundle.down_transposed
