"""A built wheel works anywhere: installed into a fresh venv, run from an empty folder, it finds the default model
and the prompt sets in its package data and generates through the engine, with the shipped draft too.

smallthinker_lab comes only from the wheel: the fresh venv reaches the shared venv's site-packages (torch and the
other dependencies) through a .pth line, which puts that folder on sys.path without running its .pth files, so
the shared venv's editable install of the checkout is not active there; the test checks where the package came
from.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
from pathlib import Path
import smallthinker_lab as sl
import smallthinker_lab.prompt_sets
from smallthinker_lab.analysis.widgets import load_prompt_set
model = sl.load_model("default")
prompts = load_prompt_set("gsm8k", 2)
draft = sl.load_model("smallthinker-tiny-draft")
with sl.Engine.from_pretrained("default", memory_limit="40MiB", progress=False) as engine:
    out = engine.generate(prompts[0][:200], 4, stop_tokens=[])
    spec = engine.generate(prompts[0][:200], 4, stop_tokens=[], draft=draft, draft_tokens=2)
print(json.dumps({"package": sl.__file__, "model": model.name_or_path, "layers": model.config.num_hidden_layers,
                  "draft": draft.name_or_path, "draft_tokens": len(spec.tokens),
                  "prompts": len(prompts), "first": prompts[0][:9], "sets": sorted(sl.prompt_sets.PROMPT_SETS),
                  "tokens": len(out.tokens), "text": out.text, "path": sys.path}))
"""


def _run(cmd, **kw):
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _copy_source(dst: Path) -> None:
    """What a build needs from the checkout, without build leftovers, caches or expert bundles."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_data", "expert_bundle*", "training", "corpus", "cache")
    shutil.copytree(ROOT / "smallthinker_lab", dst / "smallthinker_lab", ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "data", dst / "data", ignore=skip)


def test_wheel_in_a_fresh_venv_runs_from_any_folder(tmp_path):
    src, dist, venv, work = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    _copy_source(src)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist])
    (wheel,) = dist.glob("smallthinker_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = "smallthinker_lab/_data/"
    assert data + "models/smallthinker-tiny/model.safetensors" in names
    assert data + "models/smallthinker-tiny/tokenizer.json" in names
    assert data + "models/smallthinker-tiny-draft/model.safetensors" in names
    assert data + "models/smallthinker-tiny-draft/tokenizer.json" in names
    assert {data + f"prompts/{s}.jsonl" for s in ("gsm8k", "humaneval", "wiki-en", "zh-news")} <= set(names)
    assert not [n for n in names if "expert_bundle" in n or "/training/" in n]

    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co.

    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    got = json.loads(_run([py, "-c", SCRIPT], cwd=work, env=env).strip().splitlines()[-1])
    assert got["package"].startswith(str(site / "smallthinker_lab"))  # the wheel's copy, not the checkout's
    shared = sysconfig.get_paths()["purelib"]  # torch & co. (inside the checkout when its venv is .venv)
    assert not [p for p in got["path"] if p.startswith(str(ROOT)) and not p.startswith(shared)]
    assert got["model"] == str(site / "smallthinker_lab" / "_data" / "models" / "smallthinker-tiny")
    assert got["layers"] == 8 and got["prompts"] == 2 and got["first"] == "Question:"
    assert got["draft"] == str(site / "smallthinker_lab" / "_data" / "models" / "smallthinker-tiny-draft")
    assert got["draft_tokens"] == 4
    assert got["tokens"] == 4 and isinstance(got["text"], str)

    version = _run([venv / "bin" / "smallthinker-lab", "--version"], cwd=work, env=env).strip()
    assert version == f"smallthinker-lab {tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']}"
    assert _run([py, "-m", "smallthinker_lab", "--version"], cwd=work, env=env).strip() == version
