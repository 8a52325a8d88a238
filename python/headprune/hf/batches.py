"""Calibration batches as a model's forward sees them: keyword arguments, progress, skipping."""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Mapping

import torch

from ..core.modules import input_device

__all__ = ["batch_on_device", "check_batches", "check_batch", "check_ids", "batch_rows", "forward_kwargs", "progress",
           "skip", "sequence_digests"]


def check_batches(batches) -> None:
    """``TypeError`` naming ``batches`` unless it is an iterable of batches (not one batch, a
    string or ``None``); the batches themselves are checked as the model takes them."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError("batches: expected an iterable of batches (e.g. a list of dicts), got a single batch; "
                        "pass [batch]")
    if batches is None or isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches: expected an iterable of batches (e.g. a list of dicts), got "
                        f"{type(batches).__name__}")


def check_batch(batch) -> None:
    """``TypeError`` naming ``batches`` unless ``batch`` is a dict (of tensors, as a tokenizer gives)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches: expected dicts of tensors (e.g. a tokenizer's output), got {type(batch).__name__}")


def check_ids(batch) -> None:
    """Token ids of a type embeddings take (int64, int32) and a ``[batch, tokens]`` attention mask
    of their shape, else refused naming ``batches`` (the model failed inside its embedding or
    its mask)."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    for key, value in (("input_ids", ids), ("attention_mask", mask)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"batches: {key!r} must be a torch tensor (a tokenizer's return_tensors='pt'), got "
                            f"{type(value).__name__}")
        if value is not None and value.is_meta:
            raise ValueError(f"batches: {key!r} is on the meta device and holds no values")
    if isinstance(ids, torch.Tensor) and ids.dtype not in (torch.int64, torch.int32):  # what an embedding takes
        got = str(ids.dtype).removeprefix("torch.")
        raise TypeError(f"batches: 'input_ids' are token ids, int64 or int32; got {got}")
    if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == ids.dim() == 2 \
            and mask.shape != ids.shape:
        raise ValueError(f"batches: 'attention_mask' has shape {tuple(mask.shape)} but 'input_ids' "
                         f"{tuple(ids.shape)}; they should match")


def batch_rows(batch) -> int:
    """The sequences (or images) in one batch (:func:`check_inputs_of` it first)."""
    return next(v.shape[0] for k, v in batch.items() if k in ("input_ids", "inputs_embeds", "pixel_values")
                and isinstance(v, torch.Tensor))


def check_inputs_of(batch, name: str = "batches") -> None:
    """What :func:`forward_kwargs` refuses of a batch, named as the argument ``name``."""
    try:
        check_batch(batch)
        if not any(k in batch for k in ("input_ids", "pixel_values", "inputs_embeds")):
            raise ValueError("batches: a batch needs input_ids, inputs_embeds or pixel_values; got keys "
                             f"{sorted(batch)}")
        for k in ("input_ids", "pixel_values", "inputs_embeds"):
            v = batch.get(k)
            if isinstance(v, torch.Tensor) and (v.dim() < 2 or 0 in v.shape[:2]):
                raise ValueError(f"batches: a batch's {k!r} is empty or not batched (shape {tuple(v.shape)})")
        check_ids(batch)
    except (TypeError, ValueError) as e:
        if name == "batches" or not str(e).startswith("batches: "):
            raise
        raise type(e)(f"{name}: {str(e)[len('batches: '):]}") from None


def check_vocabulary(model, batch, name: str = "batches") -> None:
    """Token ids the model's input embeddings hold (a raw ``IndexError`` inside the embedding,
    or a device-side assert on CUDA, otherwise), and sequences no longer than a learned position
    table takes (an ``IndexError`` or a shape error inside the model), refused naming ``name``."""
    get, ids = getattr(model, "get_input_embeddings", None), batch.get("input_ids")
    _check_positions(model, batch, name)
    try:
        rows = getattr(get(), "num_embeddings", None) if callable(get) and ids is not None else None
    except NotImplementedError:  # a model without input embeddings of its own
        rows = None
    if isinstance(rows, int) and isinstance(ids, torch.Tensor) and ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one pass, one sync
        if low < 0 or high >= rows:
            raise ValueError(f"{name}: token ids run from {low} to {high}, and the model's input embeddings hold "
                             f"ids 0 to {rows - 1} (text tokenised for another model?)")


def _check_positions(model, batch, name: str) -> None:
    """Refuse, naming ``name``, positions that run past a learned position table, counted as the
    table numbers them: ``position_ids`` where given (OPT's offset added), else the sequence's
    tokens: RoBERTa's table numbers those that are not its padding id, OPT's those its attention
    mask keeps, the others every one (:func:`~.speed.position_tables`)."""
    from .speed import position_tables, table_positions

    tokens = next((v for k, v in batch.items() if k in ("input_ids", "inputs_embeds")
                   and isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    tables = position_tables(model) if tokens is not None else []
    positions, mask, ids = batch.get("position_ids"), batch.get("attention_mask"), batch.get("input_ids")
    for rows, offset, pad in tables:
        if isinstance(positions, torch.Tensor) and positions.numel():
            if int(positions.min()) + offset < 0:
                raise ValueError(f"{name}: 'position_ids' go down to {int(positions.min())}, below the position table; "
                                 "give padding positions a valid index (generate fills them with 1)")
            used, limit = int(positions.max()) + 1, rows - offset
            what = f"'position_ids' run to {used - 1},"
        else:
            if pad is not None and isinstance(ids, torch.Tensor):
                used = int(ids.ne(pad).sum(-1).max())
            elif offset and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
                used = int((mask != 0).sum(1).max())
            else:
                used = tokens.shape[1]
            limit, what = table_positions(rows, offset, pad), f"sequences of {used} tokens are"
        if used > limit:
            raise ValueError(f"{name}: {what} more than the {limit} learned positions this model takes; tokenise "
                             "with truncation to that length")


def batch_on_device(model, batch) -> dict:
    """``batch`` checked (:func:`check_inputs_of`, :func:`check_vocabulary`), its tensors where
    the model's inputs go."""
    check_inputs_of(batch)
    check_vocabulary(model, batch)
    device = input_device(model)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def forward_kwargs(model, batch) -> dict:
    kw = batch_on_device(model, batch)
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


def skip(it, n: int, path, seen=None) -> None:
    """Advance ``it`` past the ``n`` batches a checkpoint already holds (``seen(batch)`` called
    on each)."""
    skipped = 0
    for batch in itertools.islice(it, n):
        skipped += 1
        if seen is not None:
            seen(batch)
    if skipped < n:
        raise ValueError(f"checkpoint {path} records {n} batches done but batches has only {skipped}; "
                         "delete it or drop --resume")


#: the inputs that make a sequence what it is (``labels`` and the like do not), with the mask
#: that says which of its positions count
_SEQUENCE = {"input_ids": "attention_mask", "inputs_embeds": "attention_mask", "pixel_values": None,
             "token_type_ids": "attention_mask", "position_ids": "attention_mask",
             "decoder_input_ids": "decoder_attention_mask", "decoder_inputs_embeds": "decoder_attention_mask"}


def sequence_digests(kw: dict) -> list:
    """One 64-bit digest (a signed int) per sequence of a batch's keyword arguments: of its
    inputs' values (integers as int64, floats as float64, so their width does not count), the
    positions its masks leave out dropped (one sequence padded on the right, or not padded,
    digests the same), where it starts when padded on the left (most families then give its
    tokens other positions), ``token_type_ids`` where not all zero and ``position_ids`` where
    not ``0, 1, ...`` (their defaults)."""
    rows, parts = batch_rows(kw), []
    for key, mask_key in _SEQUENCE.items():
        v, mask = kw.get(key), kw.get(mask_key) if mask_key else None
        if not isinstance(v, torch.Tensor) or not v.dim() or v.shape[0] != rows:
            continue
        v = v.detach().cpu()
        v = v.double() if v.is_floating_point() else v.long()
        mask = mask.detach().cpu().bool() if isinstance(mask, torch.Tensor) and mask.shape == v.shape[:2] else None
        parts.append((key, v, mask))
    out = []
    for r in range(rows):
        h = hashlib.blake2b(digest_size=8)
        for key, v, mask in parts:
            row = v[r] if mask is None else v[r][mask[r]]
            if key == "token_type_ids" and not bool(row.any()) or key == "position_ids" and torch.equal(
                    row, torch.arange(len(row)).view(-1, *[1] * (row.dim() - 1)).expand_as(row)):
                continue
            start = 0 if mask is None or not bool(mask[r].any()) else int(mask[r].int().argmax())
            h.update(f"{key}:{tuple(row.shape)}@{start};".encode())
            h.update(row.contiguous().numpy().tobytes())
        out.append(int.from_bytes(h.digest(), "little", signed=True))
    return out
