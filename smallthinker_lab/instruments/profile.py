"""``profile(target, prompts)``: run a prompt set with recording on, behind a progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..prompt_sets import load_prompt_set
from .record import KINDS, record
from .recording import Recording


def encode_prompt(tokenizer, prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt: ids pass through; a str goes through ``tokenizer`` (a Hugging Face tokenizer, a
    ``tokenizers.Tokenizer`` or any callable str -> ids), with the chat template when ``chat``."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer: pass tokenizer=, or give token ids")
    if chat:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("chat=True needs a tokenizer with apply_chat_template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(t) for t in ids]
    if hasattr(tokenizer, "encode"):
        enc = tokenizer.encode(prompt)
        return [int(t) for t in getattr(enc, "ids", enc)]
    out = tokenizer(prompt)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def profile(target, prompts: str | Iterable[str | Sequence[int]], dataset: str | None = None,
            max_new_tokens: int = 16, kinds: Iterable[str] = KINDS, layers=None, full=False, tokenizer=None,
            progress: bool = True, chat: bool = False, **generate_kwargs) -> Recording:
    """Generate ``max_new_tokens`` after each prompt with recording on; one Recording labelled ``dataset``.

    target: a SmallThinkerForCausalLM (run with ``stream_generate``) or an Engine (``engine.generate``).
    prompts: the name of a shipped prompt set (``"wiki-en"``), or strings (encoded with ``tokenizer``, by
    default the target's ``.tokenizer``) or token-id lists. ``dataset``: the label of the recorded rows; by
    default the prompt set's name (also of a :func:`~smallthinker_lab.analysis.widgets.load_prompt_set` result), else
    ``"prompts"``. generate_kwargs go to the generation call (temperature, seed, stop_tokens, ...).
    """
    from tqdm.auto import tqdm

    from ..model import SmallThinkerForCausalLM
    from ..model.generate import stream_generate

    tokenizer = tokenizer if tokenizer is not None else getattr(target, "tokenizer", None)
    if isinstance(prompts, str):
        prompts = load_prompt_set(prompts)
    dataset = dataset if dataset is not None else getattr(prompts, "name", None) or "prompts"
    prompts = list(prompts)
    is_model = isinstance(target, SmallThinkerForCausalLM)
    with record(target, kinds=kinds, layers=layers, full=full, dataset=dataset, tokenizer=tokenizer) as rec:
        for prompt in tqdm(prompts, desc=f"profile {dataset}", unit="prompt", disable=not progress):
            ids = encode_prompt(tokenizer, prompt, chat)
            if is_model:
                for _ in stream_generate(target, ids, max_new_tokens, **generate_kwargs):
                    pass
            else:
                target.generate(ids, max_new_tokens, **generate_kwargs)
    return rec
