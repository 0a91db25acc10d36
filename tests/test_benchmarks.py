"""The benchmark suite cannot rot: the smoke suite runs end to end (tiny shapes, seconds) and writes valid JSON with
the required fields; the token check refuses a mode whose tokens differ; the engine's exact mode is bit-identical
to the in-memory model in bf16; the rows feed smallthinker_lab.analysis.tables; the README table stays between its
markers.
"""

import json
import math
import re

import pytest
import torch
from conftest import random_model

from benchmarks import bench_engine, report_table, run
from smallthinker_lab.engine import Engine, convert
from smallthinker_lab.engine.bundle import BundleError
from smallthinker_lab.model.checkpoint import load_model, save_pretrained

ROW_FIELDS = ("mode", "device", "memory_limit", "limit_share_of_expert_bytes", "policy", "prefetch", "prefill_tok_s",
              "prefill_tok_s_min", "prefill_tok_s_max", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max",
              "hit_rate", "bytes_read_per_token", "memory_bytes_per_token", "t_mem_ms", "t_io_ms", "bound_ms",
              "bound_share", "measured_ms", "resident", "checked", "repeats")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    rc = run.main(["--suite", "smoke", "--out", str(base / "out"), "--scratch", str(base / "scratch"), "--no-readme"])
    return rc, json.loads((base / "out" / "bench_smoke.json").read_text()), base


@pytest.mark.slow
def test_smoke_suite_runs_end_to_end_and_writes_valid_json(smoke):
    rc, res, base = smoke
    assert rc == 0, [r.get("error") for r in res["rows"] if r.get("error")]
    assert res["partial"] is False and res["errors"] == 0 and not res.get("fatal")
    for key in ("machine", "versions", "ceilings", "settings", "rows", "targets", "profile", "wall_seconds"):
        assert key in res, key
    assert res["versions"]["torch"] == torch.__version__
    for key in ("memory_copy", "storage_read", "matmul_fp32_cpu", "expert_reads"):
        assert res["ceilings"][key]["median"] > 0
        assert res["ceilings"][key]["min"] <= res["ceilings"][key]["median"] <= res["ceilings"][key]["max"]
    modes = {r["mode"] for r in res["rows"]}
    assert {"in_memory", "engine", "accelerate_disk_offload"} <= modes
    variants = {r["variant"] for r in res["rows"]}
    assert {"in memory", "full", "no prefetch", "no cache", "naive offload"} <= variants
    assert any(r.get("quantization") == "q4_0" for r in res["rows"])
    assert any(r.get("instruments") for r in res["rows"])
    for r in res["rows"]:
        for f in ROW_FIELDS:
            assert f in r, (r["name"], f)
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["bound_ms"] == pytest.approx(max(r["t_mem_ms"], r["t_io_ms"] or 0.0))
        assert r["bound_share"] == pytest.approx(r["bound_ms"] / r["measured_ms"])
        if r["mode"] == "engine" and r["variant"] == "in memory":
            assert r["hit_rate"] == 1.0 and r["bytes_read_per_token"] == 0
        if r["mode"] == "engine" and r["variant"] != "in memory":
            assert 0 <= r["hit_rate"] <= 1 and r["memory_limit"] > 0
            assert r["bytes_read_per_token"] > 0 or r["hit_rate"] == 1.0
            assert set(r["time_split_ms"]) == set(bench_engine_parts())
    assert res["profile"] and all(p["decode_ms_per_token"] > 0 for p in res["profile"])
    assert any(t["target"].startswith("CPU 4B: offloaded decode") for t in res["targets"])
    md = (base / "out" / "bench_smoke.md").read_text()
    assert re.search(r"^\| mode +\| memory limit +\|", md, re.M) and "Targets" in md


@pytest.mark.slow
def test_smoke_suite_has_trained_routing_rows_beside_the_uniform_ones(smoke):
    """The smoke suite replays its stand-in trained model's recorded routing (gsm8k) on the synthetic shape: the
    rows pass the token check against the model in memory under the same replay, count hits and bytes, and the
    report puts them beside the uniform-routing rows of the same configuration."""
    _, res, base = smoke
    routed = [r for r in res["rows"] if r.get("routing") == "gsm8k"]
    assert {(r["mode"], r["variant"]) for r in routed} >= {("in_memory", "in memory"), ("engine", "in memory"),
                                                            ("engine", "full"), ("engine", "no prefetch")}
    assert all(not r.get("error") for r in routed)
    for r in routed:
        if r["mode"] == "engine" and r["variant"] != "in memory":
            assert 0 <= r["hit_rate"] <= 1 and r["offload_bound_share"] > 0
    info = res["setup"]["trained_routing"]["domains"]["gsm8k"]
    assert "layer l <- l mod" in info["mapping"]
    md = (base / "out" / "bench_smoke.md").read_text()
    assert "synthetic uniform routing vs trained routing" in md and "| trained routing (gsm8k) |" in md
    assert "| synthetic uniform routing |" in md


