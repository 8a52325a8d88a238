"""What replaces the heads a mask or a pruning removes: per site, the output projection's new
bias and, for a least-squares refit, its kept columns. Computed from the weights before
anything changes, checked against the model's layout, shared by ``mask_heads`` and
``prune_heads`` so the masked and the pruned model compute the same function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.schema import OutputStat
from ..prune.compensation import removed_mean_output
from ..prune.reconstruct import kept_columns, refit_output
from ..stats.moments import check_damping, check_finite
from ..stats.scores import HeadScores
from .adapters import head_counts, head_dim, o_column_norms

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
    ``absent``: ``{site: heads}`` already zeroed (by masks not yet restored, or saved so), which the refit
    treats as removed: it neither reads nor writes their columns. ``kept``: ``{site: original
    ids}`` of the model's heads, which the statistics and value moments must have been taken on.
    ``refit_bias=False``: the refit leaves each bias as it is (``refit_output``'s ``fit_bias``)."""
    if not isinstance(refit_bias, bool):
        raise TypeError(f"refit_bias: expected a bool, got {type(refit_bias).__name__}")
    check_damping(damping)  # also where this removal does not refit: a bad value is a mistake either way
    if not refit_bias and (reconstruct is None or values is not None):
        raise ValueError("refit_bias: False leaves the bias out of the least-squares refit of the output columns; "
                         "it needs reconstruct= and no values= (mean compensation and the value refit move the bias)")
    absent = {layer: hs for layer, hs in (absent or {}).items() if hs and layer in heads}
    if values is not None:
        if not callable(getattr(values, "check", None)) or not hasattr(values, "kept"):
            raise TypeError(f"values: expected the ValueMoments of collect_values or None, got {type(values).__name__}")
        if reconstruct is None:
            raise ValueError("values: the value refit extends the least-squares refit; pass reconstruct= as well")
        values.check(heads, kept, sites)
        if absent:
            raise ValueError(f"values: layers {sorted(absent)} have heads already masked (by an active mask_heads "
                             "handle: restore it first; or zeroed in a masked model saved and loaded again: "
                             "prune_heads(model, zeroed_heads(model)) first); the value refit needs every other head of "
                             "a layer kept or removed with this call")
    if compensate is not None and reconstruct is not None:
        raise ValueError("compensate, reconstruct: give at most one (the refit includes the mean compensation)")
    if compensate is not None:
        mean = _checked(compensate, sites, adapter, "compensate", kept, _as_collected(heads, absent)).output_mean()
        _refuse_masked_upstream(compensate, sites, adapter, heads, "compensate", kept)
        return {layer: _mean_replaced(sites[layer], adapter, hs, mean[layer]) for layer, hs in heads.items()}
    if reconstruct is not None:
        scores = _checked(reconstruct, sites, adapter, "reconstruct", kept, _as_collected(heads, absent))
        if scores.moments is None:
            raise ValueError("reconstruct: these scores have no second moments; collect them with moments=True")
        _refuse_masked_upstream(scores, sites, adapter, heads, "reconstruct", kept)
        joint = {} if values is None else values.kept  # sites where a head is kept: the joint refit instead
        return {layer: _value_refit(sites[layer], adapter, values, layer, damping) if layer in joint
                else _refit(sites[layer], adapter, sorted({*hs, *absent.get(layer, ())}), scores, damping, refit_bias)
                for layer, hs in heads.items()}
    return {}


def _as_collected(heads: dict, absent: dict) -> list:
    """The sites of ``heads`` whose output projection no active mask has changed (as collected)."""
    return [layer for layer in heads if not absent.get(layer)]


#: largest relative (Frobenius) difference between a site's output projection now and when its
#: statistics were collected that still counts as the same weights (a cast to bfloat16 and
#: back moves them by about 2e-3); another checkpoint's differ by the order of 1
PROJECTION_RTOL = 1e-2


