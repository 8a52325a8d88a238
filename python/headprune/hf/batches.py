"""Calibration batches as a model's forward sees them: keyword arguments, progress, skipping."""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Mapping

import torch

__all__ = ["check_batches", "forward_kwargs", "progress", "skip", "sequence_digests"]


def check_batches(batches) -> None:
    """``TypeError`` naming ``batches`` unless it is an iterable of batches (not one batch, a
    string or ``None``); the batches themselves are checked as the model takes them."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError("batches: expected an iterable of batches (e.g. a list of dicts), got a single batch; "
                        "pass [batch]")
    if batches is None or isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches: expected an iterable of batches (e.g. a list of dicts), got "
                        f"{type(batches).__name__}")


def forward_kwargs(model, batch) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches: expected dicts of tensors (e.g. a tokenizer's output), got {type(batch).__name__}")
    if not any(k in batch for k in ("input_ids", "pixel_values", "inputs_embeds")):
        raise ValueError(f"batches: a batch needs input_ids, inputs_embeds or pixel_values; got keys {sorted(batch)}")
    for k in ("input_ids", "pixel_values", "inputs_embeds"):
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and (v.dim() < 2 or 0 in v.shape[:2]):
            raise ValueError(f"batches: a batch's {k!r} is empty or not batched (shape {tuple(v.shape)})")
    device = next(model.parameters()).device
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and "use_cache" not in kw:
        kw["use_cache"] = False  # a KV cache would only cost memory here
    if "logits_to_keep" in params and "logits_to_keep" not in kw and "labels" not in kw:
        kw["logits_to_keep"] = 1  # [B, S, vocab] logits would be computed and dropped
    return kw


def progress(batches, enabled, done=0, total=None):
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches
    return tqdm(batches, desc="headprune: collecting", unit="batch", initial=done, total=total)


def skip(it, n: int, path) -> None:
    """Advance ``it`` past the ``n`` batches a checkpoint already holds."""
    skipped = sum(1 for _ in itertools.islice(it, n))
    if skipped < n:
        raise ValueError(f"checkpoint {path} records {n} batches done but batches has only {skipped}; "
                         "delete it or drop --resume")


def sequence_digests(kw: dict) -> list:
    """One 64-bit digest (a signed int) per sequence of a batch's keyword arguments: of every
    batched tensor's row (names, types and values), the positions the attention mask leaves
    out dropped, so one sequence padded otherwise in another batch digests the same."""
    rows = next(v.shape[0] for k, v in kw.items() if k in ("input_ids", "inputs_embeds", "pixel_values")
                and isinstance(v, torch.Tensor))
    mask = kw.get("attention_mask")
    mask = mask.bool().cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    tensors = sorted((k, v.detach().cpu()) for k, v in kw.items()
                     if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows and k != "attention_mask")
    out = []
    for r in range(rows):
        h = hashlib.blake2b(digest_size=8)
        for k, v in tensors:
            row = v[r][mask[r]] if mask is not None and v.shape[:2] == mask.shape else v[r]
            h.update(f"{k}:{row.dtype}:{tuple(row.shape)};".encode())
            h.update(row.contiguous().numpy().tobytes() if row.dtype != torch.bfloat16 else row.float().numpy().tobytes())
        out.append(int.from_bytes(h.digest(), "little", signed=True))
    return out
