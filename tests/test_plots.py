"""Plots and tables on small synthetic frames in the instruments' tidy formats (Agg backend, no display)."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("seaborn")

from smallthinker_lab import SmallThinkerConfig, kv_cache_bytes, plots, tables  # noqa: E402

DATASETS = ("gsm8k", "humaneval", "wiki-en", "wiki-zh")


# ---------------------------------------------------------------------------------------------- synthetic frames
def make_freq(n_layers=8, n_experts=32, k=4, datasets=DATASETS, seed=0):
    """(dataset, layer, expert, frequency): per layer ~a quarter of the experts hot (0.4-0.6), the rest cold;
    frequencies sum to k over the experts of a layer, as the instruments' expert_frequency does."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, ds in enumerate(datasets):
        for layer in range(n_layers):
            w = rng.gamma(0.3, 1.0, n_experts)
            hot = rng.choice(n_experts, n_experts // 4, replace=False)
            w[hot] += 2.5 + d * 0.1
            f = k * w / w.sum()
            rows += [(ds, layer, e, float(f[e])) for e in range(n_experts)]
    return pd.DataFrame(rows, columns=["dataset", "layer", "expert", "frequency"])


def make_neurons(n_layers=8, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        centre = 0.95 - 0.3 * layer / max(1, n_layers - 1)
        s = np.clip(rng.normal(centre, 0.08, n), 0, 1)
        rows += [("gsm8k", 0, i, layer, int(rng.integers(32)), int(v * 768), 768, float(v)) for i, v in enumerate(s)]
    return pd.DataFrame(rows, columns=["dataset", "step", "position", "layer", "expert", "inactive", "ffn",
                                       "sparsity"])


def make_kv(config, prompts=(10, 20), new_tokens=3):
    """The instruments' kv frame: per sequence a prefill step then decode steps."""
    rows = []
    for seq, prompt in enumerate(prompts):
        for step in range(new_tokens):
            context = prompt + step
            for layer, b in enumerate(kv_cache_bytes(config, context, per_layer=True)):
                kind = "sliding" if config.is_sliding(layer) else "global"
                rows.append(("gsm8k", seq, step, "prefill" if step == 0 else "decode", layer, kind, context, b))
    return pd.DataFrame(rows, columns=["dataset", "sequence", "step", "phase", "layer", "attention", "context",
                                       "bytes"])


EXPERT_BYTES = 7_077_888  # one 4B expert in bf16


def make_curves(n_experts=128):
    cap = np.arange(0, n_experts + 1, 4)
    frac = cap / n_experts
    rows = []
    for policy, curve in (("lru", frac ** 0.8), ("lfu", frac ** 0.7), ("belady", frac ** 0.45)):
        rows += [(policy, int(c), int(c) * EXPERT_BYTES, float(h)) for c, h in zip(cap, curve)]
    return pd.DataFrame(rows, columns=["policy", "capacity_experts", "capacity_bytes", "hit_rate"])


def make_bench():
    cols = ["mode", "device", "memory_limit", "limit_share_of_expert_bytes", "policy", "prefetch", "prefill_tok_s",
            "decode_tok_s", "hit_rate", "bytes_read_per_token", "bound_share"]
    gib = 2**30
    rows = [
        ("in_memory", "cpu", None, None, None, None, 120.0, 30.0, 1.0, 906 * 2**20, 0.71),
        ("offload", "cpu", 2 * gib, 0.28, "lru", True, 80.0, 21.0, 0.62, 350 * 2**20, 0.66),
        ("offload", "cpu", 2 * gib, 0.28, "lru", False, 78.0, 17.0, 0.62, 350 * 2**20, 0.52),
        ("offload", "cpu", 2 * gib, 0.28, "none", False, 40.0, 8.0, 0.0, 906 * 2**20, 0.40),
        ("naive", "cpu", 2 * gib, 0.28, "none", False, 30.0, 5.0, 0.0, 906 * 2**20, 0.30),
        ("offload", "cpu", gib, 0.14, "lru", True, 60.0, 12.0, 0.41, 530 * 2**20, 0.58),
    ]
    return pd.DataFrame(rows, columns=cols)


def make_log(n=200, seed=0):
    rng = np.random.default_rng(seed)
    step = np.arange(n)
    ce = 8.0 * np.exp(-step / 50) + 2.5 + rng.normal(0, 0.1, n)
    balance = 0.01 + 0.002 * rng.random(n)
    return pd.DataFrame({"step": step, "loss": ce + balance, "ce": ce, "balance": balance})


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def assert_not_blank(fig, tmp_path, name="plot.png"):
    path = tmp_path / name
    fig.savefig(path, dpi=60)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img[..., :3].var() > 0


# ---------------------------------------------------------------------------------------------- plots
def test_expert_heatmaps_one_panel_per_dataset_shared_scale(tmp_path):
    freq = make_freq()
    fig = plots.plot_expert_heatmaps(freq)
    heat_axes = [ax for ax in fig.axes if ax.collections and ax.get_title() in DATASETS]
    assert [ax.get_title() for ax in heat_axes] == list(DATASETS)
    meshes = [ax.collections[0] for ax in heat_axes]
    assert all(np.size(m.get_array()) == 8 * 32 for m in meshes)
    limits = {m.get_clim() for m in meshes}
    assert len(limits) == 1 and limits.pop() == (0.0, pytest.approx(freq["frequency"].max()))
    colorbars = [ax for ax in fig.axes if ax not in heat_axes]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "activation frequency"
    assert_not_blank(fig, tmp_path)


def test_expert_heatmaps_on_given_axes_sorted_and_vmax():
    freq = make_freq(datasets=("a", "b"))
    fig, axes = plt.subplots(1, 2)
    out = plots.plot_expert_heatmaps(freq, axes=axes, vmax=0.8, sort_experts=True, cbar=False)
    assert out is fig and len(fig.axes) == 2
    assert axes[0].collections[0].get_clim() == (0.0, 0.8)
    # sorted: every layer's row is non-increasing in the summed frequency
    values = [ax.collections[0].get_array().reshape(8, 32) for ax in axes]
    total = values[0] + values[1]
    assert (np.diff(total, axis=1) <= 1e-12).all()
    with pytest.raises(ValueError):
        plots.plot_expert_heatmaps(freq, axes=axes[:1])


def test_expert_frequency_distribution_threshold_and_share(tmp_path):
    freq = make_freq()
    ax = plots.plot_expert_frequency_distribution(freq, threshold=0.14)
    assert len(ax.get_lines()) >= len(DATASETS) + 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    share = (freq[freq.dataset == "gsm8k"].frequency < 0.14).mean()
    assert labels[0] == f"gsm8k: {share:.0%} under 0.14"
    assert any(list(line.get_xdata()) == [0.14, 0.14] for line in ax.get_lines())
    assert_not_blank(ax.figure, tmp_path)


def test_sparsity_boxplots_one_box_per_layer(tmp_path):
    neurons = make_neurons()
    fig, ax = plt.subplots()
    out = plots.plot_sparsity_boxplots(neurons, ax=ax)
    assert out is ax
    assert len(ax.patches) == 8  # one box per layer
    assert ax.get_ylim()[0] == 0.0 and 1.0 <= ax.get_ylim()[1] <= 1.05
    medians = sorted((line for line in ax.get_lines() if line.get_color() == "black" and len(line.get_xdata()) == 2),
                     key=lambda line: np.mean(line.get_xdata()))
    expected = neurons.groupby("layer").sparsity.median().to_numpy()
    assert np.allclose([line.get_ydata()[0] for line in medians], expected)
    # whiskers reach the minimum and maximum of each layer
    ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
    assert np.isclose(ys.min(), neurons.sparsity.min()) and np.isclose(ys.max(), neurons.sparsity.max())
    ref = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(ref) == 1 and ref[0].get_ydata()[0] == 0.6 and "median" in ref[0].get_label()
    # early-to-late gradient: every box has its own colour
    assert len({tuple(p.get_facecolor()) for p in ax.patches}) == 8
    assert_not_blank(fig, tmp_path)


def test_kv_per_layer_from_frame_and_from_bytes(tmp_path):
    cfg = SmallThinkerConfig.from_name("smallthinker-test")
    kv = make_kv(cfg, prompts=(5, 20))
    ax = plots.plot_kv_per_layer(kv, unit="B")  # the biggest state: sequence 1 at its last step, 22 tokens
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == cfg.num_hidden_layers
    assert sorted(heights) == sorted(kv_cache_bytes(cfg, 22, per_layer=True))
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"global", "sliding"}
    assert ax.get_title(loc="left").endswith("at 22 tokens")
    ax1 = plots.plot_kv_per_layer(kv, step=0, unit="B")  # step 0 averaged over the two sequences
    expected = (np.array(kv_cache_bytes(cfg, 5, per_layer=True)) + kv_cache_bytes(cfg, 20, per_layer=True)) / 2
    assert sorted(p.get_height() for p in ax1.patches) == sorted(expected)
    assert_not_blank(ax.figure, tmp_path)
    fig, ax2 = plt.subplots()
    assert plots.plot_kv_per_layer(kv_cache_bytes(cfg, 20, per_layer=True), config=cfg, ax=ax2) is ax2
    assert len(ax2.patches) == cfg.num_hidden_layers


def test_kv_vs_context_hybrid_below_all_global(tmp_path):
    configs = {"4B": SmallThinkerConfig.from_name("smallthinker-4b-a0.6b"),
               "21B": SmallThinkerConfig.from_name("smallthinker-21b-a3b")}
    ax = plots.plot_kv_vs_context(configs)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"4B (every layer global)", "21B, all global", "21B, hybrid (2.91x smaller at 32K)"}
    hybrid = lines["21B, hybrid (2.91x smaller at 32K)"].get_ydata()
    full = lines["21B, all global"].get_ydata()
    assert len(hybrid) == 6 and (hybrid <= full).all() and hybrid[-1] < full[-1]
    assert hybrid[4] == pytest.approx(728.0)  # 16K on the 21B: 2 KiB * (13 * 16384 + 39 * 4096)
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1K", "2K", "4K", "8K", "16K", "32K"]
    assert_not_blank(ax.figure, tmp_path)


