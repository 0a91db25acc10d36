"""The llama.cpp peer benchmark (benchmarks/peer_llamacpp.py): parsing llama-bench's output, and a run without
llama.cpp that reports the peer as unavailable, with the reason, and still times the engine's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import peer_llamacpp as peer
from benchmarks import run

DATA = Path(__file__).parent / "data"
RECORDED = DATA / "llama_bench_q4_0_pp32_tg16.json"  # llama-bench -t 1 -p 32 -n 16 -r 3 -o json --repack 0


def test_parses_a_recorded_llama_bench_output():
    text = RECORDED.read_text(encoding="utf-8")
    tests = peer.parse_llama_bench(text)
    assert [(t["n_prompt"], t["n_gen"]) for t in tests] == [(32, 0), (0, 16)]
    rates = peer.split_tests(tests)
    raw = json.loads(text)
    assert rates["prefill"] == [float(x) for x in raw[0]["samples_ts"]] and len(rates["prefill"]) == 3
    assert rates["decode"] == [float(x) for x in raw[1]["samples_ts"]] and len(rates["decode"]) == 3
    assert all(t["repack"] is False and t["n_threads"] == 1 for t in tests)
    # the same tests as JSON lines (-o jsonl) parse the same
    jsonl = "\n".join(json.dumps(t) for t in raw)
    assert peer.split_tests(peer.parse_llama_bench(jsonl)) == rates


def test_bad_llama_bench_output_is_a_clear_error():
    raw = json.loads(RECORDED.read_text(encoding="utf-8"))
    del raw[1]["samples_ts"]
    with pytest.raises(ValueError, match="test 1 lacks field 'samples_ts'"):
        peer.parse_llama_bench(json.dumps(raw))
    with pytest.raises(ValueError, match="printed nothing"):
        peer.parse_llama_bench("  \n")
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        peer.parse_llama_bench("| model | size |\n|---|---|")
    combined = dict(raw[0], n_gen=16)
    with pytest.raises(ValueError, match="combined pp\\+tg"):
        peer.parse_llama_bench(json.dumps([combined]))


def test_locate_without_llama_cpp_says_where_it_looked(tmp_path):
    p = peer.locate({"LLAMA_CPP_DIR": str(tmp_path / "llama.cpp")}, cache=tmp_path / "cache")
    assert not p.available and p.bench is None
    assert str(tmp_path / "llama.cpp" / "build" / "bin") in p.reason and str(tmp_path / "cache") in p.reason
    assert "--build-peer" in p.reason


def test_vendored_commit_from_the_sdist_changelog():
    log = ("## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n"
           "## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n")
    assert peer._vendored_commit(log, "0.3.36") == "0c1e57098"
    assert peer._vendored_commit(log, "0.3.35") == "4df29be4f"
    assert peer._vendored_commit(log, "0.3.1") is None


def test_cgroup_reason_where_there_is_no_memory_controller(tmp_path):
    assert "no cgroup v1 memory controller" in peer.cgroup_unavailable(tmp_path)


def test_peer_suite_without_llama_cpp_reports_it_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "no-llama.cpp"))
    out = tmp_path / "results"
    code = run.main(["--suite", "cpu", "--peer", "llama.cpp", "--dry-run", "--rounds", "1", "--limited-rounds", "0",
                     "--peer-threads", "1", "--peer-cache", str(tmp_path / "cache"), "--out", str(out),
                     "--scratch", str(tmp_path / "scratch"), "--prompt-tokens", "8", "--tokens", "3"])
    assert code == 0
    res = json.loads((out / "bench_cpu_peer_dryrun.json").read_text(encoding="utf-8"))
    assert res["llama_cpp"]["available"] is False and "no llama-bench in" in res["llama_cpp"]["reason"]
    llama = [r for r in res["rows"] if r["mode"] == "llama.cpp"]
    engine = [r for r in res["rows"] if r["mode"] == "engine"]
    assert {r["quantization"] for r in llama} == {"none", "q4_0"}
    assert all(r["error"].startswith("unavailable: no llama-bench") for r in llama)
    assert {r["quantization"] for r in engine} == {"none", "q4_0", "q4_0_cpu"}
    for r in engine:  # the engine's rows still measured, each with its bound
        assert r["error"] is None and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert 0 < r["bound_share"] and r["bw_mem"] > 0 and r["memory_bytes_per_token"] > 0
        assert r["checked"].startswith("greedy tokens")
    # the q4_0_cpu engine's LM head runs in the int4 kernel: its bytes per token count the quantized head
    from smallthinker_lab.engine.quant import get_format

    q4 = next(r for r in engine if r["quantization"] == "q4_0_cpu")
    vocab, hidden = res["settings"]["model"]["shape"]["vocab"], res["settings"]["model"]["shape"]["hidden"]
    assert q4["lm_head_format"] == "q4_0_cpu" and q4["lm_head"].startswith("q4_0_cpu")
    assert q4["memory_bytes_split"]["lm_head"] == get_format("q4_0_cpu").nbytes((vocab, hidden))
    bf = next(r for r in engine if r["quantization"] == "none")
    assert "lm_head_format" not in bf and bf["memory_bytes_split"]["lm_head"] == vocab * hidden * 2
    # with the native kernel the q4_0 engine's attention runs in Q4_0 too: its reference holds the dequantised
    # projections, and its bytes per token count them at 18 bytes per 32 weights
    from smallthinker_lab.engine import native

    q40 = next(r for r in engine if r["quantization"] == "q4_0")
    attn_bf16 = bf["memory_bytes_split"]["attention"]
    assert "attention_format" not in bf and attn_bf16 > 0
    if native.available():
        assert q40["attention_format"] == "q4_0" and q40["attention"].startswith("q4_0")
        assert "attention" in q40["checked"]
        assert q40["memory_bytes_split"]["attention"] == attn_bf16 // 2 * 18 // 32
    else:
        assert "attention_format" not in q40 and q40["memory_bytes_split"]["attention"] == attn_bf16
    assert res["ratios"] == []  # nothing to compare with
    md = (out / "bench_cpu_peer_dryrun.md").read_text(encoding="utf-8")
    assert "llama.cpp: **unavailable**" in md
