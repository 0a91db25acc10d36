"""KV cache: a growing buffer for global layers, a ring buffer for sliding-window layers.

Every slot remembers the absolute position it holds, so attention masks are built from
positions (causal, and q_pos - k_pos < window on sliding layers) whatever the slot order.
Shape letters: B batch, k kv heads, C slots, D head_dim.
"""

from __future__ import annotations

import torch

from .config import SmallThinkerConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config: SmallThinkerConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V bytes one token adds to one layer (batch 1)."""
    return 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)


def kv_cache_bytes(config: SmallThinkerConfig, context_len: int, dtype: torch.dtype = torch.bfloat16,
                   all_global: bool = False, per_layer: bool = False) -> int | list[int]:
    """Analytic KV-cache size for one sequence of ``context_len`` tokens.

    Sliding-window layers keep min(context_len, sliding_window_size) positions, global layers all of them.
    ``all_global=True`` gives the baseline where every layer attends globally.
    """
    per_tok = kv_bytes_per_token(config, dtype)
    sizes = []
    for i in range(config.num_hidden_layers):
        kept = context_len if (all_global or not config.is_sliding(i)) else min(context_len, config.sliding_window_size)
        sizes.append(per_tok * kept)
    return sizes if per_layer else sum(sizes)


class LayerKVCache:
    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int | None, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 64) -> None:
        self.batch, self.n_kv, self.head_dim, self.window = batch, n_kv, head_dim, window
        self.dtype, self.device = dtype, torch.device(device)
        cap = min(capacity, window) if window else capacity
        self.k = torch.zeros(batch, n_kv, cap, head_dim, dtype=dtype, device=device)  # (B, k, C, D)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((cap,), -1, dtype=torch.long, device=device)  # absolute position per slot
        self.length = 0  # tokens seen
        self.bytes_per_position = 2 * batch * n_kv * head_dim * self.k.element_size()  # K and V

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def filled(self) -> int:
        return min(self.length, self.window) if self.window else self.length

    @property
    def nbytes(self) -> int:
        """Bytes of the positions held (what the analytic formula counts)."""
        length, window = self.length, self.window
        return self.bytes_per_position * (min(length, window) if window else length)

    @property
    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _grow(self, need: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        if self.window:
            new_cap = min(new_cap, self.window)
        k = torch.zeros(self.batch, self.n_kv, new_cap, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        pos = torch.full((new_cap,), -1, dtype=torch.long, device=self.device)
        # slots are indexed by position % capacity on sliding layers: re-place them
        n = self.filled
        if n:
            old_slots = self._slots_of_last(n, cap)
            new_slots = self._slots_of_last(n, new_cap)
            k[:, :, new_slots] = self.k[:, :, old_slots]
            v[:, :, new_slots] = self.v[:, :, old_slots]
            pos[new_slots] = self.pos[old_slots]
        self.k, self.v, self.pos = k, v, pos

    def _slots_of_last(self, n: int, cap: int) -> torch.Tensor:
        positions = torch.arange(self.length - n, self.length, device=self.device)
        return positions % cap if self.window else positions

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return the keys, values and positions attention must see.

        k_new, v_new: (B, k, T, D); positions: (T,) absolute, contiguous, starting at self.length.
        """
        T = k_new.shape[2]
        if self.window is None:
            self._grow(self.length + T)
            s = self.length
            self.k[:, :, s:s + T] = k_new
            self.v[:, :, s:s + T] = v_new
            self.pos[s:s + T] = positions
            self.length += T
            n = self.length
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]
        # sliding window: attend over what the ring holds plus every new key, then keep the last `window`
        self._grow(min(self.length + T, self.window))
        old_n = self.filled
        if old_n:
            k_all = torch.cat((self.k[:, :, :old_n] if old_n < self.capacity else self.k, k_new), dim=2)
            v_all = torch.cat((self.v[:, :, :old_n] if old_n < self.capacity else self.v, v_new), dim=2)
            p_all = torch.cat((self.pos[:old_n] if old_n < self.capacity else self.pos, positions))
        else:
            k_all, v_all, p_all = k_new, v_new, positions
        keep = min(T, self.window)
        slots = positions[T - keep:] % self.capacity
        self.k[:, :, slots] = k_new[:, :, T - keep:]
        self.v[:, :, slots] = v_new[:, :, T - keep:]
        self.pos[slots] = positions[T - keep:]
        self.length += T
        return k_all, v_all, p_all

    def save_overwritable(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What writing ``tokens`` more positions may overwrite, for :meth:`truncate` to put back: on a sliding layer
        whose ring is full, its ``tokens`` oldest entries (positions, keys, values); None when nothing can be lost."""
        if self.window is None or self.length + tokens <= self.window:
            return None
        if tokens > self.window:
            raise ValueError(f"cannot keep {tokens} tokens for a rollback on a sliding layer of window {self.window}")
        lo, hi = self.length - self.window, self.length - self.window + tokens
        held = (self.pos >= lo) & (self.pos < hi)  # (C,)
        return self.pos[held].clone(), self.k[:, :, held].clone(), self.v[:, :, held].clone()

    def truncate(self, length: int, saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Forget every position >= ``length`` (a rejected speculative draft). On a sliding layer, entries the
        forgotten positions overwrote come back from ``saved`` (:meth:`save_overwritable`, taken before writing)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} positions to {length}")
        self.pos[self.pos >= length] = -1
        if saved is not None:
            pos, k, v = saved
            back = pos >= length - self.window  # still inside the window after the rollback
            slots = pos[back] % self.capacity
            self.k[:, :, slots], self.v[:, :, slots], self.pos[slots] = k[:, :, back], v[:, :, back], pos[back]
        self.length = length


class KVCache:
    """One LayerKVCache per layer; reports bytes per layer."""

    def __init__(self, config: SmallThinkerConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", capacity: int = 64) -> None:
        self.config = config
        self.layers = [
            LayerKVCache(batch_size, config.num_key_value_heads, config.head_dim,
                         config.sliding_window_size if config.is_sliding(i) else None, dtype, device, capacity)
            for i in range(config.num_hidden_layers)
        ]

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seq_len(self) -> int:
        return self.layers[0].length if self.layers else 0

    def bytes_per_layer(self) -> list[int]:
        return [layer.nbytes for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_per_layer())

    def save_overwritable(self, tokens: int) -> list:
        """Per layer, what writing ``tokens`` more positions may overwrite (:meth:`LayerKVCache.save_overwritable`)."""
        return [layer.save_overwritable(tokens) for layer in self.layers]

    def truncate(self, length: int, saved: list | None = None) -> None:
        """Keep the first ``length`` positions of every layer, restoring what ``saved`` kept of sliding layers."""
        for i, layer in enumerate(self.layers):
            layer.truncate(length, saved[i] if saved is not None else None)

    def reset(self) -> None:
        for layer in self.layers:
            layer.pos.fill_(-1)
            layer.length = 0
