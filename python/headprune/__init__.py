"""headprune: entropy-based attention-head pruning with a native C++/CUDA core.

``import headprune`` needs only torch, and not the native extension: it is loaded on import where
it loads (so torch.compile finds its ops), and otherwise the first op call raises why. The Hugging Face layer (``collect``, ``mask_heads``, ``prune_heads``, ``save_pruned``,
``load_pruned``, ``gates``, ``gradient_importance``, ``learn_gates``, ``recover``,
``select_measured``, ...) loads transformers on first use.

Layers, each importing only those below it:

* :mod:`headprune.core`: native op wrappers, their float64 reference, the statistics schema;
* :mod:`headprune.stats`: ``HeadScores`` and ``EntropyAccumulator``;
* :mod:`headprune.ranking`: which heads to prune;
* :mod:`headprune.prune`: masking and physical-pruning primitives (no transformers);
* :mod:`headprune.plain` (``nn.MultiheadAttention``) and :mod:`headprune.hf` (transformers
  families: adapters, collection, pruning, save/load);
* :mod:`headprune.distributed`: data-parallel collection;
* :mod:`headprune.app`: the command line, evaluation, sweeps, texts and plots.
"""

from __future__ import annotations

from .core import NUM_STATS, STAT_FIELDS, OutputStat, Stat, build_info
from .ranking import rank_heads, select_heads
from .stats import EntropyAccumulator, HeadScores

__version__ = "0.1.0"

_HF = ("collect", "mask_heads", "prune_heads", "save_pruned", "load_pruned", "kept_heads", "measure",
       "attention_flops_per_token", "PruneReport", "supported_model_types", "select_iteratively", "gates", "HeadGates",
       "gradient_importance", "learn_gates", "LearnedGates", "recover", "RecoverReport", "generated_batches",
       "select_measured", "layer_costs", "LayerCosts", "measure_uniform", "collect_values", "ValueMoments")
_LAZY_MODULES = ("ops", "reference")
_TEXTS = ("calibration_batches", "reference_batches")  # headprune.app.texts

__all__ = ["EntropyAccumulator", "HeadScores", "NUM_STATS", "OutputStat", "STAT_FIELDS", "Stat", "build_info", "ops",
           "rank_heads", "reference", "select_heads", *_HF, *_TEXTS]


def __getattr__(name):
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    if name in _TEXTS:
        from .app import texts

        return getattr(texts, name)
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".core.{name}", __name__)
    raise AttributeError(f"module 'headprune' has no attribute {name!r}")