def test_hit_rate_curves_belady_is_the_dashed_ceiling(tmp_path):
    curves = make_curves()
    measured = pd.DataFrame({"policy": ["lru", "lru"], "capacity_bytes": [32 * EXPERT_BYTES, 64 * EXPERT_BYTES],
                             "hit_rate": [0.33, 0.57]})
    fig, ax = plt.subplots()
    out = plots.plot_hit_rate_curves(curves, measured=measured, ax=ax, limit=40 * EXPERT_BYTES,
                                     total_bytes=128 * EXPERT_BYTES)
    assert out is ax
    lines = {line.get_label(): line for line in ax.get_lines()}
    belady, lru = lines["optimal (Belady)"], lines["LRU"]
    assert belady.get_linestyle() == "--"
    assert (belady.get_ydata() >= lru.get_ydata()).all() and (belady.get_ydata() > lru.get_ydata()).any()
    assert np.isclose(lru.get_xdata().max(), 128 * EXPERT_BYTES / 2**20)  # MiB
    points = [c for c in ax.collections if c.get_label() == "measured (LRU)"]
    assert len(points) == 1 and np.allclose(points[0].get_offsets()[:, 1], [0.33, 0.57])
    assert ax.get_xlabel().endswith("(MiB)")
    assert_not_blank(fig, tmp_path)
    ax2 = plots.plot_hit_rate_curves(curves.drop(columns="capacity_bytes"))
    assert ax2.get_xlabel().endswith("(experts)")
    small = curves.assign(capacity_bytes=curves.capacity_experts * 1024)
    ax3 = plots.plot_hit_rate_curves(small, unit="auto")
    assert ax3.get_xlabel().endswith("(KiB)") and ax3.get_lines()[0].get_xdata().max() == 128


