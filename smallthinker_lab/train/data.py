"""Training data: memory-mapped uint16 token files per domain and a seeded window sampler.

Layout of a token folder (written by ``smallthinker-lab data prepare``)::

    {domain}.bin       flat uint16 token ids, documents separated by token 0 (<|endoftext|>)
    {domain}.val.bin   the held-out validation split of that domain, same format

A training batch is B windows of T + 1 consecutive tokens (inputs are the first T, targets the last T), each
window from one domain, at a uniformly random offset (windows may cross document boundaries, as in GPT-style
pretraining). The batch for step s depends only on (seed, s), so a resumed run sees the same data without any
sampler state. Shape letters: B sequences, T tokens.
"""

from __future__ import annotations

import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def packed_parts(path: str | os.PathLike) -> list[Path]:
    """The xz parts ``{name}.000.xz, {name}.001.xz, ...`` that stand for token file ``path`` (empty if none)."""
    path = Path(path)
    parts = []
    while (p := path.with_name(f"{path.name}.{len(parts):03d}.xz")).exists():
        parts.append(p)
    return parts


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """A flat uint16 token file, memory-mapped read-only; or, where only its packed xz parts are there
    (``smallthinker-lab data tokenize --pack``), those parts decompressed and concatenated in memory."""
    path = Path(path)
    if not path.exists():
        parts = packed_parts(path)
        if not parts:
            raise FileNotFoundError(f"no token file at {path} (nor its packed parts {path.name}.000.xz, ...)")
        chunks = []
        for p in parts:
            try:
                chunks.append(lzma.decompress(p.read_bytes()))
            except lzma.LZMAError as e:
                raise ValueError(f"{p} is not a complete xz stream: {e}") from e
        data = b"".join(chunks)
        if len(data) % 2:
            raise ValueError(f"the packed parts of {path} hold an odd number of bytes: not uint16 tokens")
        return np.frombuffer(data, dtype=np.uint16)
    if path.stat().st_size % 2:
        raise ValueError(f"{path} has an odd number of bytes: not a uint16 token file")
    return np.memmap(path, dtype=np.uint16, mode="r")


def discover_domains(data_dir: str | os.PathLike) -> list[str]:
    """Domain names of the ``{domain}.bin`` training files (or their packed parts) in ``data_dir``, sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no token folder at {data_dir}")
    files = [p.name for p in data_dir.glob("*.bin")]
    files += [p.name[: -len(".000.xz")] for p in data_dir.glob("*.bin.000.xz")]
    names = sorted({n[: -len(".bin")] for n in files if not n.endswith(".val.bin")})
    if not names:
        raise FileNotFoundError(f"no {{domain}}.bin token files (nor packed parts) in {data_dir}")
    return names


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T + 1) int64
    domains: torch.Tensor  # (B,) int64, index into the sampler's domain list


class WindowSampler:
    """Seeded (B, T + 1) windows from several domains, mixed by weight.

    ``weights``: "balanced" (every domain equally, whatever its size: the default), "proportional" (by token
    count) or a dict {domain: weight}. The number of windows per domain in a batch is B * w rounded, the
    remainder drawn at random, so a balanced batch of B = 4n holds n windows of each of 4 domains.
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0,
                 weights: str | dict[str, float] = "balanced", domains: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.domains = list(domains) if domains is not None else discover_domains(self.data_dir)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.arrays = [load_tokens(self.data_dir / f"{d}.bin") for d in self.domains]
        for d, a in zip(self.domains, self.arrays):
            if len(a) < self.seq_len + 2:
                raise ValueError(f"domain {d!r} has {len(a)} tokens, fewer than one window of {self.seq_len + 1}")
        self.weights = self._resolve_weights(weights)

    def _resolve_weights(self, weights: str | dict[str, float]) -> np.ndarray:
        if weights == "balanced":
            w = np.ones(len(self.domains))
        elif weights == "proportional":
            w = np.array([len(a) for a in self.arrays], dtype=np.float64)
        elif isinstance(weights, dict):
            unknown = set(weights) - set(self.domains)
            if unknown:
                raise ValueError(f"weights for unknown domains {sorted(unknown)}; domains are {self.domains}")
            w = np.array([float(weights.get(d, 0.0)) for d in self.domains])
        else:
            raise ValueError(f"weights must be 'balanced', 'proportional' or a dict, got {weights!r}")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"domain weights must be non-negative with a positive sum, got {w.tolist()}")
        return w / w.sum()

    def domain_counts(self, rng: np.random.Generator) -> np.ndarray:
        """Windows per domain for one batch: floor(B * w) plus the remainder drawn by weight."""
        exact = self.batch_size * self.weights
        counts = np.floor(exact).astype(np.int64)
        rest = self.batch_size - int(counts.sum())
        if rest:
            frac = exact - counts
            extra = rng.choice(len(self.domains), size=rest, replace=False, p=frac / frac.sum())
            counts[extra] += 1
        return counts

    def batch(self, step: int) -> Batch:
        """The batch of training step ``step`` (a pure function of seed and step)."""
        rng = np.random.default_rng([self.seed, int(step)])
        counts = self.domain_counts(rng)
        dom = np.repeat(np.arange(len(self.domains)), counts)
        rng.shuffle(dom)
        W = self.seq_len + 1
        out = np.empty((self.batch_size, W), dtype=np.int64)
        for i, d in enumerate(dom):
            a = self.arrays[d]
            start = int(rng.integers(0, len(a) - W + 1))
            out[i] = a[start: start + W]
        return Batch(torch.from_numpy(out), torch.from_numpy(dom.astype(np.int64)))


def validation_windows(path: str | os.PathLike, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of the validation file: (N, T + 1) int64, targets cover each token once.

    Window i holds tokens [i*T, i*T + T + 1). With ``max_windows`` the first N windows are taken.
    """
    a = load_tokens(path)
    n = (len(a) - 1) // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise ValueError(f"{path} has {len(a)} tokens, fewer than one window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (N, T + 1)
    return torch.from_numpy(np.asarray(a[idx], dtype=np.int64))


def validation_sets(data_dir: str | os.PathLike, domains: list[str], seq_len: int,
                    max_windows: int | None = None) -> dict[str, torch.Tensor]:
    """{domain: windows} for the domains that have a ``{domain}.val.bin`` file (or its packed parts)."""
    data_dir = Path(data_dir)
    return {d: validation_windows(data_dir / f"{d}.val.bin", seq_len, max_windows)
            for d in domains if (data_dir / f"{d}.val.bin").exists() or packed_parts(data_dir / f"{d}.val.bin")}
