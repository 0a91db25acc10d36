"""Tables as pandas DataFrames: throughput, ablation, KV footprint, expert usage, neuron sparsity.

Pure functions over the instruments' tidy frames and the benchmark rows (issue 7: mode, device, memory_limit,
limit_share_of_expert_bytes, policy, prefetch, prefill_tok_s, decode_tok_s, hit_rate, bytes_read_per_token,
bound_share). Notebooks style the frames; the CLI writes them with ``to_markdown`` (pandas' own, through tabulate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Number
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
MiB = 2**20

# benchmark columns -> table headers, in table order
_BENCH_NUMBERS = {
    "prefill_tok_s": "prefill tok/s",
    "decode_tok_s": "decode tok/s",
    "hit_rate": "hit rate",
    "bytes_read_per_token": "MiB read / token",
    "bound_share": "share of bound",
}
_IN_MEMORY_MODES = {"in_memory", "in-memory", "in memory", "memory", "resident", "dense", "none"}
_ABLATION_ORDER = ("in memory", "full", "no prefetch", "no cache", "naive offload")


# ---------------------------------------------------------------------------------------------- formatting
def format_bytes(n: Any, none: str = "in memory") -> str:
    """1 GiB, 512 MiB, 64 KiB; ``none`` for a missing limit (None/NaN); strings pass through."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return none
    if isinstance(n, str):
        return n
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == round(v) else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def format_context(n: int) -> str:
    """1024 -> '1K', 16384 -> '16K', 1000 -> '1000'."""
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT


def is_in_memory(df: pd.DataFrame, mode: str = "mode", memory_limit: str = "memory_limit") -> pd.Series:
    """Rows run with every weight in memory: no memory limit, or a mode named like 'in_memory'."""
    flag = pd.Series(False, index=df.index)
    if memory_limit in df:
        flag |= df[memory_limit].isna()
    if mode in df:
        flag |= df[mode].astype(str).str.lower().isin(_IN_MEMORY_MODES)
    return flag


def _on_off(v: Any) -> str:
    if _is_missing(v):
        return ""
    if isinstance(v, str):
        return v
    return "on" if bool(v) else "off"


# ---------------------------------------------------------------------------------------------- throughput
def _bench_keys(df: pd.DataFrame, drop_constant: Iterable[str] = ("device",)) -> pd.DataFrame:
    """The descriptive columns of benchmark rows, formatted for reading."""
    keys = pd.DataFrame(index=df.index)
    for col in ("device", "mode"):
        if col in df and not (col in drop_constant and df[col].nunique(dropna=False) <= 1):
            keys[col] = df[col].astype(str)
    if "memory_limit" in df:
        keys["memory limit"] = [format_bytes(v) for v in df["memory_limit"]]
    if "limit_share_of_expert_bytes" in df:
        keys["limit / expert bytes"] = df["limit_share_of_expert_bytes"].astype(float)
    if "policy" in df:
        keys["policy"] = ["" if _is_missing(v) else str(v) for v in df["policy"]]
    if "prefetch" in df:
        keys["prefetch"] = [_on_off(v) for v in df["prefetch"]]
    return keys