def test_throughput_bars_with_bound_share(tmp_path):
    bench = make_bench()
    ax = plots.plot_throughput(bench)
    assert [p.get_width() for p in ax.patches] == list(bench.decode_tok_s)
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "30.0 tok/s · 71% of bound"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(bench) and len(set(labels)) == len(labels)
    assert_not_blank(ax.figure, tmp_path)


def test_loss_curve_smoothing(tmp_path):
    log = make_log()
    ax = plots.plot_loss_curve(log, smooth=10)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss", "ce", "balance"]
    smoothed = [line for line in ax.get_lines() if line.get_label() == "ce"][0]
    assert np.allclose(smoothed.get_ydata(), log.ce.rolling(10, min_periods=1).mean())
    assert_not_blank(ax.figure, tmp_path)


# ---------------------------------------------------------------------------------------------- tables
def test_throughput_table_rows_columns_and_ratio():
    bench = make_bench()
    t = tables.throughput_table(bench)
    assert list(t.columns) == ["mode", "memory limit", "limit / expert bytes", "policy", "prefetch", "prefill tok/s",
                               "decode tok/s", "decode vs in memory", "hit rate", "MiB read / token",
                               "share of bound"]
    assert len(t) == len(bench)
    assert list(t["memory limit"]) == ["in memory", "2 GiB", "2 GiB", "2 GiB", "2 GiB", "1 GiB"]
    assert t["decode vs in memory"].iloc[1] == pytest.approx(21.0 / 30.0)
    assert t["MiB read / token"].iloc[0] == pytest.approx(906.0)
    assert list(t["prefetch"][1:3]) == ["on", "off"]


