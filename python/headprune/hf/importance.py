"""Gradient-based head importance (Michel et al., 2019), the comparison baseline.

Each head's output is multiplied by a gate g_h = 1 just before the output projection; the
importance of a head is the mean over calibration batches of |dL/dg_h|. It needs no labels:

* causal LMs: L is the model's own next-token loss on the calibration text;
* encoders: L is an in-batch contrastive loss (InfoNCE, temperature 0.05) that matches each
  paragraph's first half to its second half through mean-pooled embeddings, i.e. the
  sentence-embedding objective itself. (The fidelity loss 1 - cos(f_g(x), f_1(x)) is useless
  here: its gradient at g = 1 is exactly zero.)

It costs a backward pass per batch, unlike the entropy statistics, which come from the forward
pass alone. Returns a ``[L, H]`` tensor usable as ``select_heads(scores, score=..., order="low")``.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from .adapters import get_adapter, head_counts, head_dim, resolve_sites

__all__ = ["gradient_importance"]


def _gate_hook(gate: torch.Tensor, d: int):
    def pre(module, args):
        x = args[0]
        gated = (x.unflatten(-1, (gate.shape[0], d)) * gate.to(x.dtype)[:, None]).flatten(-2)
        return (gated, *args[1:])

    return pre


def _contrastive_loss(model, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    keep = lengths >= 8
    if keep.sum() < 2:
        raise ValueError("batches: the contrastive loss needs >= 2 sequences of >= 8 tokens per batch")
    ids, mask, lengths = ids[keep], mask[keep], lengths[keep]
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    first = mask.bool() & (pos < (lengths // 2)[:, None])
    second = mask.bool() & ~first
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h

    def pool(m):
        m = m.unsqueeze(-1).float()
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    logits = pool(first) @ pool(second).T / 0.05
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def _loss(model, batch, causal: bool) -> torch.Tensor:
    if causal:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    return _contrastive_loss(model, batch)


def gradient_importance(model, batches, *, causal: bool | None = None) -> torch.Tensor:
    """Mean |dL/dg| per attention site and query head, ``[L, max heads]`` float64 (NaN pads).

    The model's parameters get no gradients (they are frozen for the call and restored), and
    the gates are removed on every exit path.
    """
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if causal is None:
        causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
    counts = [head_counts(s, adapter)[0] for s in sites]
    gates = [torch.ones(h, dtype=torch.float32, device=next(model.parameters()).device, requires_grad=True)
             for h in counts]
    total = torch.zeros(len(sites), max(counts), dtype=torch.float64)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    n = 0
    with ExitStack() as stack:
        for site, gate in zip(sites, gates):
            stack.callback(site.o.register_forward_pre_hook(_gate_hook(gate, head_dim(site, adapter))).remove)
        stack.callback(lambda: [p.requires_grad_(f) for p, f in flags.items()])
        stack.callback(lambda: model.train(was_training))
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for batch in batches:
            for g in gates:
                g.grad = None
            _loss(model, batch, causal).backward()
            for i, g in enumerate(gates):
                total[i, : counts[i]] += g.grad.abs().double().cpu()
            n += 1
    if n == 0:
        raise ValueError("batches: expected at least one batch, got none")
    out = total / n
    for i, c in enumerate(counts):
        out[i, c:] = float("nan")
    return out