def _checked(scores, sites, adapter, arg: str, kept: Optional[dict] = None, compare=()) -> HeadScores:
    """``scores``, after checking it is ``HeadScores`` of this model: its family, its current
    head layout (and its heads by original id, where ``kept`` gives them), and, at the sites
    ``compare``, the output projection the statistics were collected with."""
    if not isinstance(scores, HeadScores):
        raise TypeError(f"{arg}: expected HeadScores from collect() or None, got {type(scores).__name__}")
    if scores.outputs is None:
        raise ValueError(f"{arg}: these scores have no output statistics; collect them again with this version")
    if scores.model_type not in (None, adapter.model_type):
        raise ValueError(f"{arg}: the scores were collected on a {scores.model_type}, not on this {adapter.model_type}")
    now = [(*head_counts(s, adapter), head_dim(s, adapter)) for s in sites]
    then = list(zip(scores.num_heads, scores.num_kv_heads, scores.head_dim))
    if now != then:
        raise ValueError(f"{arg}: the scores were collected on another head layout ((query heads, KV heads, head "
                         f"size) per site: {then}) than the model's ({now})")
    i = None if kept is None else scores.other_site(kept)
    if i is not None:
        raise ValueError(f"{arg}: the scores were collected on heads {scores.site_heads()[i]} of site {i}, "
                         f"the model keeps {list(kept[i])} (the same counts, pruned otherwise)")
    projection = None if scores.moments is None else scores.moments.projection
    unmasked = (None if scores.moments is None else scores.moments.unmasked) or [None] * scores.num_sites
    for layer in compare:  # the projection where moments keep it, else its columns' squared norms
        if projection is not None:
            change = _projection_change(projection[layer], sites[layer], adapter, arg, layer, unmasked[layer])
            what = ""
        else:
            change, what = _norms_change(scores, sites[layer], adapter, layer), " of its columns' squared norms"
        if change is not None and change > PROJECTION_RTOL:
            raise ValueError(f"{arg}: site {layer}'s output projection differs from the one the scores were collected "
                             f"with (relative change{what} {change:.3g}): statistics of another model or of these "
                             "weights before they changed; collect on the model as it is")
    return scores


def _projection_change(then_w, site, adapter, arg: str, layer: int, unmasked=None) -> Optional[float]:
    """How far the site's output projection moved from ``then_w`` (``[W, b]`` when collected),
    or, where it was collected masked, from ``unmasked`` (its weight before the masks); ``None``
    where there is nothing to compare."""
    if then_w is None:
        return None
    w = site.o.weight.detach()
    w = (w.t() if adapter.conv1d else w).to("cpu", torch.float32)
    then_w = then_w[:, :-1]  # the bias column
    if zero_heads_of(then_w, head_dim(site, adapter)):
        if unmasked is None:  # e.g. moments saved and loaded: the weights before the masks are not known
            return None
        then_w = unmasked  # e.g. a later round of iterative selection: the same weights once its masks are restored
    if then_w.shape != w.shape:
        raise ValueError(f"{arg}: the scores were collected when site {layer}'s output projection was "
                         f"{list(then_w.shape)}, it is {list(w.shape)}; collect on this model")
    return projection_change(w, then_w)


def _norms_change(scores: HeadScores, site, adapter, layer: int) -> Optional[float]:
    """Without the projection itself (no second moments), how far its columns' squared norms,
    which the output statistics hold (``COUNT_NORM / COUNT``), moved, for the heads that were
    not zeroed when collected; ``None`` where a head saw no token."""
    hq, d = scores.num_heads[layer], scores.head_dim[layer]
    out = scores.outputs[layer, :hq, :d]
    count = out[..., OutputStat.COUNT]
    if not bool((count > 0).all()):
        return None  # the statistics say nothing of those heads' columns
    then, now = out[..., OutputStat.COUNT_NORM] / count, o_column_norms(site, adapter).cpu().view(hq, d)
    live = ~_zeroed_in_outputs(out)  # a head zeroed when collected (masked): not these weights by design
    return projection_change(now[live], then[live]) if bool(live.any()) else None


def projection_change(now: torch.Tensor, then: torch.Tensor) -> Optional[float]:
    """The relative (Frobenius) difference of a projection's weights now from ``then``, or
    ``None`` where the shapes differ."""
    if now.shape != then.shape:
        return None
    return float((now - then.to(now)).norm() / then.norm().clamp_min(1e-30))


def zero_heads_of(w: torch.Tensor, d: int) -> set:
    """Positions of the heads whose columns of ``w`` (``[out, heads x d]``) are all exactly zero."""
    if w.shape[1] % d:
        return set()
    return set(torch.nonzero(~w.unflatten(1, (-1, d)).any(2).any(0)).flatten().tolist())


def zero_heads(site, adapter) -> set:
    """Positions of the site's query heads whose output-projection columns are all exactly zero."""
    w = site.o.weight.detach()
    return zero_heads_of(w.t() if adapter.conv1d else w, head_dim(site, adapter))


