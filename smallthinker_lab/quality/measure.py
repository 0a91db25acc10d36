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

from .common import (
    BASELINE_SEED,
    COLD,
    CONTINUATION_PROMPTS,
    DOMAINS,
    PAPER_SPARSITY_MEDIAN,
    PROMPT_SETS,
    REPO,
    _slug,
    _uniform,
)
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
    sparsity_definitions: pd.DataFrame = field(default_factory=pd.DataFrame)
    frequency_shares: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class QualityResult:
    settings: dict[str, Any]
    models: list[ModelQuality]
    training: dict[str, Any] = field(default_factory=dict)
    overlap: pd.DataFrame | None = None  # prompt_overlap(), model-independent
    # sparsity definitions of the random initialisation of the main model's config (chance), settings["baseline"]
    baseline: pd.DataFrame | None = None

    TABLES = ("perplexity", "frequency", "divergence", "split_half", "skew", "sparsity", "sparsity_definitions",
              "frequency_shares")
    OPTIONAL = ("sparsity_definitions", "frequency_shares")  # absent from folders measured before they existed

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
        if self.baseline is not None:
            p = out / "quality_baseline_sparsity.csv"
            self.baseline.to_csv(p, index=False, float_format="%.6g")
            paths.append(p)
        p = out / "quality.json"
        p.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [*paths, p]

    @classmethod
    def load(cls, out_dir: str | Path) -> QualityResult:
        out = Path(out_dir)
        meta = json.loads((out / "quality.json").read_text(encoding="utf-8"))
        tables = {t: pd.read_csv(out / f"quality_{t}.csv") for t in cls.TABLES
                  if t not in cls.OPTIONAL or (out / f"quality_{t}.csv").exists()}
        models = []
        for m in meta["models"]:
            kw = {t: df[df["model"] == m["label"]].drop(columns="model").reset_index(drop=True)
                  for t, df in tables.items()}
            models.append(ModelQuality(m["label"], m["path"], m["info"], continuations=m["continuations"], **kw))
        ov, base = out / "quality_prompt_overlap.csv", out / "quality_baseline_sparsity.csv"
        return cls(meta["settings"], models, {}, pd.read_csv(ov) if ov.exists() else None,
                   pd.read_csv(base) if base.exists() else None)


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
                  progress: bool = True, log=print) -> ModelQuality:
    """Load ``folder`` (fp32 on CPU) and measure everything."""
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
                      ph["split_half"], ph["skew"], ph["sparsity"], conts, ph["sparsity_definitions"],
                      ph["frequency_shares"])
    return mq


def measure_baseline(folder: str | Path, prompts_dir: str | Path, settings: dict[str, Any], seed: int = BASELINE_SEED,
                     progress: bool = True, log=print) -> pd.DataFrame:
    """The sparsity definitions of the random initialisation of ``folder``'s config (``init_weights(seed)``, as
    the trainer starts), on the same prompt sets as the models: what chance gives."""
    import torch

    from ..model import SmallThinkerForCausalLM, load_model
    from ..model.tokenizer import load_tokenizer

    config = load_model(folder, dtype=torch.float32, device="cpu").config
    model = SmallThinkerForCausalLM(config).init_weights(seed=seed).to(settings.get("device", "cpu")).eval()
    t0 = time.perf_counter()
    rec = profile_prompt_sets(model, load_tokenizer(folder), prompts_dir, settings["sets"], settings["new_tokens"],
                              settings.get("prompt_limit"), progress)
    ph = phenomena(rec, settings["sets"])
    log(f"[random init, seed {seed}] prompt sets profiled in {time.perf_counter() - t0:.0f}s")
    return ph["sparsity_definitions"]


def measure(model_dir: str | Path, compare_dir: str | Path | None = None, tokens_dir: str | Path = "data/corpus/tokens",
            prompts_dir: str | Path = "data/prompts", label: str = "global (DP-group)",
            compare_label: str = "micro-batch", domains: Sequence[str] = DOMAINS, sets: Sequence[str] = PROMPT_SETS,
            max_tokens: int | None = 50_000, window: int = 512, stride: int = 256, batch_size: int = 4,
            new_tokens: int = 8, prompt_limit: int | None = None,
            which: Sequence[tuple[str, int]] = CONTINUATION_PROMPTS, continuation_tokens: int = 64,
            device: str = "cpu", baseline_seed: int | None = BASELINE_SEED, progress: bool = True,
            log=print) -> QualityResult:
    """Measure the model (and the comparison model) and, unless ``baseline_seed`` is None, the sparsity of the
    random initialisation of the model's config with that seed."""
    import torch

    settings = {"domains": list(domains), "sets": list(sets), "max_tokens": max_tokens, "window": window,
                "stride": stride, "batch_size": batch_size, "new_tokens": new_tokens, "prompt_limit": prompt_limit,
                "continuations": [list(w) for w in which], "continuation_tokens": continuation_tokens,
                "device": device, "dtype": "float32", "threads": torch.get_num_threads(),
                "tokens_dir": _rel(tokens_dir), "prompts_dir": _rel(prompts_dir),
                "prompt_counts": {s: len(read_prompts(Path(prompts_dir) / f"{s}.jsonl", prompt_limit)) for s in sets}}
    unigram: dict[str, np.ndarray] = {}
    models = []
    t0 = time.perf_counter()
    for folder, lab, conts in ((model_dir, label, True), (compare_dir, compare_label, False)):
        if folder is None:
            continue
        models.append(measure_model(folder, lab, tokens_dir, prompts_dir, settings, unigram, conts, progress, log))
    baseline = None
    if baseline_seed is not None:
        baseline = measure_baseline(model_dir, prompts_dir, settings, baseline_seed, progress, log)
        settings["baseline"] = {"label": f"random init (seed {baseline_seed})", "seed": baseline_seed}
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    return QualityResult(settings, models, read_training(model_dir), baseline=baseline)


