"""The prompt-set registry (smallthinker_lab/prompt_sets.py): one home of the shipped sets' names, domains, files
and loaders, which every caller uses."""

import importlib
import json

import pytest

from smallthinker_lab import prompt_sets
from smallthinker_lab.analysis import prompts as analysis_prompts
from smallthinker_lab.prompt_sets import (
    PROMPT_SETS,
    REGISTRY,
    SET_DOMAIN,
    domain_of,
    load_prompt_set,
    load_prompt_sets,
    prompt_source,
    read_prompts,
)
from smallthinker_lab.resources import prompts_dir


def test_the_registry_names_the_shipped_files_and_their_domains():
    shipped = sorted(p.stem for p in prompts_dir().glob("*.jsonl"))
    assert sorted(PROMPT_SETS) == shipped == sorted(REGISTRY)
    assert SET_DOMAIN == {"gsm8k": "math", "humaneval": "code", "wiki-en": "en", "zh-news": "zh"}
    for name, source in REGISTRY.items():
        assert source.path().is_file() and source.path().stem == name
        records = source.records(3)
        assert len(records) == 3 and all(r["id"] and r["text"] for r in records)
        assert source.load(3) == [r["text"] for r in records] and source.load(3).name == name
        assert domain_of(name) == source.domain
    assert domain_of("my-own-set") is None


def test_every_caller_uses_the_one_registry():
    names = ("analysis.report", "analysis.widgets", "data.prepare", "quality.common", "quality.contamination",
             "quality.phenomena")
    report, widgets, prepare, common, contamination, phenomena = (
        importlib.import_module(f"smallthinker_lab.{n}") for n in names)
    for module in (common, contamination, phenomena, prepare, report, widgets, analysis_prompts):
        assert module.PROMPT_SETS is PROMPT_SETS, module.__name__
    assert contamination.SET_DOMAIN is SET_DOMAIN
    assert phenomena.read_prompts is contamination.read_prompts is read_prompts
    assert widgets.load_prompt_set is analysis_prompts.load_prompt_set is load_prompt_set
    assert analysis_prompts.REGISTRY is REGISTRY and analysis_prompts.load_prompt_sets is load_prompt_sets


def test_continuation_prompts_follow_the_domain():
    from smallthinker_lab.quality.phenomena import prompt_prefix

    text = "First sentence here, long enough to pass the bound of sixty characters. Second sentence."
    assert prompt_prefix(text, "gsm8k") == text and prompt_prefix(text, "humaneval") == text  # math, code: whole
    assert prompt_prefix(text, "wiki-en") == text[: text.index(".") + 1]  # prose: its first sentence


def test_an_unknown_name_is_a_clear_error():
    with pytest.raises(KeyError, match="no shipped prompt set 'gsm9k'; known sets: gsm8k, humaneval"):
        prompt_source("gsm9k")
    with pytest.raises(FileNotFoundError, match="no prompt set 'gsm9k'.*known sets: gsm8k"):
        load_prompt_set("gsm9k")


def test_bad_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "one"}) + "\n\n" + json.dumps({"id": "b"}) + "\n", "utf-8")
    assert load_prompt_set(path, 1) == ["one"] and load_prompt_set(path, 1).name == "mine"
    with pytest.raises(ValueError, match=r"mine.jsonl line 3: not a JSON object with a 'text' field"):
        load_prompt_set(path)
    assert [r["id"] for r in read_prompts(path)] == ["a", "b"]
    assert read_prompts(path, 0) == [] and load_prompt_set(path, 0) == []
    path.write_text('{"text": "ok"}\n[1, 2]\n', "utf-8")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        read_prompts(path)
    path.write_text('{"text": "ok"}\n{"text": \n', "utf-8")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        read_prompts(path)


def test_load_prompt_sets_defaults_to_the_registry_in_its_order():
    sets = load_prompt_sets(max_prompts=2)
    assert list(sets) == list(PROMPT_SETS) and all(len(v) == 2 for v in sets.values())
    given = load_prompt_sets({"mine": ["a", "b", "c"]}, max_prompts=2)
    assert given == {"mine": ["a", "b"]} and given["mine"].name == "mine"
    assert prompt_sets.__all__ == analysis_prompts.__all__
