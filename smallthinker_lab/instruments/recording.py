"""``Recording``: what ``record()`` kept, as named numpy arrays and tidy DataFrames.

Names are dotted and stable. Letters: S steps (forwards), Q sequences, N token rows (sum of B*T over the steps, in
step order: the row order of every [N, ...] array), R routed (token, expert) pairs of one layer, C cache events,
M timing events, E experts, K experts per token, F neurons per expert. ``{i}`` is a layer, ``{part}`` a timing part.
"derived" names are computed from the stored ones when read (and are not saved).

{table}

DataFrames (``to_dataframe(kind)``), one row per:
  experts        (token, layer, slot): dataset, sequence, step, position, layer, slot, expert, weight
  router_logits  (token, layer, expert), full only: dataset, sequence, step, position, layer, expert, logit
  neurons        routed (token, layer, expert): dataset, sequence, step, position, layer, expert, inactive, ffn,
                 sparsity (= inactive / ffn)
  neuron_counts  (dataset, layer, expert, neuron): active (tokens with gate > 0), tokens (tokens routed to the expert)
  kv             (step, layer): dataset, sequence, step, phase, layer, attention ("global" | "sliding"), context, bytes
  cache          event: dataset, sequence, step, phase, layer, expert, event, bytes, engine_step
  timing         dataset, sequence, phase, step, layer, part, seconds, tokens: one "total" row per step (layer -1, the
                 forward's wall time, ``tokens`` = B*T) and, on an engine, one row per "timing" event
  steps          forward: dataset, sequence, step, phase, start, tokens, batch, seconds
Each frame's ``attrs`` holds num_experts, top_k, moe_ffn_hidden_size, num_hidden_layers, layers, kv_itemsize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .frames import RecordingFrames
from .names import FORMAT_VERSION, KINDS

log = logging.getLogger(__name__)

META_FILE, ARRAYS_FILE = "meta.json", "arrays.npz"


class RecordingError(ValueError):
    """A recording folder whose files do not belong together (or are damaged); the message names folder and file."""

# (name pattern, kind, shape, dtype, meaning): the one table of recorded names
NAMES: list[tuple[str, str, str, str, str]] = [
    ("steps.sequence", "always", "[S]", "int64", "sequence of the step (its first batch row)"),
    ("steps.step", "always", "[S]", "int64", "0 = prefill (first recorded forward), then 1, 2, ... per sequence"),
    ("steps.phase", "always", "[S]", "str", "'prefill' or 'decode'"),
    ("steps.start", "always", "[S]", "int64", "position of the step's first token"),
    ("steps.tokens", "always", "[S]", "int64", "new tokens per sequence (T)"),
    ("steps.batch", "always", "[S]", "int64", "sequences in the batch (B)"),
    ("steps.seconds", "always", "[S]", "float64", "wall time of the forward, hooks included"),
    ("sequences.dataset", "always", "[Q]", "str", "dataset label of each sequence"),
    ("tokens.id", "always", "[N]", "int64", "token id of each token row (the forward's input: prompt and fed-back "
                                            "tokens)"),
    ("tokens.piece", "with a tokenizer", "[N]", "str", "the decoded piece of each token row's id"),
    ("tokens.sequence", "always, derived", "[N]", "int64", "sequence of each token row"),
    ("tokens.step", "always, derived", "[N]", "int64", "step of each token row"),
    ("tokens.position", "always, derived", "[N]", "int64", "position of each token row"),
    ("tokens.dataset", "always, derived", "[N]", "str", "dataset of each token row"),
    ("tokens.step_row", "always, derived", "[N]", "int64", "row in steps.* of each token row"),
    ("layers.{i}.moe.topk_ids", "experts", "[N, K]", "int64", "experts chosen per token, in top-k order"),
    ("layers.{i}.moe.topk_weights", "experts", "[N, K]", "float32", "their routing weights (sum 1 per token)"),
    ("layers.{i}.moe.router_logits", "experts, full", "[N, E]", "float32", "raw router logits"),
    ("layers.{i}.moe.routed_token", "neurons", "[R]", "int64", "token row of each routed (token, expert) pair"),
    ("layers.{i}.moe.routed_expert", "neurons", "[R]", "int64", "expert of each routed pair"),
    ("layers.{i}.moe.inactive_neurons", "neurons", "[R]", "int32", "neurons of the pair with relu(gate) <= 0"),
    ("layers.{i}.moe.expert_gate", "neurons, full", "[R, F]", "float32", "pre-ReLU gate output of each pair"),
    ("layers.{i}.moe.neuron_counts", "neurons", "[E, F]", "int64",
     "tokens for which neuron f of expert e was active (gate > 0), summed over datasets"),
    ("layers.{i}.moe.expert_tokens", "neurons, derived", "[E]", "int64", "tokens routed to each expert"),
    ("layers.{i}.attn.kv_bytes", "kv", "[S]", "int64", "KV-cache bytes the layer holds after the step"),
    ("kv.global_bytes", "kv, derived", "[S]", "int64", "kv_bytes summed over the recorded global layers"),
    ("kv.sliding_bytes", "kv, derived", "[S]", "int64", "kv_bytes summed over the recorded sliding layers"),
    ("cache.step_row", "cache", "[C]", "int64", "index into steps.* of each cache event"),
    ("cache.engine_step", "cache", "[C]", "int64", "the engine's own step number of the event"),
    ("cache.layer", "cache", "[C]", "int64", "layer of the expert"),
    ("cache.expert", "cache", "[C]", "int64", "expert"),
    ("cache.event", "cache", "[C]", "str", "'hit', 'miss', 'prefetch' or 'evict'"),
    ("cache.bytes", "cache", "[C]", "int64", "bytes the event moved (read on miss / prefetch, freed on evict)"),
    ("layers.{i}.cache.hits", "cache, derived", "[S]", "int64", "hit events per step"),
    ("layers.{i}.cache.misses", "cache, derived", "[S]", "int64", "miss events per step"),
    ("layers.{i}.cache.prefetches", "cache, derived", "[S]", "int64", "prefetch events per step"),
    ("layers.{i}.cache.evictions", "cache, derived", "[S]", "int64", "evict events per step"),
    ("layers.{i}.cache.bytes_read", "cache, derived", "[S]", "int64", "bytes of miss and prefetch events per step"),
    ("timing.step_row", "timing", "[M]", "int64", "index into steps.* of each timing event"),
    ("timing.engine_step", "timing", "[M]", "int64", "the engine's own step number of the event"),
    ("timing.layer", "timing", "[M]", "int64", "layer (-1: not a layer's, e.g. lm_head)"),
    ("timing.part", "timing", "[M]", "str", "'attention', 'moe', 'io_wait', 'router', 'lm_head', ..."),
    ("timing.seconds", "timing", "[M]", "float64", "seconds of the event"),
    ("layers.{i}.timing.{part}", "timing, derived", "[S]", "float64", "seconds per step spent in the part"),
]


def names_table() -> pd.DataFrame:
    """The names table as a DataFrame (name pattern, kind, shape, dtype, meaning)."""
    return pd.DataFrame(NAMES, columns=["name", "kind", "shape", "dtype", "meaning"])


def _format_table() -> str:
    """The names table as reST (the module's help shows it), through ``DataFrame.to_markdown``."""
    return names_table().to_markdown(index=False, tablefmt="rst")


__doc__ = __doc__.replace("{table}", _format_table())

_PATTERNS = [(re.compile("^" + re.escape(p).replace(r"\{i\}", r"(\d+)").replace(r"\{part\}", r"(\w+)") + "$"), row)
             for p, *row in NAMES]
_PER_DATASET = ".moe.neuron_counts"  # stored (D, E, F), one slab per dataset in meta["datasets"]
_CACHE_DERIVED = {"hits": ("hit",), "misses": ("miss",), "prefetches": ("prefetch",), "evictions": ("evict",)}
_FRAME_KINDS = ("experts", "router_logits", "neurons", "neuron_counts", "kv", "cache", "timing", "steps")


def _lookup(name: str):
    for pat, row in _PATTERNS:
        if pat.match(name):
            return row
    return None


class Recording(RecordingFrames):
    """Recorded data: ``rec[name]`` (numpy), ``names()``, ``describe()``, ``to_dataframe(kind)``, ``summary()``,
    ``save(path)`` / ``Recording.load(path)``, ``Recording.concat([...])`` or ``rec1 + rec2``."""

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._meta, self._arrays = meta, arrays
        self._recorder = None
        self._built_at = None
        self._live_now = False

    # ------------------------------------------------------------- live state
    @classmethod
    def _live(cls, recorder) -> Recording:
        rec = cls({}, {})
        rec._recorder = recorder
        rec._live_now = True
        return rec

    def _sync(self) -> None:
        """Build the arrays from the recorder when it has more since the last build (lazily: the with block's
        exit only unhooks); a finished recorder is dropped once built."""
        r = self._recorder
        if r is None:
            return
        mark = (len(r.steps), len(r.cache_blocks), len(r.timing_events), r.dropped)
        if mark != self._built_at:
            self._meta, self._arrays = r.build()
            self._built_at = mark
        if not self._live_now:
            self._recorder = None

    def _freeze(self) -> None:
        """The block has ended: no more events will come."""
        self._live_now = False

    # ------------------------------------------------------------------- meta
    @property
    def meta(self) -> dict[str, Any]:
        self._sync()
        return self._meta

    @property
    def kinds(self) -> list[str]:
        return list(self.meta["kinds"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def datasets(self) -> list[str]:
        return list(self.meta["datasets"])

    @property
    def notes(self) -> list[str]:
        return list(self.meta["notes"])

    @property
    def config(self):
        from ..model import DenseConfig, SmallThinkerConfig

        c = self.meta["config"]
        return (DenseConfig if c.get("model_type") == "qwen2" else SmallThinkerConfig).from_dict(c)

    def _attrs(self) -> dict[str, Any]:
        c = self.meta["config"]
        return {"num_experts": c.get("moe_num_primary_experts", 0), "top_k": c.get("moe_num_active_primary_experts", 0),
                "moe_ffn_hidden_size": c.get("moe_ffn_hidden_size", 0), "num_hidden_layers": c["num_hidden_layers"],
                "layers": self.layers, "kv_itemsize": self.meta.get("kv_itemsize")}

    # -------------------------------------------------------------- dict-like
    def names(self) -> list[str]:
        """Every name ``rec[name]`` answers, stored and derived."""
        self._sync()
        out = list(self._arrays)
        out += ["tokens.sequence", "tokens.step", "tokens.position", "tokens.dataset", "tokens.step_row"]
        a = self._arrays
        for i in self.layers:
            if f"layers.{i}.moe.routed_expert" in a:
                out.append(f"layers.{i}.moe.expert_tokens")
            if "cache.layer" in a:
                out += [f"layers.{i}.cache.{k}" for k in (*_CACHE_DERIVED, "bytes_read")]
            if "timing.part" in a:
                out += [f"layers.{i}.timing.{p}" for p in sorted(set(a["timing.part"][a["timing.layer"] == i]))]
        if any(n.endswith(".attn.kv_bytes") for n in a):
            out += ["kv.global_bytes", "kv.sliding_bytes"]
        return out

    def keys(self) -> list[str]:
        return self.names()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def items(self):
        return [(n, self[n]) for n in self.names()]

    def __getitem__(self, name: str) -> np.ndarray:
        self._sync()
        a = self._arrays
        if name in a:
            return a[name].sum(axis=0) if name.endswith(_PER_DATASET) else a[name]
        if name.startswith("tokens."):
            t = self._tokens()
            if name[7:] in t:
                return t[name[7:]]
        m = re.fullmatch(r"layers\.(\d+)\.(moe|cache|timing)\.(\w+)", name)
        if m:
            layer, group, what = int(m[1]), m[2], m[3]
            if group == "moe" and what == "expert_tokens" and f"layers.{layer}.moe.routed_expert" in a:
                return np.bincount(a[f"layers.{layer}.moe.routed_expert"], minlength=self._attrs()["num_experts"])
            if group == "cache" and "cache.layer" in a and layer in self.layers and (
                    what in _CACHE_DERIVED or what == "bytes_read"):
                sel = a["cache.layer"] == layer
                if what == "bytes_read":
                    sel &= np.isin(a["cache.event"], ("miss", "prefetch"))
                    w = a["cache.bytes"][sel]
                else:
                    sel &= np.isin(a["cache.event"], _CACHE_DERIVED[what])
                    w = None
                return np.bincount(a["cache.step_row"][sel], weights=w, minlength=self.num_steps).astype(np.int64)
            if group == "timing" and "timing.part" in a:
                sel = (a["timing.layer"] == layer) & (a["timing.part"] == what)
                if sel.any():
                    return np.bincount(a["timing.step_row"][sel], weights=a["timing.seconds"][sel],
                                       minlength=self.num_steps)
        if name in ("kv.global_bytes", "kv.sliding_bytes"):
            cfg, want = self.config, name == "kv.sliding_bytes"
            total = np.zeros(self.num_steps, dtype=np.int64)
            found = False
            for i in self.layers:
                key = f"layers.{i}.attn.kv_bytes"
                if key in a:
                    found = True
                    if cfg.is_sliding(i) == want:
                        total += a[key]
            if found:
                return total
        raise KeyError(f"{name!r} is not recorded here; rec.names() lists what is (kinds recorded: {self.kinds})")

    @property
    def num_steps(self) -> int:
        return len(self["steps.step"])

    def _tokens(self) -> dict[str, np.ndarray]:
        a = self._arrays
        T, B = a["steps.tokens"], a["steps.batch"]
        n = T * B
        row = np.repeat(np.arange(len(T)), n)  # step row of each token row
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        seq = a["steps.sequence"][row] + within // np.maximum(T[row], 1)
        return {"sequence": seq.astype(np.int64), "step": a["steps.step"][row], "step_row": row,
                "position": (a["steps.start"][row] + within % np.maximum(T[row], 1)).astype(np.int64),
                "dataset": a["sequences.dataset"][seq] if len(seq) else np.array([], dtype="<U1")}

    def describe(self) -> pd.DataFrame:
        """One row per name recorded here: name, kind, shape (actual), dtype, meaning."""
        rows = []
        for n in self.names():
            v = self[n]
            kind, _, _, meaning = _lookup(n) or ("", "", "", "")
            rows.append({"name": n, "kind": kind, "shape": tuple(v.shape), "dtype": str(v.dtype), "meaning": meaning})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------- DataFrames
    def to_dataframe(self, kind: str) -> pd.DataFrame:
        """A tidy (long) DataFrame of one kind; see the module docstring for the columns."""
        if kind not in _FRAME_KINDS:
            raise ValueError(f"unknown frame {kind!r}; frames: {', '.join(_FRAME_KINDS)}")
        self._sync()
        base = kind if kind in KINDS else {"router_logits": "experts", "neuron_counts": "neurons"}.get(kind)
        if base is not None and base not in self.kinds:
            raise KeyError(f"kind {base!r} was not recorded (kinds recorded: {self.kinds})")
        df = getattr(self, f"_frame_{kind}")()
        df.attrs.update(self._attrs())
        return df












    # ---------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """A short dict: what was recorded, tokens, steps, per-kind counts, hit rate, tokens/s, notes."""
        self._sync()
        a = self._arrays
        phase, n_tok, sec = a["steps.phase"], a["steps.tokens"] * a["steps.batch"], a["steps.seconds"]
        pre, dec = phase == "prefill", phase != "prefill"
        out: dict[str, Any] = {
            "target": self.meta["target"], "datasets": self.datasets, "kinds": self.kinds, "layers": self.layers,
            "sequences": len(a["sequences.dataset"]), "steps": int(len(phase)), "tokens": int(n_tok.sum()),
            "prefill_tokens": int(n_tok[pre].sum()), "decode_steps": int(dec.sum()),
            "prefill_tok_s": _rate(n_tok[pre].sum(), sec[pre].sum()),
            "decode_tok_s": _rate(n_tok[dec].sum(), sec[dec].sum()),
        }
        if "experts" in self.kinds:
            out["routed_slots"] = int(sum(a[f"layers.{i}.moe.topk_ids"].size for i in self.layers))
        if "neurons" in self.kinds:
            ina = [a[f"layers.{i}.moe.inactive_neurons"] for i in self.layers]
            n = sum(len(x) for x in ina)
            out["routed_pairs"] = int(n)
            F = self._attrs()["moe_ffn_hidden_size"]
            out["mean_sparsity"] = float(np.concatenate(ina).sum() / (n * F)) if n else float("nan")
        if "kv" in self.kinds and any(f"layers.{i}.attn.kv_bytes" in a for i in self.layers):
            out["kv_bytes_last_step"] = int(self["kv.global_bytes"][-1] + self["kv.sliding_bytes"][-1]) if len(
                phase) else 0
        if "cache" in self.kinds:
            ev = a["cache.event"]
            counts = {e: int((ev == e).sum()) for e in ("hit", "miss", "prefetch", "evict")}
            out.update({"cache_" + k: v for k, v in counts.items()})
            out["cache_hit_rate"] = _rate(counts["hit"], counts["hit"] + counts["miss"])
            out["cache_bytes_read"] = int(a["cache.bytes"][np.isin(ev, ("miss", "prefetch"))].sum())
        if "timing" in self.kinds and len(a["timing.part"]):
            io = a["timing.seconds"][a["timing.part"] == "io_wait"].sum()
            out["io_wait_share"] = _rate(io, sec.sum())
        out["notes"] = self.notes
        return out

    def __repr__(self) -> str:
        s = self.summary()
        live = " (recording)" if self._live_now else ""
        return (f"Recording{live}({s['target']}, datasets={s['datasets']}, kinds={s['kinds']}, "
                f"layers={s['layers']}, sequences={s['sequences']}, steps={s['steps']}, tokens={s['tokens']})")

    # ------------------------------------------------------------- save, load
    def save(self, path) -> Path:
        """A folder: meta.json (the JSON sidecar), arrays.npz (every stored array, exact) and one tidy table per
        recorded frame (``{frame}.parquet``, or ``{frame}.csv`` without pyarrow) for other tools.

        Crash-safe: everything is written into a staging folder next to ``path`` and swapped in at once
        (:func:`~smallthinker_lab.model.atomic.replace_folder`), so a killed save leaves the old recording or the
        new one. meta.json, written last, records the size and sha256 of every other file it saved, and
        :meth:`load` refuses files that do not match. The recording owns meta.json, arrays.npz and the
        ``{frame}.parquet`` / ``{frame}.csv`` tables (those of an earlier save go); other files in ``path`` are
        kept. Where no staging folder can be made (``path`` is a mount point, its parent is not writable) the
        files are written in place, meta.json last, with a warning."""
        from ..model import atomic

        self._sync()
        path = Path(path)
        reason = atomic.staging_unavailable(path)
        if reason is None:
            with atomic.replace_folder(path, _owned_by_recording) as tmp:
                self._write(tmp, atomic.fault)
        else:
            log.warning("%s; writing the recording in place, where a crash leaves a folder load() refuses", reason)
            path.mkdir(parents=True, exist_ok=True)
            (path / META_FILE).unlink(missing_ok=True)  # until the new meta.json: no recording at all
            for p in path.iterdir():  # then the tables and arrays of the earlier save
                if _owned_by_recording(p.name) and p.is_file():
                    p.unlink()
            self._write(path, atomic.fault)
        return path

    def _write(self, folder: Path, fault) -> None:
        from ..model.atomic import fsync_file, sha256_file

        try:
            import pyarrow  # noqa: F401

            fmt = "parquet"
        except ImportError:
            fmt = "csv"
        frames = []
        for kind in _FRAME_KINDS:
            try:
                df = self.to_dataframe(kind)
            except KeyError:
                continue
            df.attrs = {}
            if fmt == "parquet":
                df.to_parquet(folder / f"{kind}.{fmt}", index=False)
            else:
                df.to_csv(folder / f"{kind}.{fmt}", index=False)
            frames.append(f"{kind}.{fmt}")
            fault("table-written")
        np.savez(folder / ARRAYS_FILE, **self._arrays)
        fault("arrays-written")
        files = {}
        for name in (*frames, ARRAYS_FILE):
            fsync_file(folder / name)
            files[name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        meta = {**self._meta, "tables": frames, "files": files, "version": FORMAT_VERSION}
        tmp = folder / f".{META_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, folder / META_FILE)
        fault("meta-written")

    @classmethod
    def load(cls, path) -> Recording:
        """Read a folder :meth:`save` wrote. Every file meta.json records must have the size and sha256 it
        records (else :class:`RecordingError` naming the folder and the file: a folder that mixes files of
        different saves, or a damaged one). Files are read through one handle of the folder, so a save that
        replaces it meanwhile cannot mix two recordings. A recording saved before meta.json recorded hashes
        loads with a warning."""
        path = Path(path)
        with _FolderReader(path) as folder:
            try:
                raw = folder.read_bytes(META_FILE)
            except FileNotFoundError:
                raise FileNotFoundError(f"no {META_FILE} in recording folder {path}") from None
            try:
                meta = json.loads(raw.decode("utf-8"))
                if not isinstance(meta, dict):
                    raise TypeError(f"a {type(meta).__name__}, not a JSON object")
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
                raise RecordingError(f"{path / META_FILE} is not a recording's metadata: {e}") from None
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: recording format {meta.get('version')}, this version reads "
                                 f"{FORMAT_VERSION}")
            tables = meta.pop("tables", [])
            files = meta.pop("files", None)
            if files is None:
                log.warning("%s: %s records no hashes of its files (saved by an older version): cannot check that "
                            "%s belongs to it", path, META_FILE, ARRAYS_FILE)
            else:
                _check_files(path, folder, files, tables)
            with folder.open(ARRAYS_FILE) as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        return cls(meta, arrays)

    # ----------------------------------------------------------------- concat
    @classmethod
    def concat(cls, recordings) -> Recording:
        """One Recording of several (same config, kinds, layers and full options); dataset labels are kept."""
        recs = list(recordings)
        if not recs:
            raise ValueError("concat needs at least one recording")
        for r in recs:
            r._sync()
        first = recs[0]._meta
        for r in recs[1:]:
            for key in ("config", "kinds", "layers", "full"):
                if r._meta[key] != first[key]:
                    raise ValueError(f"cannot concatenate recordings whose {key} differ")
            if set(r._arrays) != set(recs[0]._arrays):
                raise ValueError("cannot concatenate recordings that hold different names "
                                 f"({sorted(set(r._arrays) ^ set(recs[0]._arrays))})")
        datasets = list(dict.fromkeys(d for r in recs for d in r._meta["datasets"]))
        out: dict[str, np.ndarray] = {}
        for name in recs[0]._arrays:
            if name.endswith(_PER_DATASET):
                acc = np.zeros((len(datasets), *recs[0]._arrays[name].shape[1:]), dtype=np.int64)
                for r in recs:
                    for d, ds in enumerate(r._meta["datasets"]):
                        acc[datasets.index(ds)] += r._arrays[name][d]
                out[name] = acc
                continue
            pieces, q = [], np.zeros(3, dtype=np.int64)  # offsets: sequences, steps, token rows
            for r in recs:
                x = r._arrays[name]
                if name == "steps.sequence":
                    x = x + q[0]
                elif name in ("cache.step_row", "timing.step_row"):
                    x = x + q[1]
                elif name.endswith(".moe.routed_token"):
                    x = x + q[2]
                pieces.append(x)
                ra = r._arrays
                q += (len(ra["sequences.dataset"]), len(ra["steps.step"]),
                      int((ra["steps.tokens"] * ra["steps.batch"]).sum()))
            out[name] = np.concatenate(pieces)
        notes = list(dict.fromkeys(n for r in recs for n in r._meta["notes"]))
        targets = {r._meta["target"] for r in recs}
        itemsizes = [r._meta.get("kv_itemsize") for r in recs if r._meta.get("kv_itemsize")]
        meta = {**first, "datasets": datasets, "notes": notes,
                "target": targets.pop() if len(targets) == 1 else "mixed",
                "kv_itemsize": itemsizes[0] if itemsizes else None}
        return cls(meta, out)

    def __add__(self, other: Recording) -> Recording:
        if not isinstance(other, Recording):
            return NotImplemented
        return Recording.concat([self, other])

    def __radd__(self, other):
        if other == 0:  # sum([...])
            return self
        return NotImplemented


def _owned_by_recording(name: str) -> bool:
    """Names in a recording folder that a save replaces."""
    stem, _, ext = name.partition(".")
    return (name in (META_FILE, ARRAYS_FILE) or (stem in _FRAME_KINDS and ext in ("parquet", "csv"))
            or name.startswith(f".{META_FILE}.tmp-"))


class _FolderReader:
    """Files of one folder read through a handle of the folder (where the OS has ``dir_fd``), so a folder swapped
    in by a concurrent save is read entirely old or entirely new."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def __enter__(self) -> _FolderReader:
        if not self.path.is_dir():
            raise FileNotFoundError(f"no recording folder at {self.path}")
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def open(self, name: str):
        if self.fd is None:
            return open(self.path / name, "rb")
        return os.fdopen(os.open(name, os.O_RDONLY, dir_fd=self.fd), "rb")

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def _check_files(path: Path, folder: _FolderReader, files, tables) -> None:
    """Every file meta.json records has its recorded size and sha256; arrays.npz and the tables are recorded."""
    if not isinstance(files, dict):
        raise RecordingError(f"{path / META_FILE}: 'files' is a {type(files).__name__}, not a mapping")
    for name in (ARRAYS_FILE, *tables):
        if name not in files:
            raise RecordingError(f"{path / META_FILE} records no size and sha256 of {name}: cannot tell that it "
                                 f"belongs to this recording")
    for name, want in files.items():
        if not isinstance(name, str) or name != Path(name).name or name in (".", "..", META_FILE):
            raise RecordingError(f"{path / META_FILE} records a file {name!r} that is not a plain file name")
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int)
                and isinstance(want.get("sha256"), str)):
            raise RecordingError(f"{path / META_FILE}: the entry of {name} is {want!r}, not {{'bytes', 'sha256'}}")
        try:
            f = folder.open(name)
        except FileNotFoundError:
            raise RecordingError(f"{path}: {name} is missing, but {META_FILE} records it") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != want["bytes"]:
                raise RecordingError(f"{path / name} does not belong to this recording: it has {size} bytes, "
                                     f"{META_FILE} records {want['bytes']} (a folder mixing files of different "
                                     f"saves, or a damaged file)")
            h = hashlib.sha256()
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() != want["sha256"]:
            raise RecordingError(f"{path / name} does not belong to this recording: its sha256 is "
                                 f"{h.hexdigest()[:16]}..., {META_FILE} records {want['sha256'][:16]}... (a folder "
                                 f"mixing files of different saves, or a damaged file)")


def _rate(num, den) -> float:
    return float(num) / float(den) if den else float("nan")