def bench_engine_parts():
    from benchmarks.profile_decode import PARTS

    return PARTS


def test_rows_feed_the_tables_module(smoke):
    pd = pytest.importorskip("pandas")
    from smallthinker_lab.analysis.tables import ablation_table, throughput_table

    _, res, _ = smoke
    df = pd.DataFrame([r for r in res["rows"] if r["model"] == "test-synthetic" and not r.get("error")])
    df["memory_limit"] = pd.to_numeric(df["memory_limit"])  # null (in memory) -> NaN
    t = throughput_table(df)
    assert len(t) == len(df) and "decode vs in memory" in t and "share of bound" in t
    a = ablation_table(df)
    assert {"in memory", "full", "no prefetch", "no cache", "naive offload"} <= set(a["variant"])
    assert "speedup vs naive" in a


def test_token_check_refuses_a_mode_whose_tokens_differ(tmp_path, monkeypatch):
    """A wrong engine (its LM head shifted so greedy picks other tokens) is refused: an error row, no timings,
    exit status 1; the in-memory model's row is reported."""
    from smallthinker_lab.engine.decode import EagerDecoder

    real = EagerDecoder.lm_head

    def wrong(self, x, decode):
        logits = real(self, x, decode)
        return logits.roll(1, dims=-1)  # every argmax moves to the next token id

    monkeypatch.setattr(EagerDecoder, "lm_head", wrong)
    rc = run.main(["--suite", "smoke", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "s"),
                   "--no-readme", "--no-trained", "--no-q4", "--only", "60% lru prefetch"])
    res = json.loads((tmp_path / "out" / "bench_smoke.json").read_text())
    assert rc == 1
    by_mode = {}
    for r in res["rows"]:
        by_mode.setdefault(r["mode"], []).append(r)
    assert all(not r.get("error") for r in by_mode["in_memory"])
    engine_rows = by_mode["engine"]
    assert engine_rows and all("differ from the in-memory model" in r["error"] for r in engine_rows)
    assert all(r.get("decode_tok_s") is None for r in engine_rows)
    assert res["errors"] == len(engine_rows)
    assert "ERROR" in (tmp_path / "out" / "bench_smoke.md").read_text()


def test_check_compares_every_position():
    bench_engine._check([1, 2, 3], [1, 2, 3], "same")
    with pytest.raises(bench_engine.TokensDiffer, match="position 2"):
        bench_engine._check([1, 2, 4], [1, 2, 3], "last differs")
    with pytest.raises(bench_engine.TokensDiffer, match="position 2"):
        bench_engine._check([1, 2], [1, 2, 3], "shorter")


@pytest.mark.parametrize("extra", [0, 3, None])
def test_engine_exact_mode_is_token_identical_to_the_model_in_bf16(tmp_path, extra):
    """exact=True: the model's kernels and layouts, so bf16 greedy tokens equal load_model's at any limit."""
    folder = tmp_path / "m"
    save_pretrained(random_model(std=0.05).to(torch.bfloat16), folder)
    convert(folder, progress=False)
    prompt = list(range(3, 19))
    want = load_model(folder).generate(prompt, 10, stop_tokens=[])
    with Engine.from_pretrained(folder, memory_limit=None, exact=True, progress=False) as e:  # exact's own minimum
        minimum, stride = e.plan.minimum_bytes, e.bundle.stride
    limit = None if extra is None else minimum + extra * stride
    with Engine.from_pretrained(folder, memory_limit=limit, exact=True, bypass_page_cache=True, progress=False) as e:
        assert e.generate(prompt, 10, stop_tokens=[]).tokens == want
        assert e.generate(prompt[:1], 10, stop_tokens=[]).tokens == load_model(folder).generate(
            prompt[:1], 10, stop_tokens=[])
    with pytest.raises(ValueError, match="exact"):
        Engine.from_pretrained(folder, memory_limit=None, exact=True, sparse_reglu=True, progress=False)


