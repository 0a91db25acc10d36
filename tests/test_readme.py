"""The README's commands and example are what users run first: they must work as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _command(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    out = subprocess.run(["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == _command("test-command")
    assert "pytest" in out and "pip install" in out
    assert 'cmd=$(awk' in (ROOT / ".ci/run").read_text() and 'bash -c "$cmd"' in (ROOT / ".ci/run").read_text()


def test_main_command_runs_the_report_on_the_default_model():
    cmd = _command("main-command")
    assert "pip install" in cmd and "smallthinker-lab report" in cmd


def test_cli_lists_every_documented_command():
    out = subprocess.run([sys.executable, "-m", "smallthinker_lab.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("report", "generate", "convert", "data", "train"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
        assert f"smallthinker-lab {command}" in README


def test_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.+?)\n```", README, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "728.0 MiB of KV cache at 16K tokens" in res.stdout
