"""The native core: the op wrappers (:mod:`.ops`, loading ``headprune._C`` on first use), their
float64 pure-PyTorch reference (:mod:`.reference`) and the statistics schema (:mod:`.schema`).
Nothing here knows about models."""

from .build import BuildMismatchError, build_info, load_extension
from .schema import MASKED_LOGIT, NUM_OUTPUT_STATS, NUM_STATS, OUTPUT_FIELDS, STAT_FIELDS, OutputStat, Stat

__all__ = ["BuildMismatchError", "MASKED_LOGIT", "NUM_OUTPUT_STATS", "NUM_STATS", "OUTPUT_FIELDS", "OutputStat",
           "STAT_FIELDS", "Stat", "build_info", "load_extension"]