def _bench_numbers(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for col, header in _BENCH_NUMBERS.items():
        if col in df:
            v = df[col].astype(float)
            out[header] = v / MiB if col == "bytes_read_per_token" else v
    return out


def _sort_bench(df: pd.DataFrame) -> pd.Index:
    """Device, then in-memory first, then the largest limit first; ties keep input order."""
    order = pd.DataFrame({"_pos": np.arange(len(df))}, index=df.index)
    order["_dev"] = df["device"].astype(str) if "device" in df else ""
    order["_mem"] = ~is_in_memory(df)
    lim = pd.to_numeric(df["memory_limit"], errors="coerce") if "memory_limit" in df else 0.0
    order["_lim"] = -pd.Series(lim, index=df.index).fillna(np.inf)
    return order.sort_values(["_dev", "_mem", "_lim", "_pos"], kind="stable").index


def throughput_table(bench_df: pd.DataFrame) -> pd.DataFrame:
    """Tokens/s in memory vs under memory limits, prefetch on/off, per policy (SmallThinker Tables 4-7).

    One row per benchmark run: device (when more than one), mode, memory limit, the limit as a share of all expert
    bytes, policy, prefetch; then prefill and decode tok/s, decode tok/s relative to the in-memory run on the same
    device, hit rate, MiB read per token and the share of the bound reached (bound time / measured time).
    """
    df = bench_df.loc[_sort_bench(bench_df)]
    keys, nums = _bench_keys(df), _bench_numbers(df)
    if "decode_tok_s" in df:
        mem = is_in_memory(df)
        dev = df["device"].astype(str) if "device" in df else pd.Series("", index=df.index)
        ref = df["decode_tok_s"].where(mem).groupby(dev).transform("max")
        loc = list(nums.columns).index("decode tok/s") + 1
        nums.insert(loc, "decode vs in memory", df["decode_tok_s"].astype(float) / ref)
    return pd.concat([keys, nums], axis=1).reset_index(drop=True)


def ablation_variant(row: Mapping[str, Any]) -> str:
    """Name a benchmark row as an ablation variant (mixtral-offloading Table 2).

    in memory: no limit; naive offload: a mode named 'naive'/'on_demand'; no cache: policy none/off;
    no prefetch: prefetch off; full: cache and prefetch. A 'variant' column, when present, wins.
    """
    if "variant" in row and not _is_missing(row["variant"]):
        return str(row["variant"])
    mode = str(row.get("mode", "")).lower()
    if _is_missing(row.get("memory_limit", 0)) or mode in _IN_MEMORY_MODES:
        return "in memory"
    if any(s in mode for s in ("naive", "on_demand", "on-demand", "ondemand")):
        return "naive offload"
    policy = row.get("policy", "lru")
    if _is_missing(policy) or str(policy).lower() in ("none", "off", "no_cache", "no cache", ""):
        return "no cache"
    prefetch = row.get("prefetch", True)
    if not _is_missing(prefetch) and not (prefetch if not isinstance(prefetch, str) else prefetch == "on"):
        return "no prefetch"
    return "full"


def ablation_table(bench_df: pd.DataFrame, variant: str | Callable[[Mapping], str] | None = None) -> pd.DataFrame:
    """Full system / no prefetch / no cache / naive offload, per memory limit, with the speedup over naive offload.

    ``variant``: a column of ``bench_df`` naming each row's variant, or a function of a row; by default
    ``ablation_variant``. Rows are ordered in memory, full, no prefetch, no cache, naive offload.
    """
    df = bench_df.copy()
    if variant is None:
        df["_variant"] = [ablation_variant(r) for r in df.to_dict("records")]
    elif callable(variant):
        df["_variant"] = [variant(r) for r in df.to_dict("records")]
    else:
        df["_variant"] = df[variant].astype(str)
    rank = {v: i for i, v in enumerate(_ABLATION_ORDER)}
    df["_rank"] = df["_variant"].map(lambda v: rank.get(v, len(rank)))
    # device, then in memory, then the largest limit first; within a limit, the variant order
    lim = pd.to_numeric(df["memory_limit"], errors="coerce") if "memory_limit" in df else pd.Series(0.0, df.index)
    dev = df["device"].astype(str) if "device" in df else ""
    df = df.assign(_lim=-lim.fillna(np.inf), _dev=dev).sort_values(["_dev", "_lim", "_rank"], kind="stable")
    out = pd.DataFrame(index=df.index)
    if "device" in df and df["device"].nunique() > 1:
        out["device"] = df["device"].astype(str)
    if "memory_limit" in df:
        out["memory limit"] = [format_bytes(v) for v in df["memory_limit"]]
    out["variant"] = df["_variant"]
    if "policy" in df and df["policy"].nunique() > 1:
        out["policy"] = ["" if _is_missing(v) else str(v) for v in df["policy"]]
    nums = _bench_numbers(df).drop(columns=["prefill tok/s"], errors="ignore")
    out = pd.concat([out, nums], axis=1)
    if "decode_tok_s" in df:
        group = [c for c in ("device", "memory limit") if c in out]
        naive = df["decode_tok_s"].where(df["_variant"] == "naive offload")
        ref = naive.groupby([out[c] for c in group]).transform("max") if group else naive.max()
        out.insert(list(out.columns).index("decode tok/s") + 1, "speedup vs naive",
                   df["decode_tok_s"].astype(float) / ref)
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- KV cache
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "f16": "float16",
                "float16": "float16", "half": "float16", "fp32": "float32", "f32": "float32", "float32": "float32",
                "float": "float32", "fp8": "float8_e4m3fn", "int8": "int8"}


