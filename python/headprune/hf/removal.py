"""What replaces the heads a mask or a pruning removes: per site, the output projection's new
bias and, for a least-squares refit, its kept columns. Computed from the weights before
anything changes, checked against the model's layout, shared by ``mask_heads`` and
``prune_heads`` so the masked and the pruned model compute the same function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..prune.compensation import removed_mean_output
from ..prune.reconstruct import kept_columns, refit_output
from ..stats.scores import HeadScores
from .adapters import head_counts, head_dim

__all__ = ["SiteRemoval", "removal_plan"]


@dataclass
class SiteRemoval:
    """A site's output projection after removal: ``bias`` (the whole new bias, in the weight's
    dtype) and ``columns`` (the kept columns in the weight's layout, or ``None``: unchanged)."""

    bias: Optional[torch.Tensor]  # None: the projection keeps having none (a refit without the bias)
    columns: Optional[torch.Tensor] = None
    value_rows: Optional[torch.Tensor] = None  # the kept heads' value rows (the value refit), or unchanged


def removal_plan(sites, adapter, heads: dict, *, compensate: Optional[HeadScores] = None,
                 reconstruct: Optional[HeadScores] = None, damping: float = 0.0, values=None,
                 absent: Optional[dict] = None, kept: Optional[dict] = None, refit_bias: bool = True) -> dict:
    """``{site: SiteRemoval}`` for the sites of ``heads`` (empty when the heads are zeroed).
    ``values`` (:class:`~headprune.hf.values.ValueMoments` of these heads, with ``reconstruct``):
    the kept heads' value rows are refit with their output columns wherever a head is kept.
    ``absent``: ``{site: heads}`` already zeroed (by masks not yet restored), which the refit
    treats as removed: it neither reads nor writes their columns. ``kept``: ``{site: original
    ids}`` of the model's heads, which the statistics and value moments must have been taken on.
    ``refit_bias=False``: the refit leaves each bias as it is (``refit_output``'s ``fit_bias``)."""
    if not isinstance(refit_bias, bool):
        raise TypeError(f"refit_bias: expected a bool, got {type(refit_bias).__name__}")
    if not refit_bias and (reconstruct is None or values is not None):
        raise ValueError("refit_bias: False leaves the bias out of the least-squares refit of the output columns; "
                         "it needs reconstruct= and no values= (mean compensation and the value refit move the bias)")
    absent = {layer: hs for layer, hs in (absent or {}).items() if hs and layer in heads}
    if values is not None:
        if not callable(getattr(values, "check", None)) or not hasattr(values, "kept"):
            raise TypeError(f"values: expected the ValueMoments of collect_values or None, got {type(values).__name__}")
        if reconstruct is None:
            raise ValueError("values: the value refit extends the least-squares refit; pass reconstruct= as well")
        values.check(heads, kept)
        if absent:
            raise ValueError(f"values: layers {sorted(absent)} have heads masked by an active mask_heads handle; "
                             "restore it first (the value refit needs every other head of a layer kept or removed "
                             "with this call)")
    if compensate is not None and reconstruct is not None:
        raise ValueError("compensate, reconstruct: give at most one (the refit includes the mean compensation)")
    if compensate is not None:
        mean = _checked(compensate, sites, adapter, "compensate", kept).output_mean()
        return {layer: _mean_replaced(sites[layer], adapter, hs, mean[layer]) for layer, hs in heads.items()}
    if reconstruct is not None:
        scores = _checked(reconstruct, sites, adapter, "reconstruct", kept)
        if scores.moments is None:
            raise ValueError("reconstruct: these scores have no second moments; collect them with moments=True")
        joint = {} if values is None else values.kept  # sites where a head is kept: the joint refit instead
        return {layer: _value_refit(sites[layer], adapter, values, layer, damping) if layer in joint
                else _refit(sites[layer], adapter, sorted({*hs, *absent.get(layer, ())}), scores, damping, refit_bias)
                for layer, hs in heads.items()}
    return {}


def _checked(scores, sites, adapter, arg: str, kept: Optional[dict] = None) -> HeadScores:
    """``scores``, after checking it is ``HeadScores`` of the model's current head layout (and
    of its heads by original id, where ``kept`` gives them)."""
    if not isinstance(scores, HeadScores):
        raise TypeError(f"{arg}: expected HeadScores from collect() or None, got {type(scores).__name__}")
    if scores.outputs is None:
        raise ValueError(f"{arg}: these scores have no output statistics; collect them again with this version")
    now = [(head_counts(s, adapter)[0], head_dim(s, adapter)) for s in sites]
    then = list(zip(scores.num_heads, scores.head_dim))
    if now != then:
        raise ValueError(f"{arg}: the scores were collected on another head layout ({then}) than the model's ({now})")
    i = None if kept is None else scores.other_site(kept)
    if i is not None:
        raise ValueError(f"{arg}: the scores were collected on heads {scores.site_heads()[i]} of site {i}, "
                         f"the model keeps {list(kept[i])} (the same counts, pruned otherwise)")
    return scores


def _old_bias(site) -> Optional[torch.Tensor]:
    b = getattr(site.o, "bias", None)
    return None if b is None else b.detach()


def _mean_replaced(site, adapter, heads, mean: torch.Tensor) -> SiteRemoval:
    d = head_dim(site, adapter)
    mu = mean[heads, :d]
    if torch.isnan(mu).any():
        raise ValueError(f"compensate: site {site.name} heads {list(heads)} have no output statistics")
    add = removed_mean_output(site.o.weight.detach(), heads, d, mu, conv1d=adapter.conv1d)
    old, w = _old_bias(site), site.o.weight
    bias = add.to(w.device, w.dtype) if old is None else old + add.to(old.device, old.dtype)
    return SiteRemoval(bias)


def _value_refit(site, adapter, values, layer: int, damping: float) -> SiteRemoval:
    from ..prune.values import refit_values

    v = site.sub(site.block.v)
    w = site.o.weight
    cols, bias, rows, _ = refit_values(w.detach(), v.weight.detach(), None if v.bias is None else v.bias.detach(),
                                       values.gram[layer], values.cross[layer], values.kept[layer],
                                       head_dim(site, adapter), damping=damping)
    return SiteRemoval(bias.to(w.dtype), cols.to(w.dtype), rows.to(v.weight.dtype))


def _refit(site, adapter, heads, scores: HeadScores, damping: float, refit_bias: bool = True) -> SiteRemoval:
    gram = scores.moments.gram[site.index]
    if gram is None or not float(gram[-1, -1]) > 0:
        raise ValueError(f"reconstruct: site {site.name} saw no calibration token")
    hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
    keep = kept_columns(hq, d, heads)
    columns, bias = refit_output(site.o.weight.detach(), _old_bias(site), gram, keep, damping=damping,
                                 conv1d=adapter.conv1d, fit_bias=refit_bias)
    return SiteRemoval(None if bias is None else bias.to(site.o.weight.dtype), columns)
