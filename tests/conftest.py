import pytest
import torch

from smallthinker_lab import SmallThinkerConfig, SmallThinkerForCausalLM


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def random_model(name: str = "smallthinker-test", seed: int = 0, std: float = 0.2, **overrides):
    """A small model with weights large enough that routing and attention are far from uniform."""
    cfg = SmallThinkerConfig.from_name(name, **overrides)
    model = SmallThinkerForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@pytest.fixture
def test_model():
    return random_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning OpenMP threads crawl on a busy 2-core machine:
    modules of small-model tests run with one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy_gaps(engine, model, prompts, new: int = 16):
    """For each greedy token the engine generates after each prompt: how far below the model's best logit (on the
    same context) its logit is, 0 where both pick the same token; a tensor over every generated position."""
    gaps = []
    for p in prompts:
        tokens = engine.generate(p, new, stop_tokens=[]).tokens
        with torch.no_grad():
            out = model(torch.tensor([p + tokens]))
        logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)[0].float()
        for i, t in enumerate(tokens):
            row = logits[len(p) - 1 + i]
            gaps.append(float(row.max() - row[t]))
    return torch.tensor(gaps)


def dequantise_experts(model, fmt: str) -> None:
    """Every expert weight of ``model`` set, in place, to its ``fmt`` encoding decoded again (in the weight's dtype,
    quantised along its last dimension): the in-memory model an engine with ``fmt`` experts computes with."""
    from smallthinker_lab.engine.quant import get_format

    codec = get_format(fmt)
    with torch.no_grad():
        for layer in model.model.layers:
            for ex in layer.block_sparse_moe.experts:
                for lin in (ex.gate, ex.up, ex.down):
                    w = lin.weight
                    w.copy_(codec.decode(codec.encode(w.float()), w.shape, w.dtype))
