"""Every notebook runs top to bottom in a fresh kernel with small parameters; the committed files carry no outputs;
each .ipynb is in step with its py:percent script (jupytext pairs them: notebooks/jupytext.toml)."""

from __future__ import annotations

import ast
import os
import time
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.compare import NotebookDifference, compare_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# the model the notebooks run on; another checkpoint folder can be given for a local run
MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")

# small parameters per notebook (THREADS=1: the tiny model gains nothing from more, and a busy machine loses a lot)
SMALL = {
    "01_tour": dict(MAX_NEW_TOKENS=8),
    "02_expert_specialization": dict(MAX_PROMPTS=2, MAX_NEW_TOKENS=4),
    "03_neuron_sparsity": dict(MAX_PROMPTS=2, MAX_NEW_TOKENS=4, TIMING_PROMPTS=1),
    "04_kv_cache": dict(MAX_PROMPTS=1, MAX_NEW_TOKENS=8),
    "05_offloading_throughput": dict(PROMPT_SETS=["gsm8k", "zh-news"], BENCH_PROMPTS=1, MAX_NEW_TOKENS=4),
    "06_memory_limit_explorer": dict(PROMPT_SETS=["gsm8k", "humaneval"], MAX_PROMPTS=1, MAX_NEW_TOKENS=4),
    "07_interventions": dict(M=2, SEEDS=[0], N_PROFILE=2, N_EVAL=2, MAX_TOKENS=32, MAX_NEW_TOKENS=6),
    "08_dense_vs_moe_and_drafting": dict(PROMPT_SETS=["gsm8k", "zh-news"], MAX_PROMPTS=1, MAX_NEW_TOKENS=8,
                                         DRAFT_TOKENS=[2]),
}
# text a notebook must print when it runs: the properties it shows a user
EXPECT = {
    "01_tour": ["same tokens as in memory: True"],
    "03_neuron_sparsity": ["same tokens dense and sparse: True"],
    "04_kv_cache": ["recorded bytes equal the analytic formula at every step: True"],
    "07_interventions": ["identity hook leaves logits bit-identical: True",
                         "routing recorded equals the forced experts: True"],
    "08_dense_vs_moe_and_drafting": ["greedy outputs equal the target's: True"],
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(nb) -> nbformat.NotebookNode:
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged parameters"
    return code[0]


def with_parameters(nb, **values) -> nbformat.NotebookNode:
    """Replace the parameters cell's source: its defaults, then the given values (names must exist there)."""
    cell = parameters_cell(nb)
    names = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    unknown = set(values) - names
    assert not unknown, f"not parameters of this notebook: {sorted(unknown)}"
    cell.source = cell.source + "\n# injected by the tests\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_every_notebook_has_small_parameters():
    names = [p.stem for p in notebook_paths()]
    assert names == sorted(SMALL), f"notebooks {names} vs test parameters {sorted(SMALL)}"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_committed_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    parameters_cell(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs committed"


def test_every_notebook_is_paired_with_a_script():
    notebooks = {p.stem for p in notebook_paths()}
    scripts = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")}
    assert notebooks and notebooks == scripts, f"unpaired: {sorted(notebooks ^ scripts)}"
    config = tomllib.loads((NOTEBOOKS / "jupytext.toml").read_text(encoding="utf-8"))
    assert config.get("formats") == "ipynb,py:percent", "notebooks/jupytext.toml pairs each .ipynb with a .py"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_in_sync_with_its_script(path):
    """The .ipynb holds exactly the cells (sources, kinds, tags) and metadata of its py:percent script."""
    script = path.with_suffix(".py")
    try:
        compare_notebooks(nbformat.read(path, as_version=4), jupytext.read(script, fmt="py:percent"),
                          fmt="py:percent", allow_expected_differences=False)
    except NotebookDifference as e:
        pytest.fail(f"{path.name} differs from {script.name} ({e}); run: jupytext --sync notebooks/{script.name}")


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel imports the checkout, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = with_parameters(nbformat.read(path, as_version=4), MODEL=MODEL, THREADS=1, **SMALL[path.stem])
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    text = outputs_text(nb)
    for expected in EXPECT.get(path.stem, []):
        assert expected in text, f"{path.name} did not print {expected!r}"
