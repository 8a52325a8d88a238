"""headprune: entropy-based attention-head pruning with a native C++/CUDA core.

``import headprune`` needs only torch; the Hugging Face layer (``collect``, ``mask_heads``,
``prune_heads``, ``save_pruned``, ``load_pruned``, ...) loads transformers on first use.
"""

from __future__ import annotations

from . import ops, reference
from ._loader import build_info
from .accumulator import EntropyAccumulator
from .ranking import rank_heads, select_heads
from .reference import NUM_STATS, STAT_FIELDS
from .scores import HeadScores

__version__ = "0.1.0"

_HF = ("collect", "mask_heads", "prune_heads", "save_pruned", "load_pruned", "kept_heads", "measure",
       "attention_flops_per_token", "PruneReport", "supported_model_types", "select_iteratively")

__all__ = ["EntropyAccumulator", "HeadScores", "NUM_STATS", "STAT_FIELDS", "build_info", "ops", "rank_heads",
           "reference", "select_heads", *_HF]


def __getattr__(name):
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'headprune' has no attribute {name!r}")
