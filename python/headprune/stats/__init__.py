"""Statistics: :class:`HeadScores` (a whole model's per-head statistics) and
:class:`EntropyAccumulator` (one attention call site's, fed batch by batch)."""

from .accumulator import EntropyAccumulator
from .moments import OutputMoments
from .scores import HeadScores

__all__ = ["EntropyAccumulator", "HeadScores", "OutputMoments"]
