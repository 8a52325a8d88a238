"""Exact, reversible head masks: zeroed output-projection columns with an undo record."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..core import ops
from .heads import head_index

__all__ = ["MaskHandle", "refuse_masked_again"]


def apply_head_mask_(w: torch.Tensor, mask: torch.Tensor, d: int, dim: int) -> None:
    ops.apply_head_mask_(w, mask.to(device=w.device, dtype=w.dtype), d, dim)


class MaskHandle:
    """Undo record of a head masking: ``restore()`` (or leaving the ``with`` block) puts the
    original output-projection columns back bit-exactly.

    Handles not yet restored are tracked (weakly: a handle that is dropped unrestored leaves
    a permanent mask), so masking a masked head again, or physically pruning a model under
    an active mask, is refused instead of making ``restore`` order-dependent or a no-op.
    """

    _active: "weakref.WeakSet" = weakref.WeakSet()

    def __init__(self, heads: dict):
        self.heads = heads
        self._saved = []  # (weight, dim, index, original columns, heads)
        self._biases = []  # (module, original bias values, or None where the bias was added)

    @classmethod
    def masked(cls, w: torch.Tensor) -> set:
        """Heads of weight ``w`` zeroed by handles not yet restored."""
        return {h for handle in list(cls._active) for x, *_, hs in handle._saved if x is w for h in hs}

    def zero_(self, w: torch.Tensor, heads, num_heads: int, d: int, dim: int) -> None:
        idx = head_index(heads, d)
        self._saved.append((w, dim, idx, w.index_select(dim, idx.to(w.device)).clone(), tuple(heads)))
        MaskHandle._active.add(self)
        gate = torch.ones(num_heads)
        gate[heads] = 0
        apply_head_mask_(w, gate, d, dim)

    @classmethod
    def added_bias(cls, module: nn.Module) -> bool:
        """Whether an active handle created ``module.bias`` (the module had none)."""
        return any(m is module and old is None for handle in list(cls._active) for m, old in handle._biases)

    def add_bias_(self, module: nn.Module, b: torch.Tensor) -> None:
        """Add ``b`` to ``module.bias`` in place (creating the bias if the module has none)."""
        MaskHandle._active.add(self)
        bias = getattr(module, "bias", None)
        if bias is None:
            self._biases.append((module, None))
            module.bias = nn.Parameter(b.to(module.weight.dtype), requires_grad=False)
        else:
            self._biases.append((module, bias.detach().clone()))
            bias.add_(b.to(bias.device, bias.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            while self._biases:
                module, old = self._biases[-1]
                if old is None:
                    module.bias = None
                else:
                    module.bias.copy_(old)
                self._biases.pop()
            while self._saved:
                w, dim, idx, cols, _ = self._saved[-1]
                w.index_copy_(dim, idx.to(w.device), cols)
                self._saved.pop()
        MaskHandle._active.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def refuse_masked_again(heads: dict, weights: list) -> None:
    """``ValueError`` if a head of ``heads`` is already zeroed by an active handle."""
    for layer, hs in heads.items():
        again = sorted(set(hs) & MaskHandle.masked(weights[layer]))
        if again:
            raise ValueError(
                f"heads: layer {layer} head(s) {again} are already masked by an active mask_heads handle; restore it first"
            )
