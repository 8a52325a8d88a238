"""The native core: the op wrappers (:mod:`.ops`, loading ``headprune._C`` on import), their
float64 pure-PyTorch reference (:mod:`.reference`), the statistics schema (:mod:`.schema`) and
temporary changes to a model's modules that put back exactly what was there (:mod:`.modules`).
Nothing here knows about transformers or a model family."""

from .build import BuildMismatchError, build_info, load_extension
from .schema import MASKED_LOGIT, NUM_OUTPUT_STATS, NUM_STATS, OUTPUT_FIELDS, STAT_FIELDS, OutputStat, Stat

__all__ = ["BuildMismatchError", "MASKED_LOGIT", "NUM_OUTPUT_STATS", "NUM_STATS", "OUTPUT_FIELDS", "OutputStat",
           "STAT_FIELDS", "Stat", "build_info", "load_extension"]
