"""The Hugging Face layer: collection, masking, physical pruning, save/load.

Importing it needs ``transformers``; ``import headprune`` alone does not.
"""

from __future__ import annotations

from .allocation import LayerCosts, layer_costs, select_measured
from .uniform import measure_uniform
from .adapters import ADAPTERS, get_adapter, resolve_sites, supported_model_types
from .collect import collect
from .gates import HeadGates, gates
from .generated import generated_batches
from .importance import gradient_importance
from .io import load_pruned, save_pruned
from .iterative import auto_steps, select_iteratively
from .learned import LearnedGates, learn_gates
from .prune import kept_heads, mask_heads, prune_heads
from .recover import RecoverReport, recover
from .report import PruneReport, attention_flops_per_token, measure
from .values import ValueMoments, collect_values

__all__ = [
    "ADAPTERS",
    "HeadGates",
    "LayerCosts",
    "LearnedGates",
    "PruneReport",
    "RecoverReport",
    "ValueMoments",
    "attention_flops_per_token",
    "auto_steps",
    "collect",
    "collect_values",
    "gates",
    "generated_batches",
    "get_adapter",
    "gradient_importance",
    "kept_heads",
    "layer_costs",
    "learn_gates",
    "load_pruned",
    "mask_heads",
    "measure",
    "measure_uniform",
    "prune_heads",
    "recover",
    "resolve_sites",
    "save_pruned",
    "select_iteratively",
    "select_measured",
    "supported_model_types",
]
