"""headprune: entropy-based attention-head pruning with a native C++/CUDA core.

``import headprune`` needs only torch; the Hugging Face layer loads on first use.
"""

from __future__ import annotations

from . import ops, reference
from ._loader import build_info
from .accumulator import EntropyAccumulator
from .reference import NUM_STATS, STAT_FIELDS

__version__ = "0.1.0"

__all__ = ["EntropyAccumulator", "NUM_STATS", "STAT_FIELDS", "build_info", "ops", "reference"]
