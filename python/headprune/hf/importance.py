"""Gradient-based head importance (Michel et al., 2019), the comparison baseline.

Each head's output is multiplied by a gate g_h = 1 just before the output projection
(:func:`~headprune.hf.gates.gates`); the importance of a head is the mean over calibration
batches of |dL/dg_h|. It needs no labels:

* causal LMs: L is the model's own next-token loss on the calibration text;
* text encoders: L is an in-batch contrastive loss (InfoNCE, temperature 0.05) that matches
  each paragraph's first half to its second half through mean-pooled embeddings, i.e. the
  sentence-embedding objective itself, whatever pooling the model's sentence-transformers
  pipeline names (a half has no first token of its own). (The fidelity loss
  1 - cos(f_g(x), f_1(x)) is useless here: its gradient at g = 1 is exactly zero.) Image
  models (ViT) are refused: their batches carry no text to split.

It costs a backward pass per batch, unlike the entropy statistics, which come from the forward
pass alone. Returns a ``[L, H]`` tensor usable as ``select_heads(scores, score=..., order="low")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import get_adapter
from .batches import batch_on_device
from .gates import frozen, gates
from .training import check_inputs

__all__ = ["gradient_importance"]


#: a batch's inputs besides the tokens and their mask that shape what the model computes
_ALSO = ("token_type_ids", "position_ids")


def _also(batch, keep=None) -> dict:
    """The batch's :data:`_ALSO` inputs (its sequences ``keep``, if given): sentence pairs'
    segments and given positions reach the model as ``collect`` passes them."""
    also = {k: batch[k] for k in _ALSO if batch.get(k) is not None}
    if keep is None:
        return also
    return {k: v[keep] if v.shape[0] == len(keep) else v for k, v in also.items()}  # [1, L] positions broadcast


def _contrastive_loss(model, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    keep = lengths >= 8
    if keep.sum() < 2:
        raise ValueError("batches: the contrastive loss needs >= 2 sequences of >= 8 tokens per batch")
    ids, mask, lengths = ids[keep], mask[keep], lengths[keep]
    pos = mask.cumsum(1) - 1  # the place among the sequence's own tokens, padded left or right
    first = mask.bool() & (pos < (lengths // 2)[:, None])
    second = mask.bool() & ~first
    out = model(input_ids=ids, attention_mask=mask, **_also(batch, keep))
    if getattr(out, "last_hidden_state", None) is None:
        raise ValueError(f"model: the contrastive loss pools the hidden states of a base model (AutoModel); "
                         f"{type(model).__name__} returns none (pass causal=True for a causal LM)")
    h = out.last_hidden_state
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h

    def pool(m):
        m = m.unsqueeze(-1).float()
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    logits = pool(first) @ pool(second).T / 0.05
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def _loss(model, batch, causal: bool) -> torch.Tensor:
    if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
        raise ValueError("batches: gradient importance takes text batches, dicts with input_ids and attention_mask")
    batch = batch_on_device(model, batch)
    if causal:
        valid = batch["attention_mask"] != 0  # a token to predict from the one before it, both real
        if not bool((valid[:, 1:] & valid[:, :-1]).any()):  # the loss NaN (or of padding), its gradients 0
            raise ValueError("batches: a batch has no token to predict (every sequence holds at most one token); "
                             "gradient importance needs sequences of two tokens or more")
        labels = batch["input_ids"].long().masked_fill(~valid, -100)  # the loss takes int64
        labels[:, 1:].masked_fill_(~valid[:, :-1], -100)  # nor a real token predicted from padding (left padding)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     use_cache=False, **_also(batch)).loss  # no KV cache to build and drop
    return _contrastive_loss(model, batch)


def gradient_importance(model, batches, *, causal: bool | None = None) -> torch.Tensor:
    """Mean |dL/dg| per attention site and query head, ``[L, max heads]`` float64 (NaN pads).

    The gates are float32 (float64 for a float64 model). The model's parameters get no
    gradients (they are frozen for the call and restored), and the gates are removed on
    every exit path.
    """
    check_inputs(batches, False, "gradient_importance", model=model)
    get_adapter(model)  # a plain torch model is refused by name (it has no config)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"model: gradient importance takes causal LMs and encoders, not {type(model).__name__} "
                         "(encoder-decoder)")
    if causal is not None and not isinstance(causal, bool):
        raise TypeError(f"causal: expected True, False or None, got {type(causal).__name__}")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if causal is None:  # a causal family with its LM head; a masked LM's lm_head is no next-token head
        causal = get_adapter(model).kind == "causal" and head is not None
    elif causal and head is None:
        raise ValueError(f"causal: True needs a model with a language-model head (the next-token loss), and "
                         f"{type(model).__name__} has none; load it with AutoModelForCausalLM, or pass causal=False")
    n = 0
    with gates(model) as g, frozen(model), torch.enable_grad():
        total = torch.zeros(g.shape, dtype=torch.float64)
        for batch in batches:
            g.gate.grad = None
            _loss(model, batch, causal).backward()
            total += g.gate.grad.abs().double().cpu()
            n += 1
    if n == 0:
        raise ValueError("batches: expected at least one batch, got none")
    out = total / n
    for i, c in enumerate(g.num_heads):
        out[i, c:] = float("nan")
    return out
