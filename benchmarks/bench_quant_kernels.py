"""The expert products of a decode step on the GPU per expert format (bf16, int8, Q4_0): kernel time, bytes read,
achieved GB/s against the HBM copy rate measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_quant_kernels.py [--out benchmarks/results] [--tune] [--tiny]

For the 4B shape (smallthinker-4b-a0.6b: 32 layers, hidden 1536, expert width 768, 32 experts, top-4) it builds
every layer's 32 experts with random weights (std 0.02) in each format, the quantized ones through the bundle's
own encoders (smallthinker_lab.engine.quant: per-row int8, ggml Q4_0) packed as the kernels read them
(smallthinker_lab.kernels.quant_experts), fixes each layer's top-4 (random, seeded), and times one decode step's
expert products: per layer the gate/up kernel (RMSNorm, gate, up, ReGLU) and the down kernel (down, the weighted
combine, the residual), 64 launches per step, captured as one CUDA graph and replayed (median of ``--repeats``
runs of ``--steps`` replays, CUDA events). The bf16 row runs the decode step's own kernels (triton_decode.py, the
tiles of DEFAULT_BLOCKS); the quantized rows the kernels of triton_quant.py (DEFAULT_QUANT_BLOCKS, or the best
tiles of ``--tune``). A step reads 32 x 4 experts, 0.9 GB in bf16: far more than the L2 cache, so the weights come
from HBM on every step.

Bytes read per step: the chosen experts' weight bytes (scales included); the activations (a few KiB per layer) are
left out. GB/s = those bytes / the step's time; the HBM bound = the bytes / the HBM copy rate (a 2 GiB device
copy, read + write counted, as the GPU suite measures it), its share = bound time / measured time.

Before timing, each format's layer 0 is checked against a dequantise-then-multiply reference in torch (the same
bf16 roundings; an output of the combine may differ by a few bf16 steps, as tests/test_quant_kernels.py states):
the row records the largest error as a share of the tests' tolerance, and a format over 1 is reported as failed.

``--tiny``: the smallthinker-test shape, one step, tiles of 8 rows, no CUDA graph; without a GPU in Triton's
interpreter (set before triton is imported): a check that the script runs, its times are not GPU numbers. Writes
``bench_quant_kernels.json`` and ``.md`` in ``--out`` (``bench_quant_kernels_tiny.*`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import as_jsonable  # noqa: E402
from benchmarks.ceilings import machine_info, memory_copy_bandwidth  # noqa: E402
from smallthinker_lab.engine import quant  # noqa: E402
from smallthinker_lab.kernels import DEFAULT_BLOCKS, interpreted  # noqa: E402
from smallthinker_lab.kernels import quant_experts as qe  # noqa: E402
from smallthinker_lab.kernels.availability import _pdl_supported  # noqa: E402
from smallthinker_lab.kernels.tables import _p2  # noqa: E402
from smallthinker_lab.model import SmallThinkerConfig  # noqa: E402

FORMATS = ("bf16", "int8", "q4_0")
BF = torch.bfloat16
EPS = 1e-6
TUNE = {"gate_up": [(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8)],
        "down": [(r, w) for r in (1, 2, 4, 8) for w in (2, 4, 8)]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Layers:
    """Every layer's experts in one format, each layer's chosen K, and the step's buffers."""

    def __init__(self, fmt: str, cfg, dev: torch.device, seed: int = 0, std: float = 0.02):
        L, E, K, H, F = (cfg.num_hidden_layers, cfg.num_experts, cfg.top_k, cfg.hidden_size,
                         cfg.moe_ffn_hidden_size)
        self.fmt, self.L, self.E, self.K, self.H, self.F = fmt, L, E, K, H, F
        g = torch.Generator(device=dev).manual_seed(seed)
        pick = torch.Generator().manual_seed(seed + 1)
        shapes = ((F, H), (F, H), (H, F))
        if fmt == "bf16":
            n = F * H
            self.mats, stride = (0, n, 2 * n), 3 * n
        else:
            self.mats, stride = qe.record_layout(fmt, H, F)
            enc = quant.get_format(fmt).encode
        self.bases, self.sel_off, self.sel_w, self.ids = [], [], [], []
        for _ in range(L):
            if fmt == "bf16":
                base = (torch.randn(E * stride, generator=g, device=dev) * std).to(BF)
            else:
                base = torch.zeros(E * stride, dtype=torch.uint8, device=dev)
                for e in range(E):
                    for off, shape in zip(self.mats, shapes):
                        b = enc(torch.randn(shape, generator=g, device=dev) * std)
                        base[e * stride + off:e * stride + off + b.numel()] = b
            ids = torch.randperm(E, generator=pick)[:K].sort().values
            self.ids.append(ids)
            offs = ids[:, None] * stride + torch.tensor(self.mats)
            self.bases.append(base)
            self.sel_off.append(offs.reshape(-1).to(dev))
            self.sel_w.append((torch.rand(K, generator=pick) + 0.1).to(BF).to(dev))
        self.stride = stride
        self.ln = (1 + 0.1 * torch.randn(H, generator=g, device=dev)).to(BF)
        self.x = [torch.randn(1, H, generator=g, device=dev).to(BF), torch.zeros(1, H, dtype=BF, device=dev)]
        self.a = torch.zeros(1, K, F, dtype=BF, device=dev)

    def bytes_per_step(self) -> int:
        return self.L * self.K * qe.expert_bytes(self.fmt, self.H, self.F)

    def launch_layer(self, i: int, blocks: dict, pdl: bool, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        launch = {"launch_pdl": True} if pdl else {}
        H, F, K = self.H, self.F, self.K
        if self.fmt == "bf16":
            from smallthinker_lab.kernels import triton_decode as tk

            gr, gw = blocks["gate_up"]
            dr, dw = blocks["down"]
            tk._gate_up_kernel[(K, -(-F // gr))](x_in, self.ln, self.bases[i], self.sel_off[i], self.a, EPS, H=H,
                                                  F=F, BLOCK_R=gr, BLOCK_H=_p2(H), PDL=pdl, num_warps=gw, **launch)
            tk._down_kernel[(-(-H // dr),)](self.a, self.bases[i], self.sel_off[i], self.sel_w[i], x_in, x_out,
                                            H=H, F=F, K=K, BLOCK_K=_p2(K), BLOCK_R=dr, BLOCK_F=_p2(F), PDL=pdl,
                                            num_warps=dw, **launch)
            return
        qe.launch_gate_up(self.fmt, x_in, self.ln, self.bases[i], self.sel_off[i], self.a, EPS, H, F, K,
                          blocks=blocks, pdl=pdl, launch=launch)
        qe.launch_down(self.fmt, self.a, self.bases[i], self.sel_off[i], self.sel_w[i], x_in, x_out, H, F, K,
                       blocks=blocks, pdl=pdl, launch=launch)

    def launch_step(self, blocks: dict, pdl: bool) -> None:
        for i in range(self.L):  # the residual ping-pongs between two buffers, as layers follow each other
            self.launch_layer(i, blocks, pdl, self.x[i % 2], self.x[1 - i % 2])

    def weights(self, i: int, e: int) -> list[torch.Tensor]:
        """Expert e of layer i dequantised (fp32), by the format's own decoder."""
        shapes = ((self.F, self.H), (self.F, self.H), (self.H, self.F))
        rec = self.bases[i][e * self.stride:(e + 1) * self.stride]
        if self.fmt == "bf16":
            return [rec[o:o + s[0] * s[1]].view(s).float() for o, s in zip(self.mats, shapes)]
        f = quant.get_format(self.fmt)
        return [f.decode(rec[o:o + f.nbytes(s)], s, torch.float32) for o, s in zip(self.mats, shapes)]


def _bf(t: torch.Tensor) -> torch.Tensor:
    f = t.float()
    if interpreted():  # Triton's interpreter rounds fp32 to bf16 toward zero
        f = (f.view(torch.int32) & -65536).view(torch.float32)
    return f.to(BF).float()


def _tol_share(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest error as a share of the tests' tolerance (2^-5 of the value plus 2^-5 of the outputs' RMS)."""
    rms = ref.pow(2).mean().sqrt()
    return float(((got.float() - ref).abs() / (2 ** -5 * (ref.abs() + rms))).max())


def check(layers: Layers, blocks: dict) -> float:
    """Layer 0 against dequantise-then-multiply (fp32 torch, the kernels' bf16 roundings): the largest error of the
    ReGLU activations and of the layer's output, as a share of the tolerance of tests/test_quant_kernels.py (at most
    1 passes)."""
    x_in, x_out = layers.x[0].clone(), torch.zeros_like(layers.x[0])
    layers.launch_layer(0, blocks, False, x_in, x_out)
    xf = x_in.float()[0]
    u = _bf(layers.ln.float() * _bf(xf / torch.sqrt((xf * xf).mean() + EPS)))
    y, acts = torch.zeros_like(xf), []
    for j, e in enumerate(layers.ids[0].tolist()):
        wg, wu, wd = layers.weights(0, e)
        acts.append(_bf(_bf(wu @ u) * _bf(wg @ u).clamp(min=0)))
        a = layers.a[0, j].float()  # the down product of the kernel's own activations
        y = _bf(y + _bf(_bf(wd @ a) * layers.sel_w[0][j].float()))
    err_a = _tol_share(layers.a[0], torch.stack(acts))
    ref = _bf(xf + y)  # the residual dominates the output: the tolerance's RMS is the experts' part
    rms = y.pow(2).mean().sqrt()
    err_out = float(((x_out.float()[0] - ref).abs() / (2 ** -5 * (ref.abs() + rms))).max())
    return max(err_a, err_out)


def time_step(layers: Layers, blocks: dict, pdl: bool, steps: int, repeats: int, graph: bool) -> dict:
    """Seconds per decode step's expert products: median (and min, max) over ``repeats`` runs of ``steps``."""
    dev = layers.bases[0].device
    layers.launch_step(blocks, pdl)  # compiles
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    run = lambda: layers.launch_step(blocks, pdl)  # noqa: E731
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            layers.launch_step(blocks, pdl)
        run = g.replay
        run()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            times.append((time.perf_counter() - t0) / steps)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def tune(layers: Layers, blocks: dict, pdl: bool, steps: int, graph: bool) -> dict:
    """Best tiles of each product kernel, one kernel at a time (the other at its current tiles)."""
    best = dict(blocks)
    for kernel, cands in TUNE.items():
        res = {}
        for c in cands:
            try:
                res[c] = time_step(layers, {**best, kernel: c}, pdl, steps, 1, graph)["median"]
            except Exception as exc:  # noqa: BLE001 - a tile the compiler refuses (too many registers) is skipped
                log(f"  {layers.fmt} {kernel} {c}: {type(exc).__name__}")
        best[kernel] = min(res, key=res.get)
        log(f"  {layers.fmt} {kernel}: best {best[kernel]} {1e6 * res[best[kernel]]:.1f} us/step")
    return best


def markdown(res: dict) -> str:
    h = res["hbm_copy"]
    mode = ", interpreted" if res["interpreted"] else ""
    lines = [f"# Expert products of a decode step per format ({res['preset']}{mode})",
             "", f"{res['date']}, {res['device']}; {res['shape']}. HBM copy {h['median'] / 1e9:.0f} GB/s "
             f"({h['what']}), measured in this run. Time: one step's {2 * res['layers']} expert-product launches "
             f"(CUDA graph: {res['graph']}), median of {res['repeats']} x {res['steps']} steps. Bytes: the chosen "
             "experts' weights (scales included).", ""]
    if res["interpreted"]:
        lines += ["**Triton interpreter on a CPU: the times are not GPU numbers (a check that the script runs).**", ""]
    lines += ["| format | us/step | bytes/step (MiB) | bytes vs bf16 | GB/s | share of HBM bound "
              "| tiles (gate_up, down) | layer-0 error / tolerance |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        us = 1e6 * r["seconds_per_step"]["median"]
        lines.append(f"| {r['format']} | {us:.1f} | {r['bytes_per_step'] / 2**20:.1f} "
                     f"| {r['bytes_vs_bf16']:.2f}x | {r['gb_per_s']:.0f} | {r['hbm_share']:.2f} | "
                     f"{tuple(r['blocks']['gate_up'])}, {tuple(r['blocks']['down'])} | {r['check_error']:.2g}"
                     f"{'' if r['check_ok'] else ' FAILED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--preset", default="smallthinker-4b-a0.6b")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--steps", type=int, default=50, help="replays per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tune", action="store_true", help="sweep the tiles of each format's two kernels first")
    p.add_argument("--tiny", action="store_true", help="the smallthinker-test shape, 1 step (interpreter on a CPU)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.steps, args.repeats = "smallthinker-test", 1, 1
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {bad}; known: {', '.join(FORMATS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not interpreted():
        p.error("needs a CUDA device, or TRITON_INTERPRET=1 with --tiny")
    if not cuda and not args.tiny:
        p.error("without a CUDA device only --tiny runs (in Triton's interpreter)")
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = SmallThinkerConfig.from_name(args.preset)
    graph, pdl = cuda, cuda and _pdl_supported(dev) and bool(DEFAULT_BLOCKS["pdl"])
    hbm = memory_copy_bandwidth(2 * 2**30 if cuda else 16 * 2**20, 10 if cuda else 3, dev.type)
    log(f"HBM copy {hbm['median'] / 1e9:.0f} GB/s ({dev})")
    rows = []
    bf16_bytes = None
    for fmt in formats:
        t0 = time.perf_counter()
        layers = Layers(fmt, cfg, dev)
        blocks = ({"gate_up": DEFAULT_BLOCKS["gate_up"], "down": DEFAULT_BLOCKS["down"]} if fmt == "bf16"
                  else qe.blocks_for(fmt, None))
        if args.tiny:  # few programs: the interpreter runs each in Python
            blocks = {"gate_up": (8, 2), "down": (8, 2)}
        log(f"{fmt}: {layers.L} x {layers.E} experts built in {time.perf_counter() - t0:.1f} s")
        err = check(layers, blocks)
        if args.tune:
            blocks = tune(layers, blocks, pdl, max(5, args.steps // 5), graph)
        t = time_step(layers, blocks, pdl, args.steps, args.repeats, graph)
        nbytes = layers.bytes_per_step()
        bf16_bytes = bf16_bytes or cfg.num_hidden_layers * cfg.top_k * qe.expert_bytes(
            "bf16", cfg.hidden_size, cfg.moe_ffn_hidden_size)
        rate = nbytes / t["median"]
        rows.append({"format": fmt, "seconds_per_step": t, "bytes_per_step": nbytes,
                     "bytes_vs_bf16": bf16_bytes / nbytes, "gb_per_s": rate / 1e9, "hbm_share": rate / hbm["median"],
                     "bound_seconds": nbytes / hbm["median"], "blocks": blocks, "check_error": err,
                     "check_ok": err <= 1.0})
        log(f"{fmt}: {1e6 * t['median']:.1f} us/step, {nbytes / 2**20:.1f} MiB/step, {rate / 1e9:.0f} GB/s "
            f"({rate / hbm['median']:.2f} of HBM), layer-0 error {err:.2g} of the tolerance")
        del layers
        if cuda:
            torch.cuda.empty_cache()
    res = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "preset": args.preset,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu (Triton interpreter)",
           "interpreted": interpreted(), "machine": machine_info(), "torch": torch.__version__,
           "shape": (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, expert width "
                     f"{cfg.moe_ffn_hidden_size}, {cfg.num_experts} experts, top-{cfg.top_k}"),
           "layers": cfg.num_hidden_layers, "graph": graph, "pdl": pdl, "steps": args.steps, "repeats": args.repeats,
           "hbm_copy": hbm, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_quant_kernels" + ("_tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(as_jsonable(res), indent=1) + "\n")
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if all(r["check_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
