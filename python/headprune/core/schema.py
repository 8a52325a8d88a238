"""The one schema of headprune's statistics, shared with C++ (``csrc/include/headprune/schema.h``;
``tests/test_schema.py`` checks that the two agree).

Per attention head, a statistics accumulator is a float64 row of :class:`Stat` columns, and
the output statistics (what a head writes into its output projection) are, per head and
dimension, a float64 row of :class:`OutputStat` columns. Every column is a sum, so two
collections (two data shards, a resumed run) merge by addition. Entropies are in nats.
"""

from __future__ import annotations

from enum import IntEnum


class Stat(IntEnum):
    """Columns of a statistics accumulator ``[heads, NUM_STATS]`` (float64), summed over the
    valid query rows of a head's attention."""

    COUNT = 0  #: valid rows
    SUM = 1  #: entropy H of the row
    SUM_SQ = 2  #: H squared
    SUM_NORM = 3  #: H / log(n), n the visible keys (rows with n >= 2; 0 otherwise)
    SUM_FIRST = 4  #: attention mass on the first visible key (the "sink")
    SUM_REST = 5  #: entropy of the row renormalised over the keys after the first


class OutputStat(IntEnum):
    """Columns of the output statistics ``[sites, heads, head_dim, NUM_OUTPUT_STATS]``
    (float64): per dimension of a head's output (its output projection's input column)."""

    COUNT = 0  #: tokens seen
    SUM = 1  #: the output value
    SUM_SQ = 2  #: its square
    COUNT_NORM = 3  #: tokens x squared norm of the output-projection column it feeds


class RowField(IntEnum):
    """Per attention row, what the native row kernels write before the per-head reduction."""

    ENTROPY = 0
    VISIBLE = 1
    FIRST_MASS = 2
    REST_ENTROPY = 3


STAT_FIELDS = tuple(s.name.lower() for s in Stat)
NUM_STATS = len(Stat)
OUTPUT_FIELDS = tuple(s.name.lower() for s in OutputStat)
NUM_OUTPUT_STATS = len(OutputStat)
ROW_FIELDS = tuple(f.name.lower() for f in RowField)

#: Additive logits at or below this value mark a masked key (covers ``-inf`` and float32's
#: ``finfo.min``, which transformers uses for additive masks).
MASKED_LOGIT = -1e37
