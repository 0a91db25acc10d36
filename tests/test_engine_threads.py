"""One engine, several threads: every generation returns the serial run's tokens or raises EngineBusy, never
different tokens or an internal error; the engine stays usable after the contention."""

import threading

import pytest
import torch
from conftest import random_model

from smallthinker_lab import EngineBusy
from smallthinker_lab.engine import Engine, convert
from smallthinker_lab.model.checkpoint import save_pretrained

PROMPTS = [[3, 14, 15, 92, 65, 35], [89, 79, 32, 38, 46, 26, 43], [5, 8, 13, 21], [34, 55, 89, 14, 23, 37, 61, 98]]
NEW = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("threads") / "model"
    save_pretrained(random_model(), folder)
    convert(folder, progress=False)
    with Engine.from_pretrained(folder, memory_limit=None, progress=False) as e:
        minimum, stride = e.plan.minimum_bytes, e.bundle.stride
    # a cache that evicts: concurrent misuse would show as wrong tokens or "all slots are pinned"
    e = Engine.from_pretrained(folder, memory_limit=minimum + 3 * stride, progress=False)
    yield e
    e.close()


def test_four_threads_get_serial_tokens_or_engine_busy(engine):
    serial = [engine.generate(p, NEW, stop_tokens=[]).tokens for p in PROMPTS]
    results: list[tuple[int, list[int] | None, BaseException | None]] = []
    start = threading.Barrier(4)

    def worker(w: int):
        start.wait()
        for j in range(20):
            k = (w + j) % len(PROMPTS)
            try:
                results.append((k, engine.generate(PROMPTS[k], NEW, stop_tokens=[]).tokens, None))
            except BaseException as exc:  # noqa: BLE001 - every outcome is checked below
                results.append((k, None, exc))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 80
    busy = 0
    for k, tokens, exc in results:
        if exc is not None:
            assert isinstance(exc, EngineBusy), repr(exc)
            assert "another thread" in str(exc)
            busy += 1
        else:
            assert tokens == serial[k]
    assert busy < 80  # some generations ran
    # the engine is consistent afterwards
    assert [engine.generate(p, NEW, stop_tokens=[]).tokens for p in PROMPTS] == serial


def test_forward_from_another_thread_during_a_stream_is_refused(engine):
    serial = engine.generate(PROMPTS[0], NEW, stop_tokens=[]).tokens
    it = engine.stream(PROMPTS[0], NEW, stop_tokens=[])
    first = next(it)
    errors = []

    def other():
        try:
            engine.forward(torch.tensor([[3, 4, 5]]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        try:
            engine.generate(PROMPTS[1], NEW, stop_tokens=[])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 2 and all(isinstance(e, EngineBusy) for e in errors), errors
    assert [first, *it] == serial  # the first generation was not disturbed
    # once it ended, another thread may generate
    out = []
    t = threading.Thread(target=lambda: out.append(engine.generate(PROMPTS[0], NEW, stop_tokens=[]).tokens))
    t.start()
    t.join()
    assert out == [serial]


def test_a_closed_stream_frees_the_engine_for_other_threads(engine):
    it = engine.stream(PROMPTS[2], NEW, stop_tokens=[])
    next(it)
    it.close()
    out = []
    t = threading.Thread(target=lambda: out.append(engine.generate(PROMPTS[2], NEW, stop_tokens=[]).tokens))
    t.start()
    t.join()
    assert out and len(out[0]) == NEW
