"""llama.cpp's CUDA peer rows of the GPU suite (benchmarks/peer_llamacpp_gpu.py, llamacpp_cuda.py, llamacpp_source.py),
without a GPU and without compiling: the -ncmoe rule, the command lines, the trimmed source archive, one llama-bench
run through a stand-in executable, the row schema, the engine / llama.cpp ratios, and a failed build recorded."""

from __future__ import annotations

import io
import json
import math
import stat
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import llamacpp_cuda as cu
from benchmarks import llamacpp_source as src
from benchmarks import peer_llamacpp_gpu as gp
from smallthinker_lab.model.atomic import sha256_file
from smallthinker_lab.model.config import SmallThinkerConfig

RECORDED = Path(__file__).parent / "data" / "llama_bench_q4_0_pp32_tg16.json"
C4B = SmallThinkerConfig.from_name("smallthinker-4b-a0.6b")


# ---------------------------------------------------------------------------------------------- the -ncmoe rule
@pytest.mark.parametrize("precision", ["bf16", "q4_0"])
def test_ncmoe_keeps_no_more_expert_bytes_on_the_gpu_than_the_engine_cache(precision):
    L, E = C4B.num_hidden_layers, C4B.num_experts
    layer = E * cu.expert_bytes(C4B, precision)
    last = L
    for share in (0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0):
        cache = cu.engine_cache_bytes(C4B, precision, share)
        n = cu.ncmoe_for(cache, C4B, precision)
        assert 0 <= n <= L and n <= last  # more cache, never more layers on the CPU
        assert (L - n) * layer <= cache  # llama.cpp's GPU experts fit in what the engine's cache holds
        if n > 0:
            assert (L - n + 1) * layer > cache  # and one layer more would not: the closest match from below
        last = n
    assert cu.ncmoe_for(cu.engine_cache_bytes(C4B, precision, 0.6), C4B, precision) == 13  # 19 of 32 layers fit
    assert cu.ncmoe_for(cu.engine_cache_bytes(C4B, precision, 0.0), C4B, precision) == L  # top-k slots: none fits
    assert cu.ncmoe_for(cu.engine_cache_bytes(C4B, precision, 1.0), C4B, precision) == 0
    with pytest.raises(ValueError, match="expert-cache bytes"):
        cu.ncmoe_for(-1, C4B, precision)


def test_the_engine_cache_bytes_are_its_slots_times_the_record_size():
    # bench_engine.limit_for_share: max(top_k, round(share x experts)) slots of one bundle record each
    assert cu.engine_cache_bytes(C4B, "bf16", 0.6) == round(0.6 * 32 * 32) * 3 * 768 * 1536 * 2
    assert cu.engine_cache_bytes(C4B, "q4_0", 0.0) == C4B.top_k * 3 * 768 * 1536 * 18 // 32


def test_planned_rows_per_precision_in_memory_each_limit_and_all_on_the_cpu():
    rows = cu.plan_rows(C4B, {0.6, 0.9, 0.0})
    for p in ("bf16", "q4_0"):
        mine = [r for r in rows if r.precision == p]
        assert [r.ncmoe for r in mine] == sorted({r.ncmoe for r in mine})  # one row per -ncmoe
        assert mine[0].ncmoe == 0 and mine[-1].ncmoe == 32
        assert mine[-1].shares == [0.0]  # the minimum's top-k slots hold less than a layer: all on the CPU
        by_share = {s: r.ncmoe for r in mine for s in r.shares}
        assert by_share[0.6] == 13 and by_share[0.9] == 4
        assert [r.ncmoe for r in mine] == [0, 4, 13, 32]
        assert mine[0].name.endswith("in memory (-ngl 99 -fa on)") and "all experts on the CPU" in mine[-1].name
        assert "-ncmoe 13 (the engine's 60% limit's" in mine[2].name


