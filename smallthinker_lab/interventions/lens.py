"""The logit lens: the residual stream after each layer read through the final norm and the LM head.

    df = sl.logit_lens(model, "def add(a, b):", top=5)
    sl.interventions.plots.plot_logit_lens(df)

For layer l the residual ``blocks.{l}.hook_resid_post`` (B=1, T, H) goes through the model's final RMSNorm and LM
head; the softmax (fp32) over the vocabulary gives what the model "would predict" after that layer. The last layer's
row is the model's own output distribution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .edit import hooks


def _ids(model, prompt, tokenizer) -> torch.Tensor:
    from ..model.generate import prompt_ids, token_ids

    if isinstance(prompt, str):
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        prompt = prompt_ids(prompt, tok, "cpu", getattr(model, "name_or_path", None) or "the model")
    ids = token_ids(prompt, model.config.vocab_size)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"logit_lens takes one sequence of token ids, (T,) or (1, T); got shape {list(ids.shape)}")
    return ids


def _pieces(tokenizer, ids: np.ndarray) -> np.ndarray | None:
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return None
    from ..instruments.record import token_pieces

    return token_pieces(tokenizer, ids)


@torch.inference_mode()
def logit_lens(model, prompt, layers=None, top: int = 5, tokenizer=None) -> pd.DataFrame:
    """Per layer and position, the ``top`` tokens of the residual after the layer through the final norm and LM head.

    ``model``: a SmallThinkerForCausalLM; ``prompt``: text (encoded with ``tokenizer`` or the model's own), a list
    of ids or a (T,) / (1, T) tensor; ``layers``: None (all) or a list of layer ids.
    Returns a tidy DataFrame, one row per (layer, position, rank): layer, position, token_id / token (the input at
    that position), rank (0 = most probable), pred_id / pred (the predicted token), prob, and next_prob: the
    probability of the actual next input token (NaN at the last position). ``attrs``: layers, num_hidden_layers.
    """
    from ..model import SmallThinkerForCausalLM

    if not isinstance(model, SmallThinkerForCausalLM):
        raise TypeError(f"logit_lens needs a SmallThinkerForCausalLM, got {type(model).__name__}")
    L = model.config.num_hidden_layers
    layers = list(range(L)) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"logit_lens: layers {bad} are out of range (the model has {L} layers)")
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= model.config.vocab_size:
        raise ValueError(f"top must be an integer in [1, {model.config.vocab_size}], got {top!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ids = _ids(model, prompt, tokenizer).to(model.device)
    resid: dict[int, torch.Tensor] = {}

    def keep(x, name):
        resid[int(name.split(".")[1])] = x[0]  # (T, H)

    with hooks(model, {tuple(f"blocks.{i}.hook_resid_post" for i in layers): keep}):
        model(ids[None])
    T = ids.numel()
    nxt = torch.cat([ids[1:], ids.new_full((1,), -1)])  # (T,)
    frames = []
    for i in layers:
        logp = torch.log_softmax(model.lm_head(model.model.norm(resid[i])).float(), dim=-1)  # (T, V)
        p, pred = logp.exp().topk(top, dim=-1)  # (T, top)
        next_prob = logp.exp().gather(-1, nxt.clamp(min=0)[:, None])[:, 0].masked_fill(nxt < 0, float("nan"))
        frames.append(pd.DataFrame({
            "layer": i, "position": np.repeat(np.arange(T), top), "rank": np.tile(np.arange(top), T),
            "pred_id": pred.reshape(-1).cpu().numpy(), "prob": p.reshape(-1).cpu().numpy(),
            "next_prob": np.repeat(next_prob.cpu().numpy(), top)}))
    df = pd.concat(frames, ignore_index=True)
    ids_np = ids.cpu().numpy()
    df.insert(2, "token_id", ids_np[df["position"].to_numpy()])
    pieces_in, pieces_out = _pieces(tokenizer, ids_np), _pieces(tokenizer, df["pred_id"].to_numpy())
    if pieces_in is not None:
        df.insert(3, "token", pieces_in[df["position"].to_numpy()])
        df.insert(df.columns.get_loc("pred_id") + 1, "pred", pieces_out)
    df.attrs.update({"layers": layers, "num_hidden_layers": L, "top": top})
    return df
