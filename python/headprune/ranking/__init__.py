"""Ranking: which heads to prune, from ``HeadScores``. Knows nothing of models.

:mod:`.recipes` names the recipes (the default and its fallback), :mod:`.units` orders the
prunable units, :mod:`.select` turns an order and a budget into ``{layer: [heads]}``.
"""

from .recipes import (ALLOCATIONS, default_allocation, DEFAULT_RECIPE, DEFAULT_STEPS, FALLBACK_RECIPE, OUTPUT_RECIPE, GQA_MODES, DEFAULT_GQA, NATURAL_ORDER, ORDERS, SCOPES,
                      SCORES, default_protected, natural_order)
from .select import budget, select_heads
from .units import count_units, rank_heads, unit_counts, unit_sizes

__all__ = ["ALLOCATIONS", "default_allocation", "DEFAULT_RECIPE", "DEFAULT_STEPS", "FALLBACK_RECIPE", "OUTPUT_RECIPE", "GQA_MODES", "DEFAULT_GQA", "NATURAL_ORDER", "ORDERS", "SCOPES", "SCORES",
           "budget", "count_units", "default_protected", "natural_order", "rank_heads", "select_heads",
           "unit_counts", "unit_sizes"]
