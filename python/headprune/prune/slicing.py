"""Physical removal primitives: slicing parameters along a head dimension (recorded in an
:class:`~.undo.Undo` log) and the key/value layout left by a partly pruned GQA group."""

from __future__ import annotations

import math

import torch
from torch import nn

from .undo import Undo

__all__ = ["slice_", "slice_rows", "kv_layout"]


def slice_(undo: Undo, module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    p = getattr(module, name)
    new = nn.Parameter(p.data.index_select(dim, index.to(p.device)).clone(), requires_grad=p.requires_grad)
    undo.set(module, name, new)
    shape = tuple(module.weight.shape)
    if isinstance(module, nn.Linear):
        undo.set(module, "out_features", shape[0])
        undo.set(module, "in_features", shape[1])
    elif isinstance(module, nn.Embedding):
        undo.set(module, "embedding_dim", shape[1])
    elif type(module).__name__ == "Conv1D":
        undo.set(module, "nf", shape[1])


def slice_rows(undo, proj: nn.Module, index: torch.Tensor, conv1d: bool) -> None:
    slice_(undo, proj, "weight", index, 1 if conv1d else 0)
    if getattr(proj, "bias", None) is not None:
        slice_(undo, proj, "bias", index, 0)


def kv_layout(keep_q, groups: int, kv_ids=None):
    """KV rows for the kept query heads and the new group size. Uneven groups (some of a KV
    head's queries pruned) are evened out by repeating KV heads: group size becomes the gcd
    of the kept counts, which is exact since repeated KV heads hold identical weights.

    ``kv_ids`` names the original KV head of each current row: rows repeated by an earlier
    pruning are merged back, so pruning in stages gives the layout (and the weights) of
    pruning the same heads at once, which is what ``load_pruned`` rebuilds."""
    kv_ids = list(range(max(keep_q, default=-1) // groups + 1)) if kv_ids is None else kv_ids
    per_kv: dict = {}
    first_row: dict = {}
    for h in keep_q:
        row = h // groups
        per_kv.setdefault(kv_ids[row], []).append(h)
        first_row.setdefault(kv_ids[row], row)
    if not per_kv:
        return [], 1
    g = 0
    for members in per_kv.values():
        g = math.gcd(g, len(members))
    rows = [first_row[kv] for kv, members in sorted(per_kv.items()) for _ in range(len(members) // g)]
    return rows, g
