"""The distillation loss of recovery and of learned gates: the teacher's targets for a batch
(next-token logits of a causal LM, the pooled last hidden states of an encoder), cached where
they can be rebuilt exactly, and the student's loss against them (see :mod:`headprune.hf.recover`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import forward_kwargs
from .pooling import pool, pooling_of

__all__ = ["distillation_loss"]


def _kwargs(model, batch) -> dict:
    kw = forward_kwargs(model, batch)
    if "logits_to_keep" in kw:
        kw["logits_to_keep"] = 0  # every position's distribution
    return kw


class _Teacher:
    """The teacher's target for a batch: its next-token logits (causal LMs) or its pooled last
    hidden states (encoders). With ``cache``, each batch's target is kept by its index after
    its first use: the pooled states themselves, or the input of the teacher's LM head, from
    which the head gives back the exact logits for a fraction of a forward pass (checked bit
    for bit; a model that transforms the head's output further, e.g. by soft-capping, is not
    cached). The cache holds [batch, seq, hidden] per batch in the model's dtype."""

    def __init__(self, teacher, cache: bool):
        self.model, self.cache = teacher, ({} if cache else None)
        self.modes = pooling_of(teacher)  # an encoder's, which the student's embedding is pooled by too
        get = getattr(teacher, "get_output_embeddings", None)
        self.head = get() if callable(get) else None

    @torch.no_grad()
    def __call__(self, index: int, kw: dict) -> torch.Tensor:
        hit = None if self.cache is None else self.cache.get(index)
        if hit is not None:
            return self.head(hit[1]) if hit[0] else hit[1]
        seen = []
        hook = None if self.head is None else self.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            out = self.model(**kw)
        finally:
            if hook is not None:
                hook.remove()
        if getattr(out, "logits", None) is None:
            target = pool(out.last_hidden_state, kw.get("attention_mask"), self.modes)
            entry = (False, target)
        else:
            target = out.logits
            entry = (True, seen[0]) if len(seen) == 1 and torch.equal(self.head(seen[0]), target) else None
        if self.cache is not None:
            if entry is None:
                self.cache = None  # this model's logits cannot be rebuilt from the head's input
            else:
                self.cache[index] = entry
        return target


def _loss(student, target: torch.Tensor, kw: dict, modes: tuple = ("mean_tokens",)) -> torch.Tensor:
    """The distillation loss of one batch (see the module doc) against the teacher's ``target``
    (an encoder's pooled by ``modes``, the teacher's :attr:`_Teacher.modes`)."""
    out = student(**kw)
    mask = kw.get("attention_mask")
    if getattr(out, "logits", None) is None:
        return (1 - F.cosine_similarity(pool(out.last_hidden_state, mask, modes), target.float(), dim=-1)).mean()
    log_s = F.log_softmax(out.logits.float(), -1)
    log_t = F.log_softmax(target.float(), -1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    if mask is None or per_token.dim() == 1:  # [batch, classes] logits (a classifier): one distribution each
        return per_token.mean()
    m = mask.to(per_token.device, per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def distillation_loss(student, teacher, batch) -> torch.Tensor:
    """The loss :func:`recover` minimises, on one batch (with gradients for the student)."""
    kw = _kwargs(student, batch)
    targets = _Teacher(teacher, cache=False)
    return _loss(student, targets(0, kw), kw, targets.modes)
