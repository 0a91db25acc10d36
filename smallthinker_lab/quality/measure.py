"""One model's measured quality (perplexity, phenomena, continuations) and the figures drawn from it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .common import COLD, CONTINUATION_PROMPTS, DOMAINS, PAPER_SPARSITY_MEDIAN, PROMPT_SETS, REPO, _slug, _uniform
from .contamination import read_training
from .perplexity import domain_perplexity
from .phenomena import continuations, phenomena, profile_prompt_sets, read_prompts


# ============================================================================================ results
@dataclass
class ModelQuality:
    """Everything measured on one model."""

    label: str
    path: str
    info: dict[str, Any]
    perplexity: pd.DataFrame
    frequency: pd.DataFrame
    divergence: pd.DataFrame
    split_half: pd.DataFrame
    skew: pd.DataFrame
    sparsity: pd.DataFrame
    continuations: list[dict] = field(default_factory=list)


@dataclass
class QualityResult:
    settings: dict[str, Any]
    models: list[ModelQuality]
    training: dict[str, Any] = field(default_factory=dict)
    overlap: pd.DataFrame | None = None  # prompt_overlap(), model-independent

    TABLES = ("perplexity", "frequency", "divergence", "split_half", "skew", "sparsity")

    def save(self, out_dir: str | Path) -> list[Path]:
        """quality_{table}.csv (a ``model`` column) and quality.json (settings, model info, continuations)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for t in self.TABLES:
            df = pd.concat([getattr(m, t).assign(model=m.label) for m in self.models], ignore_index=True)
            df = df[["model"] + [c for c in df.columns if c != "model"]]
            p = out / f"quality_{t}.csv"
            df.to_csv(p, index=False, float_format="%.6g")
            paths.append(p)
        meta = {"settings": self.settings,  # training facts are not kept: the card reads TRAINING.md each time
                "models": [{"label": m.label, "path": m.path, "info": m.info, "continuations": m.continuations}
                           for m in self.models]}
        if self.overlap is not None:
            p = out / "quality_prompt_overlap.csv"
            self.overlap.to_csv(p, index=False, float_format="%.6g")
            paths.append(p)
        p = out / "quality.json"
        p.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [*paths, p]

    @classmethod
    def load(cls, out_dir: str | Path) -> QualityResult:
        out = Path(out_dir)
        meta = json.loads((out / "quality.json").read_text(encoding="utf-8"))
        tables = {t: pd.read_csv(out / f"quality_{t}.csv") for t in cls.TABLES}
        models = []
        for m in meta["models"]:
            kw = {t: tables[t][tables[t]["model"] == m["label"]].drop(columns="model").reset_index(drop=True)
                  for t in cls.TABLES}
            models.append(ModelQuality(m["label"], m["path"], m["info"], continuations=m["continuations"], **kw))
        ov = out / "quality_prompt_overlap.csv"
        return cls(meta["settings"], models, {}, pd.read_csv(ov) if ov.exists() else None)


def model_info(model, folder: str | Path) -> dict[str, Any]:
    cfg = model.config
    total = model.num_parameters()
    per_expert = 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    active = total - cfg.num_hidden_layers * (cfg.num_experts - cfg.top_k) * per_expert
    files = sorted(Path(folder).glob("*.safetensors"))
    return {"parameters": int(total), "active_parameters": int(active),
            "bf16_mb": total * 2 / 1e6, "file_mb": sum(f.stat().st_size for f in files) / 1e6,
            "config": cfg.to_dict()}


def _rel(path: str | Path, base: Path = REPO) -> str:
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)