def remeasure_phenomena(result: QualityResult, folders: dict[str, str | Path], prompts_dir: str | Path,
                        baseline_seed: int | None = BASELINE_SEED, progress: bool = True, log=print) -> QualityResult:
    """Measure again the prompt-set phenomena (frequency, divergence, skew, the three sparsity definitions, the
    frequency normalisations) of every model of ``result`` whose weights are in ``folders[label]``, and the
    random-initialisation baseline; the saved perplexity and continuations are kept (they need the corpus and
    take the most time). A model whose weights are absent keeps its saved tables, without the new ones."""
    import torch

    from ..model import load_model
    from ..model.tokenizer import load_tokenizer

    st = result.settings
    t0 = time.perf_counter()
    for m in result.models:
        folder = folders.get(m.label)
        if folder is None or not any(Path(folder).glob("*.safetensors")):
            log(f"[{m.label}] no weights in {folder}: its saved tables are kept as they are")
            continue
        model = load_model(folder, dtype=torch.float32, device=st.get("device", "cpu"))
        rec = profile_prompt_sets(model, load_tokenizer(folder), prompts_dir, st["sets"], st["new_tokens"],
                                  st.get("prompt_limit"), progress)
        ph = phenomena(rec, st["sets"])
        for name in ("frequency", "divergence", "split_half", "skew", "sparsity", "sparsity_definitions",
                     "frequency_shares"):
            setattr(m, name, ph[name])
        log(f"[{m.label}] prompt sets profiled in {time.perf_counter() - t0:.0f}s")
    if baseline_seed is not None:
        result.baseline = measure_baseline(folders[result.models[0].label], prompts_dir, st, baseline_seed,
                                           progress, log)
        st["baseline"] = {"label": f"random init (seed {baseline_seed})", "seed": baseline_seed}
    return result


# ============================================================================================ figures
def plot_figures(result: QualityResult, out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """The card's figures, from the saved tables alone (so ``--card-only`` redraws the same PNGs): expert heatmaps
    (one PNG per model, one colour scale for all, centred on uniform routing k/E), the frequency ECDFs, and the
    per-neuron sparsity box plots (the paper's Figure 6; one panel per model) with the random initialisation
    beside each box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import plot_expert_frequency_distribution, plot_expert_heatmaps, plot_sparsity_boxplots

    out = Path(out_dir)
    paths = []
    vmax = max(float(m.frequency["frequency"].max()) for m in result.models)
    for m in result.models:
        fig = plot_expert_heatmaps(m.frequency, datasets=result.settings["sets"], vmax=vmax, ncols=2,
                                   uniform=_uniform(m))
        fig.suptitle(f"Expert activation frequency (share of a set's tokens routed to the expert)\n"
                     f"{Path(m.path).name} ({m.label} balance loss)\nprompt sets: "
                     + ", ".join(result.settings["sets"]), fontsize="medium")
        p = out / f"quality_experts_{_slug(m.label)}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    n = len(result.models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.2), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], result.models):
        plot_expert_frequency_distribution(m.frequency, COLD, ax=ax, datasets=result.settings["sets"])
        ax.axvline(_uniform(m), color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{Path(m.path).name} ({m.label})\ndotted: uniform routing k/E = {_uniform(m):.3f}",
                     fontsize="medium")
    fig.suptitle("Expert activation frequency, every (layer, expert) of each prompt set", fontsize="medium")
    p = out / "quality_expert_frequency_ecdf.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
    have = [m for m in result.models if len(m.sparsity_definitions)]
    if have:
        base = result.baseline
        base_all = None if base is None else base[(base["dataset"] == "all") & (base["definition"] == "neuron")]
        label = result.settings.get("baseline", {}).get("label", "random init")  # hatched: chance
        fig, axes = plt.subplots(1, len(have), figsize=(8.0 * len(have), 4.6), layout="constrained", squeeze=False,
                                 sharey=True)
        for ax, m in zip(axes[0], have):
            d = m.sparsity_definitions
            plot_sparsity_boxplots(d[(d["dataset"] == "all") & (d["definition"] == "neuron")], ax=ax,
                                   reference=PAPER_SPARSITY_MEDIAN, baseline=base_all,
                                   baseline_label=f"{label}, chance")
            ax.set_title(f"{Path(m.path).name} ({m.label})", fontsize="medium")
            ax.set_ylabel("per-neuron sparsity (share of the expert's\nrouted tokens with relu(gate) = 0)")
        fig.suptitle("Neuron sparsity per layer, per-neuron reading (dead neurons left out)\nall prompt sets: "
                     + ", ".join(result.settings["sets"]), fontsize="medium")
        p = out / "quality_sparsity.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    return paths
