"""``KernelRunner``: the in-memory model decoding through the kernels (prefill eager), the kernel path's reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.generate import GenerationResult, GenerationStats, SamplingConfig, stream_tokens, token_ids
from ..model.kv_cache import KVCache
from .availability import unavailable_reason
from .decode_kernels import DecodeKernels
from .tables import ExpertTable, pack_experts


class KernelRunner:
    """The in-memory model with kernel decode: ``step(ids)`` prefills eagerly (the model's forward, into a KV cache
    of ``max_context`` positions) and decodes one token through ``DecodeKernels``. Packs the model's experts, or
    decodes with ``experts`` (an ExpertTable, e.g. quantized: ``smallthinker_lab.engine.quant.kernel_experts``;
    prefill then stays the model's own, over its bf16 experts). Under ``interventions.replay`` of the model, decode
    steps route to the trace's experts inside the kernels (the prefill through the model's hooks)."""

    def __init__(self, model, max_context: int | None = None, graph: bool = True, blocks: dict | None = None,
                 experts: ExpertTable | None = None):
        cfg = model.config
        reason = unavailable_reason(model.device)
        if reason:
            raise RuntimeError(reason)
        self.model = model
        self.max_context = int(max_context or min(2048, cfg.max_position_embeddings))
        self.kv = KVCache(cfg, 1, model.dtype, model.device, capacity=self.max_context)
        table = experts if experts is not None else pack_experts(model)
        self.kernels = DecodeKernels(model, self.kv, table, graph=graph, blocks=blocks)
        self._forced_args = (table, graph, blocks)
        self.forced_kernels: DecodeKernels | None = None  # built on the first step under a routing replay

    def reset(self) -> None:
        self.kv.reset()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.model.device).view(1, -1)
        start, T = self.kv.seq_len, ids.shape[1]
        if start + T > self.max_context:
            raise ValueError(f"sequence too long: {start + T} tokens exceeds max_context={self.max_context}")
        if T == 1 and start > 0:
            source = self.model.hooks.forced_routing()
            if source is None:
                return self.kernels.step(ids, start).clone()  # the step's buffer is overwritten by the next
            # a routing replay (interventions.replay): the kernels route to the trace's experts
            if self.forced_kernels is None:
                table, graph, blocks = self._forced_args
                self.forced_kernels = DecodeKernels(self.model, self.kv, table, graph=graph, blocks=blocks,
                                                    forced=True)
            self.forced_kernels.forced.copy_(source.take(start)[0])
            return self.forced_kernels.step(ids, start).clone()
        return self.model(ids, cache=self.kv).logits[:, -1:]

    __call__ = step

    def stream(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
               stats: GenerationStats | None = None):
        """The model's ``stream_generate`` with kernel decode (token ids in; a new KV cache each call)."""
        self.reset()
        ids = token_ids(prompt, self.model.config.vocab_size).reshape(1, -1).to(self.model.device)
        stop = self.model.config.eos_ids() if stop_tokens is None else stop_tokens
        return stream_tokens(self.step, ids, max_new_tokens, SamplingConfig(temperature, top_k, top_p, seed), stop,
                             stats)

    def generate(self, prompt, max_new_tokens: int = 32, **sampling) -> GenerationResult:
        """The model's ``generate`` with kernel decode: a GenerationResult (tokens, timings)."""
        stats = GenerationStats()
        tokens = list(self.stream(prompt, max_new_tokens, stats=stats, **sampling))
        return GenerationResult(tokens, None, stats.prompt_tokens, stats)