# ---------------------------------------------------------------------------------------------- command lines
def test_llama_bench_command_line():
    cmd = cu.bench_command("/b/llama-bench", "/m/x.gguf", 16, 32, 32, 0)
    assert cmd == ["/b/llama-bench", "-m", "/m/x.gguf", "-ngl", "99", "-fa", "on", "-t", "16", "-p", "32", "-n", "32",
                   "-r", "1", "-o", "json"]
    hybrid = cu.bench_command("/b/llama-bench", "/m/x.gguf", 16, 32, 32, 13, repack=False)
    assert hybrid[-4:] == ["-ncmoe", "13", "--repack", "0"]


def test_build_and_quantize_command_lines():
    configure, build = cu.build_commands(Path("/s"), Path("/b"), 14, "/usr/local/cuda/bin/nvcc")
    assert configure[:5] == ["cmake", "-S", "/s", "-B", "/b"]
    for flag in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"):
        assert flag in configure
    assert build == ["cmake", "--build", "/b", "-j14", "--target", "llama-bench", "llama-quantize"]
    assert cu.quantize_command("/b/q", "a.gguf", "b.gguf", 8) == ["/b/q", "--pure", "a.gguf", "b.gguf", "Q4_0", "8"]
    assert cu.build_jobs() >= 1


# ---------------------------------------------------------------------------------------------- the source archive
def test_trim_rules():
    kept = ["CMakeLists.txt", "ggml/src/ggml.c", "ggml/src/ggml-cuda/mmq.cu", "ggml/src/ggml-cpu/ops.cpp",
            "tools/CMakeLists.txt", "tools/llama-bench/llama-bench.cpp", "tools/quantize/quantize.cpp",
            "gguf-py/gguf/gguf_writer.py", "vendor/nlohmann/json.hpp", "common/common.cpp", "src/llama.cpp"]
    dropped = ["docs/build.md", "models/ggml-vocab-qwen2.gguf", "tests/test-backend-ops.cpp", "examples/x/y.cpp",
               "ggml/src/ggml-vulkan/ggml-vulkan.cpp", "ggml/src/ggml-metal/ggml-metal.m", "tools/server/server.cpp",
               "tools/ui/index.html", "convert_hf_to_gguf.py", "gguf-py/tests/test_quants.py", ".git"]
    assert [p for p in kept if not src.keep(p)] == []
    assert [p for p in dropped if src.keep(p)] == []


