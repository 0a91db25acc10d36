"""The GPU suite's big shape (benchmarks/big_shape.py): the directly written model equals the suite's synthetic
checkpoint and its conversion, the rows it runs, and the layer count its budget estimate picks."""

import json

import torch
from safetensors import safe_open

from benchmarks import bench_engine as be
from benchmarks.big_shape import FULL_LAYERS, LIMIT_8G, big_modes, choose_layers, make_synthetic_direct
from smallthinker_lab.engine.bundle import DATA_NAME, INDEX_NAME

GB = 10**9


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def test_direct_model_equals_the_suites_checkpoint_and_its_conversion(tmp_path):
    """Same seed and attention-output scale: the non-expert tensors (o_proj scaled) and every byte of the bf16 and
    Q4_0 bundles but the bundle id equal make_synthetic + convert_bundle's (the 4B path)."""
    ckpt, _ = be.make_synthetic(tmp_path / "full", "smallthinker-test", seed=0, attn_out_scale=0.1, reuse=False)
    conv = {None: be.convert_bundle(ckpt, tmp_path / "b16")[0], "q4_0": be.convert_bundle(ckpt, tmp_path / "b4",
                                                                                           "q4_0")[0]}
    folder, spec, bundles = make_synthetic_direct(tmp_path / "direct", "smallthinker-test", seed=0,
                                                  attn_out_scale=0.1, device="cpu", reuse=False, kernels=False,
                                                  log=lambda m: None)
    assert not spec["reused"] and spec["drawn_on"] == "cpu"
    mine, theirs = _tensors(folder / "model.safetensors"), _tensors(ckpt / "model.safetensors")
    assert mine and all(torch.equal(t.view(torch.uint8), theirs[n].view(torch.uint8)) for n, t in mine.items())
    for q in (None, "q4_0"):
        a, b = (bundles[q] / DATA_NAME).read_bytes(), (conv[q] / DATA_NAME).read_bytes()
        assert a[:12] == b[:12] and a[28:] == b[28:], q
        ia, ib = (json.loads((d / INDEX_NAME).read_text())["experts"] for d in (bundles[q], conv[q]))
        assert ia == ib
    again = make_synthetic_direct(tmp_path / "direct", "smallthinker-test", seed=0, attn_out_scale=0.1,
                                  device="cpu", reuse=True, kernels=False)
    assert again[1]["reused"] and again[2] == bundles


def test_rows_reference_first_then_8gib_then_60_percent():
    modes = big_modes("21b-synthetic", q4=True, routing=("gsm8k",))
    names = [m.name for m in modes]
    assert len(set(names)) == len(names)
    assert [(m.quantization, m.limit, m.share, m.reference) for m in modes[:6]] == [
        (None, None, None, True), (None, LIMIT_8G, None, False), ("q4_0", None, None, True),
        ("q4_0", LIMIT_8G, None, False), (None, None, 0.6, False), ("q4_0", None, 0.6, False)]
    assert all(m.options == {"cuda_graph": "kernels"} for m in modes[:6])
    assert [m.required for m in modes[:6]] == [True, True, False, False, False, False]
    replay = modes[6:]
    assert replay[0].reference and all(m.routing == "gsm8k" and m.options == {"backend": "kernels"} for m in replay)
    assert all(m.options == {} for m in big_modes("k", kernels=False))


def test_layer_choice_fits_the_budget_and_the_disk():
    cfg = be.SmallThinkerConfig.from_name("smallthinker-21b-a3b")
    fast = {"write_bytes_per_s": 5 * GB, "read_bytes_per_s": 5 * GB}
    n, est = choose_layers(cfg, 540, fast, q4=True)
    assert n == FULL_LAYERS == cfg.num_hidden_layers and est["estimated_seconds"] <= 540
    slow = {"write_bytes_per_s": 0.2 * GB, "read_bytes_per_s": 0.2 * GB}
    n, est = choose_layers(cfg, 540, slow, q4=True)
    assert 1 <= n < FULL_LAYERS
    assert est["estimated_seconds"] <= 540 < est["estimated_seconds"] + est["per_layer_seconds"]  # the most that fit
    n_disk, est = choose_layers(cfg, 540, fast, q4=True, free_bytes=20 * GB)
    per_layer = est["layer_bytes_bf16"] + est["layer_bytes_q4_0"]
    assert n_disk < FULL_LAYERS and n_disk * per_layer < 20 * GB


def test_gpu_suite_big_shape_dry_run_end_to_end(tmp_path):
    """``--suite gpu --shape 21b --device cpu --dry-run``: the code path of the GPU run on the tiny shape, every row
    checked against its precision's resident engine, results in bench_gpu_21b_dryrun.json."""
    from benchmarks import run

    code = run.main(["--suite", "gpu", "--shape", "21b", "--device", "cpu", "--dry-run", "--out", str(tmp_path / "o"),
                     "--scratch", str(tmp_path / "s"), "--no-readme", "--routing", "", "--tokens", "4",
                     "--repeats", "1"])
    res = json.loads((tmp_path / "o" / "bench_gpu_21b_dryrun.json").read_text())
    assert code == 0 and not res.get("fatal") and res["errors"] == 0 and not res["partial"]
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == [m.name for m in big_modes("21b-synthetic", kernels=False)]
    assert rows["21b-synthetic engine"]["checked"] == "the reference itself"
    assert rows["21b-synthetic engine 8GiB lru prefetch"]["checked"] == "tokens equal to the resident engine's"
    assert rows["21b-synthetic engine 8GiB lru prefetch"]["memory_limit"] == 8 * 2**30
    assert "straight into" in res["settings"]["models"]["21b-synthetic"]["description"]
    assert res["setup"]["synthetic_direct"]["drawn_on"] == "cpu"
