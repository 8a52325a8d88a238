"""Exact, reversible head masks: zeroed output-projection columns with an undo record."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core import ops
from ..core.modules import uncompiled
from .heads import head_index

__all__ = ["MASKS_ATTR", "MaskHandle", "active_masks", "added_bias", "masked_heads", "refuse_masked_again",
           "unmasked_weight"]


def apply_head_mask_(w: torch.Tensor, mask: torch.Tensor, d: int, dim: int) -> None:
    ops.apply_head_mask_(w, mask.to(device=w.device, dtype=w.dtype), d, dim)


#: the model attribute listing its masks not yet restored (strong references: what decides how
#: a model is saved must not vanish when the caller drops a handle)
MASKS_ATTR = "_headprune_masks"


def active_masks(model: nn.Module) -> list:
    """The :class:`MaskHandle` objects applied to ``model`` and not yet restored, oldest first."""
    return list(uncompiled(model).__dict__.get(MASKS_ATTR, ()))


def masked_heads(model: nn.Module, w: torch.Tensor) -> set:
    """Heads of weight ``w`` (an output projection of ``model``) zeroed by masks not yet restored."""
    return {h for handle in active_masks(model) for x, *_, hs in handle._saved if x is w for h in hs}


def unmasked_weight(model: nn.Module, w: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of ``w`` (a weight of ``model``) as it was before the masks not yet restored
    changed it (what restoring them all would give), or ``None`` where none changed it."""
    changes = [(dim, idx, cols) for handle in reversed(active_masks(model))
               for x, dim, idx, cols, _ in reversed(handle._saved) if x is w]  # newest first, as restore goes
    if not changes:
        return None
    out = w.detach().clone()
    for dim, idx, cols in changes:
        out.index_copy_(dim, idx.to(out.device), cols.to(out.device, out.dtype))
    return out


def added_bias(model: nn.Module, module: nn.Module) -> bool:
    """Whether a mask not yet restored created ``module.bias`` (the module had none)."""
    return any(m is module and old is None for handle in active_masks(model) for m, old in handle._biases)


class MaskHandle:
    """Undo record of a head masking: ``restore()`` (or leaving the ``with`` block) puts the
    original output-projection columns and biases back bit-exactly.

    Until restored, the handle is listed on the model itself (:func:`active_masks`), so a
    dropped handle leaves a mask that is still known: masking a masked head again, or
    physically pruning under a mask, is refused, and ``save_pruned`` saves the biases a
    compensated mask added. ``heads``: what was masked, ``{layer: [original head indices]}``;
    ``already_removed``: heads asked for that an earlier physical pruning had removed.
    """

    def __init__(self, model: nn.Module, heads: dict, already_removed: dict | None = None):
        self.model = uncompiled(model)  # the record lives on the compiled module, where a save finds it
        self.heads = heads
        self.already_removed = already_removed or {}  # {layer: [original indices]} asked for but removed before
        self._saved = []  # (weight, dim, index, original columns, heads zeroed)
        self._biases = []  # (module, original bias values, or None where the bias was added)

    def _register(self) -> None:
        masks = self.model.__dict__.setdefault(MASKS_ATTR, [])
        if not any(m is self for m in masks):
            masks.append(self)

    # Each change is recorded after it succeeded: a weight the op refuses (an inference tensor, say)
    # is left as it was, and restore() never has to write it back.

    def zero_(self, w: torch.Tensor, heads, num_heads: int, d: int, dim: int) -> None:
        idx = head_index(heads, d)
        cols = w.index_select(dim, idx.to(w.device)).clone()
        gate = torch.ones(num_heads)
        gate[heads] = 0
        apply_head_mask_(w, gate, d, dim)
        self._saved.append((w, dim, idx, cols, tuple(heads)))
        self._register()
        if not torch.isfinite(cols).all():  # 0 * NaN or inf is NaN: a masked head writes zeros
            w.index_fill_(dim, idx.to(w.device), 0.0)

    def write_columns_(self, w: torch.Tensor, index: torch.Tensor, values: torch.Tensor, dim: int) -> None:
        """Overwrite ``w``'s slices ``index`` along ``dim`` with ``values`` (a least-squares
        refit of kept heads' columns), keeping the originals for :meth:`restore`."""
        index = index.to(w.device)
        cols = w.index_select(dim, index).clone()
        w.index_copy_(dim, index, values.to(w.device, w.dtype))
        self._saved.append((w, dim, index, cols, ()))
        self._register()

    def set_bias_(self, module: nn.Module, value: torch.Tensor) -> None:
        """Set ``module.bias`` to ``value`` (creating the bias if the module has none)."""
        bias = getattr(module, "bias", None)
        if bias is None:
            module.bias = nn.Parameter(value.to(module.weight.device, module.weight.dtype),
                                       requires_grad=module.weight.requires_grad)  # as prune_heads creates it
            self._biases.append((module, None))
        else:
            old = bias.detach().clone()
            bias.copy_(value.to(bias.device, bias.dtype))
            self._biases.append((module, old))
        self._register()

    def _touches(self) -> set:
        """What this mask wrote: weight slices and biases (masks of disjoint heads restore in any order)."""
        return ({(id(w), dim, i) for w, dim, idx, *_ in self._saved for i in idx.tolist()}
                | {id(m) for m, _ in self._biases})

    def restore(self) -> None:
        """Put back what this mask changed. Masks that changed the same columns or bias restore
        newest first (each kept what the ones before it had written): restoring an older one
        first is refused, and nothing changes."""
        masks = self.model.__dict__.get(MASKS_ATTR, [])
        later = masks[masks.index(self) + 1:] if self in masks else []
        if later:  # the usual newest-first restore has none: nothing to compare
            mine = self._touches()
            later = [m for m in later if m._touches() & mine]
        if later:
            raise ValueError(f"restore: {len(later)} mask(s) applied after this one changed the same weights; "
                             "restore them first (newest first)")
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
                # in the weight's type and device now (the model may have been moved or cast since)
                w.index_copy_(dim, idx.to(w.device), cols.to(w.device, w.dtype))
                self._saved.pop()
        masks = self.model.__dict__.get(MASKS_ATTR)
        if masks is not None:
            masks[:] = [m for m in masks if m is not self]
            if not masks:
                del self.model.__dict__[MASKS_ATTR]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def refuse_masked_again(model: nn.Module, heads: dict, weights: list, ids: Optional[dict] = None) -> None:
    """``ValueError`` if a head of ``heads`` is already zeroed by a mask not yet restored
    (named by ``ids[layer][position]``, the original indices, where given)."""
    for layer, hs in heads.items():
        again = sorted(set(hs) & masked_heads(model, weights[layer]))
        if ids is not None:
            again = sorted(ids[layer][h] for h in again)
        if again:
            raise ValueError(
                f"heads: layer {layer} head(s) {again} are already masked by an active mask_heads handle; restore it first"
            )