def _fake_sdist(tmp_path: Path) -> Path:
    path = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    top = "llama_cpp_python-0.3.36"
    files = {"CHANGELOG.md": "## [0.3.36]\n- feat: Update llama.cpp to ggml-org/llama.cpp@0c1e57098\n",
             "vendor/llama.cpp/CMakeLists.txt": "project(x)\n", "vendor/llama.cpp/docs/a.md": "doc\n",
             "vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt": "# cuda\n",
             "vendor/llama.cpp/ggml/src/ggml-sycl/x.cpp": "sycl\n",
             "vendor/llama.cpp/tools/CMakeLists.txt": "add_subdirectory(server)\n",
             "vendor/llama.cpp/tools/llama-bench/llama-bench.cpp": "int main(){}\n",
             "vendor/llama.cpp/tools/server/server.cpp": "server\n",
             "vendor/llama.cpp/gguf-py/gguf/gguf_writer.py": "# writer\n"}
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def test_archive_is_trimmed_reproducible_and_checked(tmp_path):
    sdist = _fake_sdist(tmp_path)
    a, b = tmp_path / "a.tar.xz", tmp_path / "b.tar.xz"
    info = src.prepare(sdist, a, tmp_path / "record.json", log=lambda m: None)
    assert src.prepare(sdist, b, None, log=lambda m: None)["archive_sha256"] == info["archive_sha256"]
    assert info["vendored_llama_cpp_commit"] == "0c1e57098" and info["files"] == 5
    assert src.verify(a, tmp_path / "record.json") == info["archive_sha256"]
    out = src.extract(a, tmp_path / "x")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "CMakeLists.txt", "SOURCE.json", "ggml/src/ggml-cuda/CMakeLists.txt", "gguf-py/gguf/gguf_writer.py",
        "tools/CMakeLists.txt", "tools/llama-bench/llama-bench.cpp"]
    assert (out / "tools/CMakeLists.txt").read_text() == src.TOOLS_CMAKE
    assert json.loads((out / "SOURCE.json").read_text())["sdist_sha256"] == info["sdist_sha256"]
    a.write_bytes(a.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not the .* recorded"):
        src.verify(a, tmp_path / "record.json")
    with pytest.raises(FileNotFoundError, match="no llama.cpp source archive"):
        src.verify(tmp_path / "missing.tar.xz", tmp_path / "record.json")


# ---------------------------------------------------------------------------------------------- a failed build
def _args(**kw):
    return SimpleNamespace(**({"prompt_tokens": 32, "tokens": 33, "repeats": 3, "device": "cuda"} | kw))


def test_a_failed_build_is_recorded_not_raised(tmp_path):
    # a source whose configure fails: the reason (with cmake's words) is kept, nothing raises
    tree = tmp_path / "tree.tar.xz"
    data = b'cmake_minimum_required(VERSION 3.14)\nmessage(FATAL_ERROR "this source does not configure")\n'
    with tarfile.open(tree, "w:xz") as tf:
        for name, body in (("llama.cpp/CMakeLists.txt", data), ("llama.cpp/SOURCE.json", b"{}")):
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"archive_sha256": sha256_file(tree)}))
    peer = cu.CudaBuild(tree, record, tmp_path / "work", jobs=1, log=lambda m: None).start().wait(60)
    assert not peer.available and peer.reason.startswith("build failed: ")
    if cu.find_nvcc() and __import__("shutil").which("cmake"):
        assert "this source does not configure" in peer.reason

    # the suite's peer with no archive: unavailable with the reason, no rows, the section says why
    logs = []
    gpu = gp.GpuPeer(_args(), tmp_path, logs.append, archive=tmp_path / "none.tar.xz", record=record,
                     work=tmp_path / "w2", sampler=None)
    gpu.prepare(SimpleNamespace(config=C4B, ckpt=tmp_path))
    gpu.plan([], "4b-synthetic")
    gpu.step(0)
    res = gpu.results([], {}, "4b-synthetic")
    assert res["llama_cpp"]["available"] is False and "no llama.cpp source archive" in res["llama_cpp"]["reason"]
    assert res["peer_rows"] == [] and res["peer_ratios"] == []
    assert "Not run: build failed" in gp.render(res)
    # and off CUDA it does not even start a build
    off = gp.GpuPeer(_args(device="cpu"), tmp_path, logs.append, sampler=None)
    assert off.build is None and "--device cuda" in off.status()["reason"]


