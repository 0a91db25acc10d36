"""The balance-group sweep: run naming and commands, one run measured for real, the per-arm table across seeds."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from smallthinker_lab.model.config import SmallThinkerConfig
from smallthinker_lab.train import read_log, train
from smallthinker_lab.train.sweep import build_parser, parse_arms, parse_seeds, run_name, train_command
from smallthinker_lab.train.sweep_measure import SETS, arm_table, measure_run, write_tables

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = "data/models/smallthinker-tiny"


def test_arms_and_seeds_are_checked_and_named():
    assert parse_arms("1,4,16,64,micro-batch") == ["1", "4", "16", "64", "micro-batch"]
    assert [run_name(a, 2) for a in ("4", "micro-batch")] == ["g4-s2", "microbatch-s2"]
    for bad in ("1,1", "0", "global", ""):
        with pytest.raises(ValueError, match="arm"):
            parse_arms(bad)
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds("0,x")


def test_the_arms_commands_differ_only_in_the_group(tmp_path):
    a = build_parser().parse_args(["all", "--out", str(tmp_path), "--steps", "10"])
    cmds = {arm: train_command(a, arm, 1, tmp_path / run_name(arm, 1), 10) for arm in ("4", "micro-batch")}
    i = cmds["4"].index("--balance-group")
    assert cmds["4"][i + 1] == "4" and cmds["micro-batch"][i + 1] == "micro-batch"
    diff = [(x, y) for x, y in zip(cmds["4"], cmds["micro-batch"]) if x != y]
    assert diff == [(str(tmp_path / "g4-s1"), str(tmp_path / "microbatch-s1")), ("4", "micro-batch")]
    assert cmds["4"][cmds["4"].index("--seed") + 1] == "1" and "--config" in cmds["4"]


def test_the_table_gives_mean_std_and_range_per_arm(tmp_path):
    values = {("1", 0): 0.1, ("1", 1): 0.3, ("1", 2): 0.2, ("64", 0): 0.5, ("64", 1): 0.7}
    for (arm, seed), v in values.items():
        d = tmp_path / "runs" / run_name(arm, seed)
        d.mkdir(parents=True)
        (d / "measure.json").write_text(json.dumps({"measures": {"js_mean": v, "val_ce": 2 * v, "mfu": None}}))
    paths = write_tables(tmp_path, ["1", "64"], [0, 1, 2])
    t = pd.read_csv(paths[1], dtype={"arm": str}).set_index(["arm", "measure"])
    assert t.loc[("1", "js_mean"), "runs"] == 3 and t.loc[("64", "js_mean"), "runs"] == 2
    assert t.loc[("1", "js_mean"), "mean"] == pytest.approx(0.2)
    assert t.loc[("1", "js_mean"), "std"] == pytest.approx(np.std([0.1, 0.3, 0.2], ddof=1))
    assert (t.loc[("64", "val_ce"), "min"], t.loc[("64", "val_ce"), "max"]) == pytest.approx((1.0, 1.4))
    assert ("1", "mfu") not in t.index  # unmeasured values are left out, not zero
    md = paths[2].read_text()
    assert "| 1 | 0.2000 ± 0.1000 [0.1000, 0.3000] |" in md and "runs per arm: 1 3, 64 2" in md
    assert len(pd.read_csv(paths[0])) == 5


def test_one_seed_has_no_spread():
    runs = pd.DataFrame({"arm": ["4"], "seed": [0], "run": ["g4-s0"], "js_mean": [0.5]})
    row = arm_table(runs).iloc[0]
    assert row["runs"] == 1 and math.isnan(row["std"]) and row["min"] == row["max"] == 0.5


def _micro_corpus(folder, vocab=8192, n=6000, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, d in enumerate(["code", "en", "math", "zh"]):
        for name, size in ((f"{d}.bin", n), (f"{d}.val.bin", 600)):
            rng.integers(1 + i * 2000, 1 + (i + 1) * 2000, size=size).astype(np.uint16).tofile(folder / name)
    return folder


def test_a_trained_run_is_measured_for_real(tmp_path):
    cfg = SmallThinkerConfig.from_name(
        "smallthinker-tiny-wide", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, moe_num_primary_experts=8, moe_ffn_hidden_size=16, sliding_window_size=8,
        rope_layout=[0, 1, 1, 1], sliding_window_layout=[0, 1, 1, 1], torch_dtype="float32")
    run = tmp_path / "runs" / "g2-s0"
    train(cfg, _micro_corpus(tmp_path / "tokens"), run, steps=3, batch_size=4, seq_len=32, warmup=1,
          balance_group=2, eval_windows=2, log_every=1, progress=False, tokenizer_dir=TOKENIZER)
    res = measure_run(run, "data/prompts", SETS, prompt_limit=2, hit_prompts=5, cache_share=0.25, new_tokens=1)
    assert json.loads((run / "measure.json").read_text())["measures"] == pytest.approx(res, nan_ok=True)
    assert 0 < res["js_mean"] <= math.log(2) and len([k for k in res if k.startswith("js_layer_")]) == 4
    for s in SETS:
        assert 0 <= res[f"hot_share_{s}"] <= 1 and 0 <= res[f"cold_share_{s}"] <= 1
        assert 0 < res[f"usage_entropy_{s}"] <= 1
        assert 0 <= res[f"lru_hit_cold_{s}"] <= 1 and 0 <= res[f"lru_hit_warm_{s}"] <= 1
    assert 0 <= res["sparsity_median"] <= 1 and res["cache_experts"] == 8  # 25% of 4 layers x 8 experts
    ev = read_log(run / "eval_log.jsonl")
    assert res["val_ce"] == pytest.approx(np.mean([r["ce"] for r in ev if r["step"] == 3]))
    assert res["steps"] == 3 and res["tokens"] == 3 * 4 * 32


def test_the_sweep_command_trains_measures_and_tabulates_then_skips_what_is_done(tmp_path, capsys):
    from smallthinker_lab.train.sweep import main

    cfg = SmallThinkerConfig.from_name(
        "smallthinker-tiny-wide", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, moe_num_primary_experts=8, moe_ffn_hidden_size=16, sliding_window_size=8,
        rope_layout=[0, 1, 1, 1], sliding_window_layout=[0, 1, 1, 1], torch_dtype="float32")
    cfg_path = cfg.save(tmp_path / "cfg")
    argv = ["all", "--out", str(tmp_path / "sweep"), "--data", str(_micro_corpus(tmp_path / "tokens")),
            "--config", str(cfg_path), "--arms", "4", "--seeds", "0", "--steps", "2", "--batch-size", "4",
            "--seq-len", "32", "--device", "cpu", "--eval-windows", "2", "--prompt-limit", "2", "--hit-prompts", "5",
            "--new-tokens", "1"]
    assert main(argv) == 0
    run = tmp_path / "sweep" / "runs" / "g4-s0"
    assert read_log(run / "train_log.jsonl")[-1]["step"] == 1 and (run / "measure.json").exists()
    plan = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    cmd = plan["runs"]["g4-s0"]["command"]
    assert plan["steps"] == 2 and cmd[cmd.index("--balance-group") + 1] == "4" and cmd[cmd.index("--steps") + 1] == "2"
    assert "| 4 | " in (tmp_path / "sweep" / "sweep_table.md").read_text()
    before = (run / "train.out").stat().st_size, (run / "measure.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # done runs are neither retrained nor remeasured
    assert ((run / "train.out").stat().st_size, (run / "measure.json").stat().st_mtime_ns) == before
    assert "train g4-s0" not in capsys.readouterr().out
