"""One way to give a memory limit: the same strings mean the same bytes in the Engine, the CLI and the report,
and every bad value is a clear error naming it."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from smallthinker_lab.analysis.report import resolve_limit
from smallthinker_lab.engine import Engine
from smallthinker_lab.engine.memory import limit_for_share, resolve_memory_limit

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plan():
    with Engine.from_pretrained("default", memory_limit=None, progress=False) as e:
        return e.memory_plan()


@pytest.mark.parametrize("limit", ["50%", "25%", "100%", "0%", "40MiB", "40000000", 40_000_000, "1.5e7", "unlimited",
                                   None])
def test_the_same_limit_is_the_same_bytes_in_engine_and_report(plan, limit):
    try:
        want = resolve_limit(limit, plan)
    except ValueError:  # "1.5e7" is no size form: both must refuse it
        with pytest.raises(ValueError):
            Engine.from_pretrained("default", memory_limit=limit, progress=False)
        return
    assert want == resolve_memory_limit(limit, plan)
    with Engine.from_pretrained("default", memory_limit=limit, progress=False) as e:
        assert e.plan.limit == want
        if isinstance(limit, str) and limit.endswith("%"):
            share = float(limit[:-1]) / 100
            slots = plan["total_expert_bytes"] // plan["expert_slot_bytes"]
            assert e.plan.capacity_experts == max(math.floor(share * slots), e.config.top_k)
            assert e.plan.limit == limit_for_share(plan, share)


@pytest.mark.parametrize("bad", ["", "  ", "nan", "inf", "-1", "-5MiB", "abc", "12 parsecs", "150%", "-3%", "x%",
                                 float("nan"), float("inf"), -1, 0, True])
def test_bad_limits_are_clear_errors_everywhere(plan, bad):
    with pytest.raises(ValueError) as e_engine:
        Engine.from_pretrained("default", memory_limit=bad, progress=False)
    with pytest.raises(ValueError) as e_report:
        resolve_limit(bad, plan)
    for err in (e_engine.value, e_report.value):
        named = "empty" in str(err) if isinstance(bad, str) and not bad.strip() else repr(bad) in str(err) or \
            str(bad) in str(err)
        assert named, err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "smallthinker_lab", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_cli_generate_takes_the_same_limits_and_backends():
    r = _cli("generate", "def f():", "--max-new-tokens", "3", "--memory-limit", "50%", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "backend eager" in r.stderr and "limit" in r.stderr
    for bad in ("nan", "", "150%"):
        r = _cli("generate", "def f():", "--max-new-tokens", "3", "--memory-limit", bad)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "memory" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "def f():", "--max-new-tokens", "3", "--backend", "kernels")
    assert r.returncode != 0 and "backend 'kernels' cannot run" in r.stderr and "Traceback" not in r.stderr
