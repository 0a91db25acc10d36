"""Notebook 06 in a real browser: JupyterLab on 127.0.0.1 with a token, headless Debian chromium driven by playwright;
run all cells, move the memory-limit slider with the keyboard, and the displayed predicted hit rate changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PARAMS = dict(MODEL=MODEL, PROMPT_SETS=["gsm8k", "humaneval"], MAX_PROMPTS=1, MAX_NEW_TOKENS=4, RUN_AT_START=False,
              THREADS=1)


def _requirements() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install playwright)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(root: Path) -> Path:
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "06_memory_limit_explorer.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in PARAMS.items())
    path = root / "explorer.ipynb"
    nbformat.write(nb, path)
    return path


def _settings(home: Path) -> dict[str, str]:
    """A private JupyterLab configuration: no news or update checks, no saved workspace."""
    settings = home / "lab-settings"
    d = settings / "@jupyterlab" / "apputils-extension"
    d.mkdir(parents=True)
    (d / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython")}
    return env


def _start_server(root: Path, home: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(_settings(home))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.token={token}", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=root,
                            start_new_session=True)


def _wait_for_server(proc: subprocess.Popen, port: int, token: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started for it
            proc.wait(timeout=10)


def _wait_idle(page, timeout: float) -> None:
    """Until the status bar shows the kernel idle; a kernel-selection dialog that some first opens show is
    accepted (the notebook's own kernel)."""
    deadline = time.monotonic() + timeout
    time.sleep(1.0)  # let a just-submitted execution turn the kernel busy first
    while "Idle" not in page.inner_text("#jp-main-statusbar"):
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
        assert time.monotonic() < deadline, f"the kernel did not become idle within {timeout:.0f} s"
        time.sleep(0.5)


def _percent(text: str) -> str:
    m = re.search(r"([0-9.]+)%", text)
    assert m, text
    return m.group(1)


def test_explorer_slider_moves_the_predicted_hit_rate(tmp_path):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    nb = _notebook(root)
    port, token = _free_port(), os.urandom(16).hex()
    log = tmp_path / "jupyter.log"
    shot = tmp_path / "explorer.png"
    proc = _start_server(root, home, port, token, log)
    try:
        _wait_for_server(proc, port, token, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Notebook")
                _wait_idle(page, 60)
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

                predicted = page.locator(".st-predicted-hit-rate")
                predicted.wait_for(timeout=300_000)  # the first trace is recorded when the explorer starts
                _wait_idle(page, 300)  # every cell has run: the kernel answers the widgets at once
                before = predicted.inner_text()
                assert "Predicted hit rate" in before and "%" in before
                readout = page.locator(".st-limit-slider .widget-readout")
                limit_before = readout.inner_text()
                assert f"at {limit_before} MiB" in before

                handle = page.locator(".st-limit-slider .noUi-handle").first
                handle.scroll_into_view_if_needed()
                handle.focus()
                handle.press("Home")  # the minimum working set: only the top-k experts fit
                page.wait_for_function(
                    """([before, sel]) => {
                        const e = document.querySelector('.st-predicted-hit-rate');
                        const r = document.querySelector(sel);
                        const pct = s => (s.match(/([0-9.]+)%/) || [])[1];
                        return e && r && pct(e.innerText) !== pct(before) && e.innerText.includes(r.innerText + ' MiB');
                    }""", arg=[before, ".st-limit-slider .widget-readout"], timeout=60_000)
                after = predicted.inner_text()
                limit_after = readout.inner_text()
                assert float(limit_after) < float(limit_before)
                assert _percent(after) != _percent(before) and f"at {limit_after} MiB" in after
                handle.press("End")  # every expert fits
                page.wait_for_function(
                    """([before, sel]) => {
                        const e = document.querySelector('.st-predicted-hit-rate');
                        const r = document.querySelector(sel);
                        const pct = s => (s.match(/([0-9.]+)%/) || [])[1];
                        return e && r && pct(e.innerText) !== pct(before) && e.innerText.includes(r.innerText + ' MiB');
                    }""", arg=[after, ".st-limit-slider .widget-readout"], timeout=60_000)
                assert float(readout.inner_text()) > float(limit_before)
                assert "100%" in page.locator(".st-limit-share").inner_text()

                # Run: the engine opens under that limit; measured stats and per-layer bars appear
                page.locator(".st-run").first.click()
                page.wait_for_function(
                    "() => { const e = document.querySelector('.st-measured');"
                    " return e && e.innerText.includes('measured hit rate'); }", timeout=300_000)
                page.locator(".st-layer-bars img").first.wait_for(timeout=60_000)
                measured = page.locator(".st-measured").inner_text()
                assert "tok/s" in measured and "I/O wait" in measured
                assert page.locator(".st-generated-text").inner_text().strip()
                page.locator(".st-layer-bars").scroll_into_view_if_needed()
                page.screenshot(path=str(shot))
                if os.environ.get("SMALLTHINKER_SCREENSHOT_DIR"):
                    shutil.copy(shot, Path(os.environ["SMALLTHINKER_SCREENSHOT_DIR"]) / shot.name)
            finally:
                browser.close()
    finally:
        _stop_server(proc)
    assert shot.stat().st_size > 10_000