def torch_dtype_of(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPE_NAMES)}")
    return getattr(torch, _DTYPE_NAMES[key])


def model_configs(configs: Any) -> dict[str, Any]:
    """name -> SmallThinkerConfig from a dict, a config, a preset name or a sequence of either."""
    from ..model import SmallThinkerConfig

    if isinstance(configs, Mapping):
        items = configs.items()
    else:
        seq = [configs] if isinstance(configs, str | SmallThinkerConfig) else list(configs)
        items = [(c if isinstance(c, str) else c.extra.get("model_name", f"config {i}"), c)
                 for i, c in enumerate(seq)]
    return {name: SmallThinkerConfig.from_name(c) if isinstance(c, str) else c for name, c in items}


def kv_table(configs: Any, contexts: Sequence[int] = DEFAULT_CONTEXTS, dtype: Any = "bf16") -> pd.DataFrame:
    """Analytic KV-cache bytes of one sequence, hybrid (the config's layout) vs every layer global.

    ``configs``: {name: SmallThinkerConfig}, or preset names. Columns: model, context, hybrid MiB, all-global MiB,
    saving ratio (all-global / hybrid), saved (1 - hybrid / all-global).
    """
    from ..model.kv_cache import kv_cache_bytes

    tdtype = torch_dtype_of(dtype)
    rows = []
    for name, cfg in model_configs(configs).items():
        for t in contexts:
            hybrid = kv_cache_bytes(cfg, int(t), dtype=tdtype)
            full = kv_cache_bytes(cfg, int(t), dtype=tdtype, all_global=True)
            rows.append({"model": name, "context": int(t), "hybrid MiB": hybrid / MiB, "all-global MiB": full / MiB,
                         "saving ratio": full / hybrid, "saved": 1 - hybrid / full})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- experts, neurons
def _mean_js_per_dataset(js: Any, value: str | None = None) -> pd.Series:
    """Mean JS divergence of each dataset to the others, from a dict/Series (already per dataset), a square
    dataset x dataset matrix, or long rows with two dataset columns and a ``value`` column (per layer or not;
    by default 'js_divergence' or 'js', as ``instruments.expert_usage_divergence`` writes)."""
    if isinstance(js, Mapping):
        return pd.Series(js, dtype=float)
    if isinstance(js, pd.Series):
        return js.astype(float)
    if set(js.index) == set(js.columns):  # square matrix
        m = js.loc[js.index, js.index].to_numpy(dtype=float, copy=True)
        np.fill_diagonal(m, np.nan)
        return pd.Series(np.nanmean(m, axis=1), index=js.index)
    if value is None:
        value = next((c for c in ("js_divergence", "js") if c in js), "js_divergence")
    if value not in js:
        raise KeyError(f"no {value!r} column in the JS frame (columns: {list(js.columns)})")
    pair = [c for c in js.columns if c != value and c != "layer" and not pd.api.types.is_numeric_dtype(js[c])]
    if len(pair) != 2:
        raise ValueError(f"expected two dataset columns besides {value!r} and 'layer', found {pair}")
    long = pd.concat([js[[pair[0], value]].set_axis(["dataset", value], axis=1),
                      js[[pair[1], value]].set_axis(["dataset", value], axis=1)])
    return long.groupby("dataset")[value].mean()


