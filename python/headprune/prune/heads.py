"""Head selections: validating ``{site: [heads]}`` and indexing a head's rows or columns."""

from __future__ import annotations

import operator

import torch

__all__ = ["normalize_heads", "head_index"]


def normalize_heads(heads, counts: list, arg: str = "heads") -> dict:
    """``{layer: sorted unique heads}`` after checking types and ranges."""
    if not isinstance(heads, dict):
        raise TypeError(f"{arg}: expected a dict {{layer: [heads]}}, got {type(heads).__name__}")
    out = {}
    for key, hs in heads.items():
        try:
            layer = _index(key)  # like the heads: numpy and 0-d tensor ints too
        except TypeError:
            layer = None
        if layer is None or not 0 <= layer < len(counts):
            raise ValueError(f"{arg}: layer {key!r} is not an index in [0, {len(counts)})")
        try:
            # operator.index refuses floats (1.7 is no head index) but takes numpy / 0-d tensor ints
            hs = sorted({_index(h) for h in hs})
        except (TypeError, ValueError) as e:
            raise TypeError(f"{arg}: layer {layer}: expected a list of head indices, got {hs!r}") from e
        bad = [h for h in hs if not 0 <= h < counts[layer]]
        if bad:
            raise ValueError(f"{arg}: layer {layer} has {counts[layer]} heads, got indices {bad}")
        if hs:
            out[layer] = sorted({*out.get(layer, ()), *hs})
    return out


def _index(h) -> int:
    if isinstance(h, bool):
        raise TypeError("bool is not a head index")
    return operator.index(h)


def head_index(heads, d: int, offset: int = 0) -> torch.Tensor:
    """Row/column indices of ``heads`` in a dimension laid out as ``heads x d``."""
    return torch.tensor([offset + h * d + j for h in heads for j in range(d)], dtype=torch.long)