# ---------------------------------------------------------------------------------------------- one run, rows
def _stand_in(tmp_path: Path, segfault_with_repack: bool = False) -> Path:
    """An executable standing in for llama-bench: checks the GPU options, prints a recorded -o json output."""
    exe = tmp_path / "llama-bench"
    exe.write_text(f"""#!{sys.executable}
import os, signal, sys
a = sys.argv[1:]
assert a[a.index("-ngl") + 1] == "99" and a[a.index("-fa") + 1] == "on", a
if {segfault_with_repack!r} and "--repack" not in a:
    os.kill(os.getpid(), signal.SIGSEGV)
sys.stdout.write(open({str(RECORDED)!r}).read())
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_one_invocation_and_the_repack_retry(tmp_path):
    recorded = json.loads(RECORDED.read_text())
    row = cu.PeerRow("q4_0", 13, 32, gguf=tmp_path / "m.gguf")
    used = iter(range(10**9, 10**10, 10**8))
    cu.run_invocation(row, _stand_in(tmp_path, segfault_with_repack=True), 4, 32, 16, sampler=lambda: next(used))
    assert row.decode == [float(x) for x in recorded[1]["samples_ts"]]
    assert row.prefill == [float(x) for x in recorded[0]["samples_ts"]]
    assert row.repack is False and "--repack 0" in row.notes[0] and row.commands[0].endswith("--repack 0")
    assert row.gpu_memory[0] > 0  # the peak while it ran, less before


ENGINE_KEYS = ("name", "mode", "model", "device", "variant", "quantization", "threads", "prompt_tokens",
               "decode_tokens", "repeats", "prefill_tok_s", "prefill_tok_s_min", "prefill_tok_s_max", "decode_tok_s",
               "decode_tok_s_min", "decode_tok_s_max", "hit_rate", "bytes_read_per_token", "memory_bytes_per_token",
               "memory_bytes_split", "memory_limit", "limit_share_of_expert_bytes", "t_mem_ms", "t_io_ms", "bound_ms",
               "measured_ms", "bound_share", "bw_mem", "bw_link", "link", "error")


def _row(precision, ncmoe, decode, shares=()):
    r = cu.PeerRow(precision, ncmoe, 32, shares=list(shares), gguf=Path(f"/g/{precision}.gguf"))
    r.decode, r.prefill, r.gpu_memory = list(decode), [1000.0, 1100.0, 1050.0], [9e9, 9.1e9, 9.2e9]
    r.commands = [f"llama-bench -ncmoe {ncmoe}"]
    return r


def test_rows_carry_the_engine_rows_fields_and_their_bound():
    ceil = {"hbm_copy": {"median": 4.2e12}}
    s = gp.summarise(_row("bf16", 13, [100.0, 110.0, 105.0], [0.6]), C4B, ceil, [2e10, 2.2e10], 16, 32, 32,
                     "4b-synthetic", {"version": "version: 1 (abc)"})
    assert [k for k in ENGINE_KEYS if k not in s] == []
    assert (s["decode_tok_s"], s["decode_tok_s_min"], s["decode_tok_s_max"]) == (105.0, 100.0, 110.0)
    assert s["quantization"] == "none" and s["ncmoe"] == 13 and s["matches_engine_limits"] == [0.6]
    assert s["build"]["version"] == "version: 1 (abc)" and s["command"] == "llama-bench -ncmoe 13"
    split = s["memory_bytes_split"]
    assert math.isclose(split["experts_cpu"], split["experts"] * 13 / 32)
    assert math.isclose(s["memory_bytes_per_token"] + s["host_expert_bytes_per_token"], split["total"])
    bound = s["memory_bytes_per_token"] / 4.2e12 + s["host_expert_bytes_per_token"] / 2.1e10
    assert math.isclose(s["bound_share"], bound * 105.0) and math.isclose(s["gpu_memory_bytes"], 9.1e9)
    assert s["gpu_expert_bytes"] == 19 * 32 * 3 * 768 * 1536 * 2
    err = gp.summarise(cu.PeerRow("q4_0", 0, 32, error="boom"), C4B, ceil, [], 16, 32, 32, "k", {})
    assert err["error"] == "boom" and "decode_tok_s" not in err


def test_ratios_at_the_same_precision_and_gpu_memory():
    ceil = {"hbm_copy": {"median": 4.2e12}}
    peer = [gp.summarise(r, C4B, ceil, [2e10], 16, 32, 32, "S", {}) for r in (
        _row("bf16", 0, [400.0]), _row("bf16", 13, [110.0], [0.6]), _row("bf16", 32, [60.0]),
        _row("q4_0", 0, [600.0]), _row("q4_0", 13, [180.0], [0.6]), _row("q4_0", 32, [200.0]))]
    eng = [{"name": "S engine", "mode": "engine", "model": "S", "quantization": "none", "decode_tok_s": 1300.0,
            "prefill_tok_s": 3000.0, "memory_limit": None},
           {"name": "S engine 60%", "mode": "engine", "model": "S", "quantization": "none", "decode_tok_s": 123.0,
            "memory_limit": 5.4e9, "share_target": 0.6},
           {"name": "S engine q4_0 60%", "mode": "engine", "model": "S", "quantization": "q4_0",
            "decode_tok_s": 300.0, "memory_limit": 2e9, "share_target": 0.6},
           {"name": "S engine bad", "mode": "engine", "model": "S", "quantization": "none", "decode_tok_s": 1.0,
            "memory_limit": None, "error": "x"},
           {"name": "other model", "mode": "engine", "model": "T", "quantization": "none", "decode_tok_s": 9.0,
            "memory_limit": None}]
    got = gp.ratios(eng, peer, "S")
    assert len(got) == 6  # in memory: decode + prefill; each limit: the matching row and the best at no more
    mem = [x for x in got if x["engine"] == "S engine" and x["metric"] == "decode_tok_s"]
    assert len(mem) == 1 and mem[0]["llama_cpp"] == "llama.cpp bf16 in memory (-ngl 99 -fa on)"
    assert mem[0]["value"] == 1300.0 / 400.0 and mem[0]["threshold"] == 3.0 and mem[0]["met"] is True
    off = [x for x in got if x["engine"] == "S engine 60%"]  # its -ncmoe 13 row is also the best here
    assert {x["value"] for x in off} == {123.0 / 110.0} and [x["threshold"] for x in off] == [None, 2.0]
    assert off[1]["met"] is False and off[1]["engine_memory_limit"] == 5.4e9
    q4 = {x["llama_cpp"]: x for x in got if x["engine"] == "S engine q4_0 60%"}
    best = q4["llama.cpp Q4_0 all experts on the CPU (-ncmoe 32)"]  # faster than its -ncmoe 13 here: the best
    assert best["value"] == 300.0 / 200.0 and best["threshold"] == 2.0 and best["met"] is False
    assert q4["llama.cpp Q4_0 -ncmoe 13 (the engine's 60% limit's expert bytes)"]["threshold"] is None
    md = gp.render({"llama_cpp": {"available": True, "build": {"version": "v"}}, "peer_rows": peer,
                    "peer_ratios": got})
    assert md.count("\n| llama.cpp") == 6 and "| 3.25 | 3 | yes |" in md


def test_runs_are_interleaved_between_the_engine_rows(tmp_path):
    from benchmarks.llamacpp_bin import Peer
    from benchmarks.run import _spec

    logs = []
    gpu = gp.GpuPeer(_args(device="cpu"), tmp_path, logs.append, sampler=None)
    gpu.reason, gpu.config = None, C4B  # as prepare() leaves it, with a stand-in llama-bench
    gpu.peer = Peer(True, bench=_stand_in(tmp_path))
    gpu.ggufs = {"bf16": tmp_path / "b.gguf", "q4_0": tmp_path / "q.gguf"}
    modes = [_spec("engine", "S", "in memory"), _spec("engine", "S", "full", 0.6, "lru", True),
             _spec("engine", "T", "full", 0.25, "lru", True)]  # another model's limit: not a row here
    gpu.plan(modes, "S")
    assert [r.ncmoe for r in gpu.rows] == [0, 13, 32, 0, 13, 32] and len(gpu.queue) == 18
    assert gpu.queue[:6] == [0, 1, 2, 3, 4, 5] and gpu.queue[6:12] == [1, 2, 3, 4, 5, 0]  # rotated per round
    sizes = []
    for left in (2, 1, 0):  # after each of three engine rows: its share of what is queued
        before = len(gpu.queue)
        gpu.step(left)
        sizes.append(before - len(gpu.queue))
    assert sizes == [6, 6, 6] and not gpu.queue
    per_run = len(json.loads(RECORDED.read_text())[1]["samples_ts"])  # the stand-in prints a recorded -r 3 run
    assert all(len(r.commands) == 3 and len(r.decode) == 3 * per_run for r in gpu.rows)
    res = gpu.results([], {"hbm_copy": {"median": 4e12}}, "S")
    assert res["llama_cpp"]["available"] and len(res["peer_rows"]) == 6
    assert all(r["decode_tok_s"] > 0 and r["bound_share"] > 0 for r in res["peer_rows"])


def test_a_build_out_of_time_is_stopped(tmp_path):
    import subprocess
    import time

    b = cu.CudaBuild(tmp_path / "none.tar.xz", tmp_path / "r.json", tmp_path, log=lambda m: None)
    b._cancel.set()  # what wait(timeout) does when the time is up
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="stopped: out of time"):
        b._call(["sleep", "30"], subprocess.DEVNULL)
    assert time.perf_counter() - t0 < 10