def test_exact_engine_reads_a_model_layout_bundle_without_transposes(tmp_path):
    """exact=True converts its own bundle with down in the model's [H, F] layout (no transpose per read, no
    staging for it) and stays bit-identical; an explicit bundle with down transposed still works (transposed per
    read); the default engine refuses a model-layout bundle with an error that says why."""
    folder = tmp_path / "m"
    save_pretrained(random_model(std=0.05).to(torch.bfloat16), folder)
    prompt = list(range(3, 19))
    want = load_model(folder).generate(prompt, 8, stop_tokens=[])
    with Engine.from_pretrained(folder, memory_limit=None, exact=True, progress=False) as e:
        assert e.bundle_dir.name == "expert_bundle-down_hf" and e.bundle.down_transposed is False
        assert not e.state.relayout_down and e.plan.staging_bytes == 0
        assert e.generate(prompt, 8, stop_tokens=[]).tokens == want
        hf_dir = e.bundle_dir
    fh_dir = convert(folder, tmp_path / "fh", progress=False)
    with Engine.from_pretrained(folder, memory_limit=None, exact=True, bundle_dir=fh_dir, progress=False) as e:
        assert e.bundle.down_transposed is True and e.state.relayout_down and e.plan.staging_bytes > 0
        assert e.generate(prompt, 8, stop_tokens=[]).tokens == want
    with pytest.raises(BundleError, match=r"model's \[H, F\] layout, which only exact=True"):
        Engine.from_pretrained(folder, memory_limit=None, bundle_dir=hf_dir, progress=False)