def test_ablation_table_variants_and_speedup():
    t = tables.ablation_table(make_bench())
    two = t[t["memory limit"] == "2 GiB"]
    assert list(two["variant"]) == ["full", "no prefetch", "no cache", "naive offload"]
    assert two["speedup vs naive"].tolist() == pytest.approx([21 / 5, 17 / 5, 8 / 5, 1.0])
    assert t["variant"].iloc[0] == "in memory"
    one = t[t["memory limit"] == "1 GiB"]
    assert one["variant"].tolist() == ["full"] and one["speedup vs naive"].isna().all()


def test_kv_table_saving_ratio_21b_16k():
    t = tables.kv_table(["smallthinker-21b-a3b", "smallthinker-4b-a0.6b"], contexts=(1024, 16384))
    assert list(t.columns) == ["model", "context", "hybrid MiB", "all-global MiB", "saving ratio", "saved"]
    assert len(t) == 4
    row = t[(t.model == "smallthinker-21b-a3b") & (t.context == 16384)].iloc[0]
    assert row["saving ratio"] == pytest.approx(52 * 16384 / (13 * 16384 + 39 * 4096))
    assert row["hybrid MiB"] == pytest.approx(728.0)
    assert row["all-global MiB"] == pytest.approx(1664.0)
    short = t[(t.model == "smallthinker-21b-a3b") & (t.context == 1024)].iloc[0]
    assert short["saving ratio"] == 1.0  # shorter than the window: nothing saved
    four = t[t.model == "smallthinker-4b-a0.6b"]
    assert (four["saving ratio"] == 1.0).all()  # the released 4B is all global
    cfg = SmallThinkerConfig.from_name("smallthinker-tiny")
    t2 = tables.kv_table({"tiny": cfg}, contexts=(512,), dtype="fp32")
    assert t2["hybrid MiB"].iloc[0] == pytest.approx(kv_cache_bytes(cfg, 512, dtype=__import__("torch").float32)
                                                     / 2**20)


