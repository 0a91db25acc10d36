"""TRAINING.md written from a run's own files: the facts the model card reads, numbers from the logs."""

import json
import math

import pytest

from smallthinker_lab.model.checkpoint import load_model
from smallthinker_lab.quality.contamination import read_training
from smallthinker_lab.train import read_log, train
from smallthinker_lab.train.report import render
from tests.test_train import RUN, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_md_states_what_the_run_logged(tmp_path):
    out = tmp_path / "run"
    summary = train("smallthinker-test", write_corpus(tmp_path / "tokens"), out,
                    **{**RUN, "steps": 6, "balance_group": 4})
    text = render(out / "model", out, name="tiny-test")
    (out / "model" / "TRAINING.md").write_text(text)
    facts = read_training(out / "model")["facts"]
    assert facts["tokens seen"] == f"{6 * 8 * 32:,}"
    assert facts["steps"] == "6 of 6 planned"
    assert "groups of 4 sequences" in facts["loss"] and "no other auxiliary loss" in facts["loss"]
    flat = " ".join(text.split())  # prose is wrapped
    n = load_model(out / "model").num_parameters()
    assert f"{n:,} parameters" in flat
    log, ev = read_log(out / "train_log.jsonl"), read_log(out / "eval_log.jsonl")
    assert f"First step: {log[0]['ce']:.3f}" in flat
    for r in ev:
        assert f"| {r['domain']} | " in text and f"{r['ce']:.3f} | {math.exp(r['ce']):.2f}" in text
    assert "No peak is known for this device, so no MFU." in flat  # trained on a CPU
    assert f"{summary['flops_per_token']['total']:,.0f}" in flat
    assert all(len(line) <= 120 for line in text.splitlines() if not line.startswith(("|", "smallthinker-lab")))
    assert "--config smallthinker-test " in text and "--balance-group 4 " in text
    assert "nan" not in text.lower()
    json.loads((out / "args.json").read_text())  # untouched