def test_limits_and_bytes_per_token():
    cfg = bench_engine.SmallThinkerConfig.from_name("smallthinker-4b-a0.6b")
    b = bench_engine.decode_memory_bytes(cfg, 2, 3 * 768 * 1536 * 2, context=0)
    assert b["experts"] == 4 * 32 * 3 * 768 * 1536 * 2  # 906 MB
    assert 1.6e9 < b["total"] < 1.8e9  # + attention 352 MB (with routers, norms) + LM head 467 MB
    attn = 32 * (1536 * 1536 * 2 + 2 * 256 * 1536) * 2  # q/k/v/o of 32 layers in bf16: 352 MB
    assert b["attention"] == attn
    q4 = bench_engine.decode_memory_bytes(cfg, 2, 3 * 768 * 1536 * 2, context=0, attention_nbytes=attn // 2 * 18 // 32)
    assert q4["attention"] == attn * 9 // 32 and b["total"] - q4["total"] == attn - attn * 9 // 32  # Q4_0: 99 MB
    lim = {"fixed": 1000, "stride": 10, "experts": 100}
    assert bench_engine.limit_for_share(lim, 0.6, 4) == (1000 + 600, 0.6)
    assert bench_engine.limit_for_share(lim, 0.0, 4) == (1000 + 40, 0.04)


def test_readme_table_only_between_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nIntro.\n")
    monkeypatch.setattr(report_table, "readme_section", lambda: "TABLE ONE\n")
    report_table.update_readme(readme)
    text = readme.read_text()
    assert text.startswith("# Project\n\nIntro.\n") and "## Performance" in text
    assert text.index("## Performance") < text.index(report_table.START) < text.index("TABLE ONE")
    readme.write_text(text + "\n## Later section\nkept\n")
    monkeypatch.setattr(report_table, "readme_section", lambda: "TABLE TWO\n")
    report_table.update_readme(readme)
    text = readme.read_text()
    assert "TABLE ONE" not in text and "TABLE TWO" in text and text.endswith("## Later section\nkept\n")
    assert text.count(report_table.START) == 1 and text.count("## Performance") == 1


def test_render_result_handles_errors_and_missing_values():
    res = {"suite": "cpu", "machine": {"cpu": "x", "cores": 2}, "versions": {}, "rows": [
        {"name": "a", "mode": "engine", "model": "m", "variant": "full", "error": "tokens differ", "memory_limit": 5},
        {"name": "b", "mode": "in_memory", "model": "m", "variant": "in memory", "decode_tok_s": 2.0,
         "decode_tok_s_min": 1.0, "decode_tok_s_max": 3.0, "hit_rate": None, "memory_limit": None}],
        "settings": {"models": {"m": {"description": "d", "routing": "r"}}}, "targets": [], "profile": []}
    md = report_table.render_result(res)
    assert "ERROR: tokens differ" in md and "model in memory" in md
    assert not math.isnan(len(md))


def _cells(md: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a GitHub table, cells unescaped."""
    lines = md.strip().splitlines()
    assert set(lines[1]) <= set("|:-"), lines[1]
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
    return split(lines[0]), [split(line) for line in lines[2:]]


def test_report_tables_read_back_cell_by_cell():
    rows = [{"name": "e", "mode": "engine", "model": "m", "variant": "full", "memory_limit": 2**30, "policy": "lru",
             "limit_share_of_expert_bytes": 0.5, "prefetch": True, "prefill_tok_s": 12.345, "decode_tok_s": 4.0,
             "decode_tok_s_min": 3.5, "decode_tok_s_max": 4.5, "hit_rate": 0.5, "bytes_read_per_token": 3 * 2**20,
             "memory_bytes_per_token": 10 * 2**20, "t_mem_ms": 1.25, "t_io_ms": 2.0, "measured_ms": 250.0,
             "bound_share": 0.008},
            {"name": "m", "mode": "in_memory", "model": "m", "variant": "in memory", "decode_tok_s": 8.0},
            {"name": "x", "mode": "engine", "model": "m", "variant": "full", "error": "a | b", "memory_limit": None,
             "policy": "lfu", "limit_share_of_expert_bytes": 0.25}]
    header, cells = _cells(report_table.rows_table(rows, "m"))
    assert header == report_table.ROWS_COLUMNS
    assert cells[0] == ["engine 50% LRU prefetch", "1.00 GiB", "50%", "12.3", "4 (3.5-4.5)", "0.50", "0.50", "3",
                        "10", "1.2", "2.0", "250.0", "1%"]
    assert cells[2][:2] == ["engine 25% LFU no prefetch", "none"] and cells[2][4] == "ERROR: a | b"
    assert all(c == "" for c in cells[2][2:4] + cells[2][5:])
    assert report_table.rows_table(rows, "other model") == ""
    items = [{"target": "a", "value": 1.23456, "threshold": ">= 1", "met": True},
             {"target": "b|c", "value": None, "threshold": "< 2", "met": None},
             {"target": "d", "value": 3.0, "threshold": "< 2", "met": False}]
    header, cells = _cells(report_table.verdict_table(items, ("target", "target"), ("value", "{:.3g}"), "threshold"))
    assert header == ["target", "value", "threshold", "met"]
    assert cells == [["a", "1.23", ">= 1", "yes"], ["b|c", "", "< 2", "n/a"], ["d", "3", "< 2", "**no**"]]
    from benchmarks.profile_decode import PARTS, profile_markdown

    rec = {"name": "engine | lru", "decode_ms_per_token": 12.34, **{p + "_ms": 1.0 for p in PARTS},
           **{p + "_share": 0.1 for p in PARTS}}
    header, cells = _cells(profile_markdown([rec]))
    assert header == ["mode", "ms/token", *(p.replace("_", " ") for p in PARTS)]
    assert cells == [["engine | lru", "12.3", *["1.0 (10%)"] * len(PARTS)]]


def test_quantized_kernel_rows_get_a_bundle_in_the_kernels_layout(tmp_path):
    """A row running the GPU decode kernels over Q4_0 experts opens a bundle with down in the model's layout (made
    once beside the suite's bundle, then reused); every other row opens the suite's bundle of its format."""
    from smallthinker_lab.engine.bundle import open_bundle

    folder = tmp_path / "m"
    model = random_model(std=0.05).to(torch.bfloat16)
    save_pretrained(model, folder)
    q4, _ = bench_engine.convert_bundle(folder, tmp_path / "b-q4_0", "q4_0")
    info = bench_engine.ModelInfo("m", folder, model.config, torch.bfloat16, [[1, 2]], {"q4_0": q4})
    assert bench_engine.bundle_for(info, "q4_0", {}) == q4 and open_bundle(q4, model.config).down_transposed
    k = bench_engine.bundle_for(info, "q4_0", {"cuda_graph": "kernels"})
    assert k != q4 and not open_bundle(k, model.config).down_transposed
    assert bench_engine.bundle_for(info, "q4_0", {"backend": "kernels"}) == k  # reused
    assert bench_engine.kernel_layout("q4_0", {"backend": "kernels"}) and not bench_engine.kernel_layout(None, {
        "backend": "kernels"})
