"""Replacing removed heads by their mean output (mean compensation), as a bias."""

from __future__ import annotations

import torch

from .heads import head_index

__all__ = ["removed_mean_output"]


def removed_mean_output(weight: torch.Tensor, heads, head_dim: int, mean: torch.Tensor, *,
                        conv1d: bool = False) -> torch.Tensor:
    """What the removed ``heads`` add on average to their output projection's result,
    ``W_o[:, heads] @ mean`` in float64 (``[out_features]``).

    ``weight``: the output projection's weight, ``[out, heads * head_dim]`` (``[in, out]``
    for a ``Conv1D``); ``mean``: the heads' mean outputs ``[len(heads), head_dim]``.
    """
    mu = mean.reshape(-1).to(device=weight.device, dtype=torch.float64)
    cols = weight.index_select(0 if conv1d else 1, head_index(heads, head_dim).to(weight.device)).double()
    return mu @ cols if conv1d else cols @ mu
