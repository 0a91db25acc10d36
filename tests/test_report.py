"""``smallthinker-lab report`` on the default model (small options): every file it lists exists, the PNGs are not
blank, the CSVs parse, index.html shows them with relative links and no JavaScript."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smallthinker_lab import cli
from smallthinker_lab.analysis.report import limit_for_share, resolve_limit, resolve_threads

MODEL = os.environ.get("SMALLTHINKER_TEST_MODEL", "default")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("report") / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["report", "--model", MODEL, "--out", str(out), "--max-prompts", "2", "--max-new-tokens", "4",
                       "--bench-prompts", "1", "--no-progress"])
    assert rc == 0
    lines = buf.getvalue().splitlines()
    files = [Path(line) for line in lines if not line.startswith("report:")]
    return out, files


def test_writes_every_file_it_lists(report):
    out, files = report
    assert files and files[-1].name == "index.html"
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f
        assert f.parent == out
    names = {f.name for f in files}
    for expected in ("expert_heatmaps.png", "expert_frequency_distribution.png", "sparsity_boxplots.png",
                     "kv_per_layer.png", "kv_vs_context.png", "hit_rate_curves.png", "throughput.png",
                     "throughput_table.csv", "ablation_table.csv", "expert_frequency.csv", "sparsity_table.csv",
                     "kv_table.csv", "hit_rate_curves.csv"):
        assert expected in names


def test_pngs_are_not_blank(report):
    from matplotlib.image import imread

    _, files = report
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) >= 7
    for f in pngs:
        img = imread(f)[..., :3]
        assert img.shape[0] > 100 and img.shape[1] > 100, f
        assert img.std() > 0.05, f"{f.name} looks blank (pixel std {img.std():.4f})"
        # more than a frame: a good share of the pixels differ from the background
        assert (np.abs(img - img[0, 0]).sum(axis=-1) > 0.1).mean() > 0.02, f


def test_csvs_parse_and_throughput_rows(report):
    out, files = report
    for f in files:
        if f.suffix == ".csv":
            assert len(pd.read_csv(f)) > 0, f
    bench = pd.read_csv(out / "bench_runs.csv")
    assert set(bench["mode"]) == {"in_memory", "offload"}
    off = bench[bench["mode"] == "offload"]
    assert {"lru", "lfu"} <= set(off["policy"])
    assert {True, False} <= set(off["prefetch"])
    assert (bench["decode_tok_s"] > 0).all()
    # the cache that holds every expert; the minimum (top-k experts) never hits
    assert off["limit_share_of_expert_bytes"].max() == 1.0
    assert off.loc[off["variant"] == "no cache", "hit_rate"].eq(0.0).all()
    freq = pd.read_csv(out / "expert_frequency.csv")
    assert set(freq["dataset"]) == {"gsm8k", "humaneval", "wiki-en", "zh-news"}
    sums = freq.groupby(["dataset", "layer"])["frequency"].sum()  # top_k per layer
    assert np.allclose(sums, sums.iloc[0])


def test_measured_lru_points_sit_on_their_curve(report):
    out, _ = report
    bench = pd.read_csv(out / "bench_runs.csv")
    curves = pd.read_csv(out / "hit_rate_curves.csv")
    lru = curves[curves["policy"] == "lru"].set_index("capacity_experts")["hit_rate"]
    runs = bench[(bench["mode"] == "offload") & (bench["policy"] == "lru") & (bench["prefetch"])]
    assert len(runs) >= 3
    # a cache of at least one layer's experts: requests come in the order of the traced run
    per_layer = curves["capacity_experts"].max() / pd.read_csv(out / "expert_frequency.csv")["layer"].nunique()
    for _, r in runs[runs["capacity_experts"] >= per_layer].iterrows():
        assert r["hit_rate"] == pytest.approx(lru[int(r["capacity_experts"])], abs=1e-12)


def test_index_html_is_static_and_relative(report):
    out, files = report
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=['"](https?:|//|/)""", html), "links must be relative"
    for f in files[:-1]:
        if f.suffix == ".png":
            assert f"<img src='{f.name}'" in html
        else:
            assert f"href='{f.name}'" in html
    for ref in re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html):
        assert (out / ref).is_file(), ref


def test_memory_limit_forms():
    plan = {"expert_slot_bytes": 4096, "total_expert_bytes": 4096 * 100, "fixed_bytes": 10_000,
            "minimum_bytes": 10_000 + 4 * 4096}
    assert resolve_limit("50%", plan) == 10_000 + 50 * 4096
    assert resolve_limit("0%", plan) == plan["minimum_bytes"]
    assert resolve_limit("100%", plan) == limit_for_share(plan, 1.0) == 10_000 + 100 * 4096
    assert resolve_limit("2MiB", plan) == 2 * 2**20
    assert resolve_limit(None, plan) is None
    with pytest.raises(ValueError):
        resolve_limit("150%", plan)


def test_threads_auto():
    assert resolve_threads("auto", "default") == 1  # hidden size 256: one thread
    assert resolve_threads(4, "default") == 4 and resolve_threads("3", "default") == 3
    assert resolve_threads(None, "default") is None


class _Cells(HTMLParser):
    """The text of every th/td of an HTML page, one list per <tr>, per <table>."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None


def test_index_html_tables_show_every_cell_escaped():
    from smallthinker_lab.analysis.report import _html

    df = pd.DataFrame({"mode": ["<b>in memory</b>", "a & b"], "tok/s": [1234.5, np.nan], "n": [3, 4],
                       "share": [np.float32(0.12345), 2.0]})
    page = _html({"model": "m<1>", "wall time": "3 s"}, {}, {"t.csv": (df, "Throughput")}, ["t.csv"])
    assert "<b>" not in page and "<script" not in page
    parser = _Cells()
    parser.feed(page)
    summary, table = parser.tables
    assert summary == [["model", "m<1>"], ["wall time", "3 s"]]
    assert table == [["mode", "tok/s", "n", "share"], ["<b>in memory</b>", "1,234", "3", "0.123"],
                     ["a & b", "", "4", "2"]]


def test_report_says_what_locality_buys(report):
    """The locality table (trained vs uniform routing at the report's limit, cold) and its paragraph, with the
    table's measured hit rates."""
    out, _ = report
    df = pd.read_csv(out / "locality_table.csv").set_index("routing")
    assert list(df.index) == ["trained", "uniform"]
    assert ((df["hit_rate"] + df["compulsory_share"] + df["capacity_share"]).round(9) == 1.0).all()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "What locality buys" in html
    assert f"{df.loc['trained', 'hit_rate']:.1%}" in html and f"{df.loc['uniform', 'hit_rate']:.1%}" in html
