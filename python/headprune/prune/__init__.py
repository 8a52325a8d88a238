"""Masking and physical-pruning primitives that know nothing of transformers: head selections
(:mod:`.heads`), reversible masks (:mod:`.mask`), undo logs (:mod:`.undo`), parameter slicing
and GQA layouts (:mod:`.slicing`), and the compensation of removed heads (:mod:`.compensation`).
The model-family layer (``headprune.hf``, ``headprune.plain``) applies them."""

from .heads import head_index, normalize_heads
from .mask import MaskHandle, refuse_masked_again
from .undo import Undo

__all__ = ["MaskHandle", "Undo", "head_index", "normalize_heads", "refuse_masked_again"]