def measure_model(folder: str | Path, label: str, tokens_dir: str | Path, prompts_dir: str | Path,
                  settings: dict[str, Any], unigram: dict | None = None, with_continuations: bool = True,
                  progress: bool = True, log=print) -> tuple[ModelQuality, pd.DataFrame]:
    """Load ``folder`` (fp32 on CPU) and measure everything; returns the result and the raw neurons frame."""
    import torch

    from ..model import load_model
    from ..model.tokenizer import load_tokenizer

    model = load_model(folder, dtype=torch.float32, device=settings.get("device", "cpu"))
    tok = load_tokenizer(folder)
    t0 = time.perf_counter()
    ppl = domain_perplexity(model, tokens_dir, settings["domains"], settings["max_tokens"], settings["window"],
                            settings["stride"], settings["batch_size"], progress, unigram)
    log(f"[{label}] perplexity done in {time.perf_counter() - t0:.0f}s:\n{ppl.to_string(index=False)}")
    t0 = time.perf_counter()
    rec = profile_prompt_sets(model, tok, prompts_dir, settings["sets"], settings["new_tokens"],
                              settings.get("prompt_limit"), progress)
    ph = phenomena(rec, settings["sets"])
    log(f"[{label}] prompt sets profiled in {time.perf_counter() - t0:.0f}s:\n{ph['skew'].to_string(index=False)}")
    conts = []
    if with_continuations:
        t0 = time.perf_counter()
        conts = continuations(model, tok, prompts_dir, [tuple(w) for w in settings["continuations"]],
                              settings["continuation_tokens"])
        log(f"[{label}] continuations done in {time.perf_counter() - t0:.0f}s")
    mq = ModelQuality(label, _rel(folder), model_info(model, folder), ppl, ph["frequency"], ph["divergence"],
                      ph["split_half"], ph["skew"], ph["sparsity"], conts)
    return mq, ph["_neurons"]


def measure(model_dir: str | Path, compare_dir: str | Path | None = None, tokens_dir: str | Path = "data/corpus/tokens",
            prompts_dir: str | Path = "data/prompts", label: str = "global (DP-group)",
            compare_label: str = "micro-batch", domains: Sequence[str] = DOMAINS, sets: Sequence[str] = PROMPT_SETS,
            max_tokens: int | None = 50_000, window: int = 512, stride: int = 256, batch_size: int = 4,
            new_tokens: int = 8, prompt_limit: int | None = None,
            which: Sequence[tuple[str, int]] = CONTINUATION_PROMPTS, continuation_tokens: int = 64,
            device: str = "cpu", progress: bool = True, log=print) -> tuple[QualityResult, dict[str, pd.DataFrame]]:
    """Measure the model (and the comparison model): the QualityResult and the raw neurons frames by label."""
    import torch

    settings = {"domains": list(domains), "sets": list(sets), "max_tokens": max_tokens, "window": window,
                "stride": stride, "batch_size": batch_size, "new_tokens": new_tokens, "prompt_limit": prompt_limit,
                "continuations": [list(w) for w in which], "continuation_tokens": continuation_tokens,
                "device": device, "dtype": "float32", "threads": torch.get_num_threads(),
                "tokens_dir": _rel(tokens_dir), "prompts_dir": _rel(prompts_dir),
                "prompt_counts": {s: len(read_prompts(Path(prompts_dir) / f"{s}.jsonl", prompt_limit)) for s in sets}}
    unigram: dict[str, np.ndarray] = {}
    models, neurons = [], {}
    t0 = time.perf_counter()
    for folder, lab, conts in ((model_dir, label, True), (compare_dir, compare_label, False)):
        if folder is None:
            continue
        mq, nf = measure_model(folder, lab, tokens_dir, prompts_dir, settings, unigram, conts, progress, log)
        models.append(mq)
        neurons[lab] = nf
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    return QualityResult(settings, models, read_training(model_dir)), neurons


# ============================================================================================ figures
def plot_figures(result: QualityResult, neurons: dict[str, pd.DataFrame], out_dir: str | Path,
                 dpi: int = 110) -> list[Path]:
    """Expert heatmaps (one PNG per model, one colour scale for all), the frequency ECDFs and the sparsity box
    plots (one panel per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import plot_expert_frequency_distribution, plot_expert_heatmaps, plot_sparsity_boxplots

    out = Path(out_dir)
    paths = []
    vmax = max(float(m.frequency["frequency"].max()) for m in result.models)
    for m in result.models:
        fig = plot_expert_heatmaps(m.frequency, datasets=result.settings["sets"], vmax=vmax, ncols=2)
        fig.suptitle(f"expert activation frequency, {m.label} balance loss (uniform: "
                     f"{_uniform(m):.3f})")
        p = out / f"quality_experts_{_slug(m.label)}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    n = len(result.models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], result.models):
        plot_expert_frequency_distribution(m.frequency, COLD, ax=ax, datasets=result.settings["sets"])
        ax.axvline(_uniform(m), color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{m.label} (dotted: uniform {_uniform(m):.3f})")
    p = out / "quality_expert_frequency_ecdf.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), layout="constrained", squeeze=False, sharey=True)
    for ax, m in zip(axes[0], result.models):
        plot_sparsity_boxplots(neurons[m.label], ax=ax, reference=PAPER_SPARSITY_MEDIAN)
        ax.set_title(f"{m.label}: all four prompt sets")
    p = out / "quality_sparsity.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    return paths