def test_expert_usage_table_shares_and_js():
    freq = make_freq()
    js = pd.DataFrame({"layer": [0, 0, 1], "dataset_a": ["gsm8k", "gsm8k", "humaneval"],
                       "dataset_b": ["humaneval", "wiki-en", "wiki-zh"], "js_divergence": [0.1, 0.3, 0.5]})
    t = tables.expert_usage_table(freq, js=js)
    assert list(t["dataset"]) == list(DATASETS)
    g = freq[freq.dataset == "humaneval"].frequency
    row = t.set_index("dataset").loc["humaneval"]
    assert row["share < 0.14"] == pytest.approx((g < 0.14).mean())
    assert row["share ≥ 0.4"] == pytest.approx((g >= 0.4).mean())
    assert row["experts"] == 8 * 32 and row["layers"] == 8
    assert row["mean frequency"] == pytest.approx(4 / 32)  # frequencies sum to k over a layer's experts
    assert row["mean JS divergence"] == pytest.approx(0.3)  # mean of 0.1 and 0.5
    matrix = pd.DataFrame([[0, 0.2], [0.2, 0]], index=["gsm8k", "humaneval"], columns=["gsm8k", "humaneval"])
    t2 = tables.expert_usage_table(freq, js=matrix)
    assert t2.set_index("dataset")["mean JS divergence"].loc["gsm8k"] == pytest.approx(0.2)
    # the instruments' own divergence frame is accepted as it is
    from smallthinker_lab.instruments.metrics import expert_usage_divergence

    div = expert_usage_divergence(freq)
    t3 = tables.expert_usage_table(freq, js=div).set_index("dataset")
    pairs = div[(div.dataset_a == "wiki-zh") | (div.dataset_b == "wiki-zh")]
    assert t3.loc["wiki-zh", "mean JS divergence"] == pytest.approx(pairs.js_divergence.mean())


def test_sparsity_table_per_layer():
    neurons = make_neurons()
    t = tables.sparsity_table(neurons)
    assert list(t.columns) == ["layer", "n", "median", "min", "q25", "q75", "max", "mean"]
    assert list(t.layer) == list(range(8))
    layer3 = neurons[neurons.layer == 3].sparsity
    assert t.loc[3, "median"] == pytest.approx(layer3.median()) and t.loc[3, "max"] == pytest.approx(layer3.max())


def parse_markdown(md):
    lines = md.strip().splitlines()
    assert re.fullmatch(r"\|( ?:?-+:? ?\|)+", lines[1])
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
    return split(lines[0]), [split(line) for line in lines[2:]]


def test_to_markdown_parses_back():
    df = pd.DataFrame({"mode": ["in memory", "a|b"], "tok/s": [30.19, 20.3], "n": [3, 4],
                       "share": [0.6234, float("nan")]})
    md = tables.to_markdown(df, floatfmt={"share": ".2f"})
    header, rows = parse_markdown(md)
    assert header == ["mode", "tok/s", "n", "share"]
    assert rows == [["in memory", "30.19", "3", "0.62"], ["a|b", "20.30", "4", ""]]
    assert md.splitlines()[1].split("|")[2].strip().endswith(":")  # numbers right-aligned
    # a non-default index is written as the first column
    header, rows = parse_markdown(tables.to_markdown(df.set_index("mode")[["n"]]))
    assert header == ["mode", "n"] and rows[0] == ["in memory", "3"]
    # a real table round-trips cell by cell
    kv = tables.kv_table(["smallthinker-21b-a3b"], contexts=(16384,))
    header, rows = parse_markdown(tables.to_markdown(kv, floatfmt=".4f"))
    assert header == list(kv.columns)
    assert rows[0] == ["smallthinker-21b-a3b", "16384"] + [format(v, ".4f") for v in kv.iloc[0, 2:]]