def expert_usage_table(freq_df: pd.DataFrame, threshold: float = 0.14, hot: float = 0.4, js: Any = None,
                       dataset: str = "dataset", layer: str = "layer", expert: str = "expert",
                       frequency: str = "frequency") -> pd.DataFrame:
    """Per dataset: how many (layer, expert) pairs, the share with frequency under ``threshold`` (the paper:
    70-80% under 0.14), the share at or above ``hot`` (the paper: 20-30% at 0.4-0.6), the mean and the largest
    frequency; and the mean Jensen-Shannon divergence to the other datasets when ``js`` is given."""
    g = freq_df.groupby(dataset, sort=False)[frequency]
    out = pd.DataFrame({
        "layers": freq_df.groupby(dataset, sort=False)[layer].nunique(),
        "experts": g.size(),
        f"share < {threshold:g}": g.apply(lambda s: float((s < threshold).mean())),
        f"share ≥ {hot:g}": g.apply(lambda s: float((s >= hot).mean())),
        "mean frequency": g.mean(),
        "max frequency": g.max(),
    })
    if js is not None:
        out["mean JS divergence"] = _mean_js_per_dataset(js).reindex(out.index)
    return out.rename_axis(dataset).reset_index()


def sparsity_table(neurons_df: pd.DataFrame, value: str = "sparsity", by: str = "layer") -> pd.DataFrame:
    """Per layer: number of observations, median, min, quartiles, max and mean of neuron sparsity (Figure 6)."""
    g = neurons_df.groupby(by)[value]
    out = pd.DataFrame({"n": g.size(), "median": g.median(), "min": g.min(), "q25": g.quantile(0.25),
                        "q75": g.quantile(0.75), "max": g.max(), "mean": g.mean()})
    return out.reset_index()


# ---------------------------------------------------------------------------------------------- markdown
def _auto_format(values: pd.Series) -> Callable[[float], str]:
    """Fixed decimals for a whole column, chosen by its largest magnitude: 1234, 123.4, 12.34, 0.123."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = np.abs(v[np.isfinite(v)])
    top = v.max() if v.size else 0.0
    if 0 < top < 0.01:
        return lambda x: f"{x:.3g}"
    decimals = 0 if top >= 1000 else 1 if top >= 100 else 2 if top >= 1 else 3
    return lambda x: f"{x:.{decimals}f}"


def _formatter(floatfmt: Any, col: Any, values: pd.Series) -> Callable[[float], str]:
    f = floatfmt.get(col, "auto") if isinstance(floatfmt, Mapping) else floatfmt
    if callable(f):
        return f
    if f in (None, "auto"):
        return _auto_format(values)
    return lambda x: format(x, f)


def format_cell(v: Any, fmt: Callable[[float], str] = "{:g}".format, na_rep: str = "") -> str:
    if _is_missing(v):
        return na_rep
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, Number) and not isinstance(v, int | np.integer):
        return fmt(float(v))
    return str(v)


def _escape(s: str) -> str:
    """A cell of a GitHub table: tabulate leaves a ``|`` as it is, which would split the cell."""
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, floatfmt: Any = "auto", index: bool | None = None, na_rep: str = "") -> str:
    """A GitHub markdown table: the cells formatted per column here, laid out by ``DataFrame.to_markdown``.

    ``floatfmt``: 'auto' (fixed decimals per column, by its magnitude), a format spec ('.3f'), a function, or a
    dict column -> either.
    ``index``: include the index; by default only when it is not a plain 0..n-1 range. Integers are written as
    they are, NaN/None as ``na_rep``; numeric columns are right-aligned.
    """
    if index is None:
        index = not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1)
    if index:
        names = [n if n is not None else "" for n in df.index.names]
        df = df.reset_index(names=names if len(names) > 1 or names[0] else [""])
    headers = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    columns = []
    for pos, col in enumerate(df.columns):
        fmt = _formatter(floatfmt, col, df.iloc[:, pos])
        columns.append([_escape(format_cell(v, fmt, na_rep)) for v in df.iloc[:, pos]])
    cells = pd.DataFrame(list(zip(*columns)) if len(df) else [], columns=[_escape(h) for h in headers], dtype=object)
    # the cells are final text: tabulate only aligns them (no number parsing, which would reformat them)
    return cells.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=["right" if num else "left" for num in numeric]) + "\n"
