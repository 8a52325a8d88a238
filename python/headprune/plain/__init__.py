"""Plain PyTorch models: ``nn.MultiheadAttention`` and ``nn.TransformerEncoder``
(collection by forward pre-hooks, masking of ``out_proj`` columns). Below ``headprune.hf``,
which hands it every model that has no transformers config."""

from .collect import attention_modules, collect_modules, empty_scores
from .mask import mask_modules

__all__ = ["attention_modules", "collect_modules", "empty_scores", "mask_modules"]