def with_absent(columns: torch.Tensor, keep: list, absent, site, adapter) -> torch.Tensor:
    """A refit's ``columns`` (of the kept heads not ``absent``, in the weight's layout) as the
    pruned projection's weight of every head in ``keep`` (old positions, in order): the
    ``absent`` heads' columns zero."""
    if not absent:
        return columns
    dim, d = 0 if adapter.conv1d else 1, head_dim(site, adapter)
    shape = list(columns.shape)
    shape[dim] = len(keep) * d
    index = torch.tensor([j * d + i for j, h in enumerate(keep) if h not in absent for i in range(d)], dtype=torch.long)
    return columns.new_zeros(shape).index_copy_(dim, index.to(columns.device), columns)


def _masked_when_collected(scores: HeadScores, site: int, d: int) -> set:
    """Positions of the heads of ``site`` that were masked (their columns zero) when ``scores``
    were collected: from the projection the second moments keep, else from the output
    statistics' column norms (a head that saw tokens through zero columns)."""
    projection = None if scores.moments is None else scores.moments.projection  # None: moments without it
    then_w = None if projection is None else projection[site]
    if then_w is not None:
        return zero_heads_of(then_w[:, :-1], d)
    zeroed = _zeroed_in_outputs(scores.outputs[site, : scores.num_heads[site], :d])
    return set(torch.nonzero(zeroed).flatten().tolist())


def _zeroed_in_outputs(out: torch.Tensor) -> torch.Tensor:
    """``[heads]``: which heads of a site's output statistics (``[heads, head_dim, stats]``) saw
    tokens through output-projection columns that were all zero (masked when collected)."""
    seen = (out[..., OutputStat.COUNT] > 0).all(1)
    return seen & (out[..., OutputStat.COUNT_NORM] == 0).all(1)


def _refuse_masked_upstream(scores, sites, adapter, heads: dict, arg: str, kept: Optional[dict]) -> None:
    """Statistics collected while a site's heads were masked hold, at every site after it, the
    inputs of that masked model: refused where this call refits or compensates a later site and
    those heads are now neither zeroed nor removed by it (it would fit another model's inputs;
    a mask changes nothing before its site, nor at it: a site's statistics are of its projection's
    input)."""
    order = lambda i: (sites[i].block.stack == "decoder", sites[i].depth, sites[i].block.kind == "cross")  # noqa: E731
    last = max((order(layer) for layer, hs in heads.items() if hs), default=None)
    for j in range(len(sites) if last is not None else 0):
        if order(j) >= last:  # computed with or after the last site refit: its statistics are not changed
            continue
        then = _masked_when_collected(scores, j, head_dim(sites[j], adapter))
        if not then:
            continue
        now = zero_heads(sites[j], adapter) | set(heads.get(j, ()))
        back = sorted(then - now)
        if back:
            ids = back if kept is None else [kept[j][h] for h in back]
            raise ValueError(f"{arg}: the scores were collected with heads {ids} of site {j} masked, which the model "
                             "has again and this call does not remove: the statistics are of another model's inputs; "
                             "collect on the model as it is")


def _old_bias(site) -> Optional[torch.Tensor]:
    b = getattr(site.o, "bias", None)
    return None if b is None else b.detach()


def _mean_replaced(site, adapter, heads, mean: torch.Tensor) -> SiteRemoval:
    d = head_dim(site, adapter)
    mu = mean[heads, :d]
    if torch.isnan(mu).any():  # a head that saw no token (or NaN activations: then its mean is NaN too)
        raise ValueError(f"compensate: site {site.name} heads {list(heads)} have no output statistics, or statistics "
                         "of activations that were not finite")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"compensate: site {site.name} heads {list(heads)}: their mean output is infinite (the "
                         "calibration's activations there were not finite); collect again once the model computes "
                         "finite outputs")
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
    return SiteRemoval(bias.to(w.device, w.dtype), cols.to(w.device, w.dtype), rows.to(v.weight.device, v.weight.dtype))


def _refit(site, adapter, heads, scores: HeadScores, damping: float, refit_bias: bool = True) -> SiteRemoval:
    gram = scores.moments.gram[site.index]
    check_finite("reconstruct", site.name, gram)
    if gram is None or not float(gram[-1, -1]) > 0:
        raise ValueError(f"reconstruct: site {site.name} saw no calibration token")
    hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
    keep = kept_columns(hq, d, heads)
    columns, bias = refit_output(site.o.weight.detach(), _old_bias(site), gram, keep, damping=damping,
                                 conv1d=adapter.conv1d, fit_bias=refit_bias)
    return SiteRemoval(None if bias is None else bias.to(site.o.weight.dtype), columns)
