"""Masking (exact, reversible) and physical removal of attention heads.

``heads`` arguments are ``{layer: [query heads]}`` to remove, with ``layer`` a site index
of ``resolve_sites`` / ``HeadScores`` (the output of ``select_heads``) and the heads given
by their **original** indices, as transformers 4's ``prune_heads`` took them: pruning
``{0: [1]}`` twice removes head 1 once (the second call ignores it and says so in its
report), and the indices stay the same across save and reload. Physical removal keeps, per
model, the original indices of the surviving heads (``kept_heads``) so that
``save_pruned`` / ``load_pruned`` can rebuild the exact layout.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Optional

import torch
from torch import nn

from ..core.modules import check_module, refuse_meta, uncompiled
from ..prune.heads import head_index, normalize_heads
from ..prune.mask import MaskHandle, masked_heads, refuse_masked_again
from ..prune.slicing import kv_layout, slice_, slice_rows
from ..prune.reconstruct import DEFAULT_DAMPING
from ..prune.undo import Undo
from ..stats.scores import HeadScores
from .adapters import check_layout, get_adapter, head_counts, head_dim, projection_parameters, resolve_sites
from .attention import SiteConfig
from .configs import update_configs
from .empty import empty_forward
from .gates import refuse_gated
from .metadata import refuse_plain_loaded
from .records import STATE_ATTR, link_masks, link_state, refuse_records_elsewhere
from .removal import _checked, removal_plan, with_absent, zero_heads
from .verify import meta_model

__all__ = ["mask_heads", "prune_heads", "kept_heads", "zeroed_heads"]



def _o_dim(adapter) -> int:
    return 0 if adapter.conv1d else 1  # the o projection's input dimension


# ---- masking -----------------------------------------------------------------------------


def mask_heads(model, heads: dict, *, compensate: Optional[HeadScores] = None,
               reconstruct: Optional[HeadScores] = None, damping: float = DEFAULT_DAMPING,
               values=None, refit_bias: bool = True) -> MaskHandle:
    """Zero the pruned heads' input columns of each output projection, in place.

    Exact with every attention backend (a head's output only reaches the residual stream
    through those columns). What replaces the removed heads (see :mod:`.removal`):

    - nothing (the default): they are zeroed;
    - ``compensate`` (the ``HeadScores`` of :func:`collect` on this model): their mean output
      over the calibration data, ``W_o[:, head] @ mean`` added to the projection's bias;
    - ``reconstruct`` (``HeadScores`` collected with ``moments=True``): a least-squares refit
      of the kept heads' columns and the bias to what the full projection computed on the
      calibration data (ridge ``damping``, see :mod:`headprune.prune.reconstruct`);
    - ``values`` as well (:func:`~headprune.hf.values.collect_values` of these heads): the kept
      heads' value rows are refit with their output columns (:mod:`headprune.prune.values`).

    A bias is created where the projection has none, unless ``refit_bias=False``: the refit then
    fits the kept columns alone and leaves every bias as it is (for a family whose config
    declares no attention bias, so that a uniform layout stays a plain config). Returns a :class:`MaskHandle` whose
    ``restore()`` puts every column and bias back bit-exactly (its ``already_removed``: heads
    asked for that an earlier ``prune_heads`` removed, ignored); on error, nothing is changed.
    Plain torch models (``nn.MultiheadAttention``) are masked the same way (zeroed only).
    """
    check_module(model)
    if not hasattr(model, "config"):
        if compensate is not None or reconstruct is not None or values is not None:
            raise ValueError("compensate, reconstruct, values: supported for transformers models only")
        from ..plain import mask_modules

        return mask_modules(model, heads)
    model = uncompiled(model)  # its records live on the compiled module, where a save finds them
    refuse_records_elsewhere(model)
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    refuse_meta(projection_parameters(sites))
    heads, gone = positions(model, sites, adapter, heads)
    ids = _kept(model, sites, adapter)  # position -> original index, for messages and the handle
    refuse_masked_again(model, heads, [s.o.weight for s in sites], ids)
    # heads an earlier mask zeroed stay zeroed (its handle's, or in a masked model saved and loaded
    # again, every head whose columns are all zero): a refit keeps them out of the kept columns
    absent = {layer: masked_heads(model, sites[layer].o.weight) | zero_heads(sites[layer], adapter)
              for layer in heads}
    plan = removal_plan(sites, adapter, heads, compensate=compensate, reconstruct=reconstruct, damping=damping,
                        values=values, absent=absent, kept=ids, refit_bias=refit_bias)
    handle = MaskHandle(model, {layer: sorted(ids[layer][h] for h in hs) for layer, hs in heads.items()},
                        already_removed=gone)  # heads an earlier pruning removed: ignored, as prune_heads does
    link_masks(model, sites)
    try:
        with torch.no_grad():
            for layer, hs in heads.items():
                site, step = sites[layer], plan.get(layer)
                hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
                if step is not None and step.columns is not None:
                    keep = [h for h in range(hq) if h not in hs and h not in absent.get(layer, ())]
                    handle.write_columns_(site.o.weight, head_index(keep, d), step.columns, _o_dim(adapter))
                if step is not None and step.value_rows is not None:
                    handle.write_columns_(site.sub(site.block.v).weight, head_index(keep, d), step.value_rows, 0)
                if step is not None and step.bias is not None:
                    handle.set_bias_(site.o, step.bias)
                handle.zero_(site.o.weight, hs, hq, d, _o_dim(adapter))
    except BaseException:
        handle.restore()
        raise
    return handle


# ---- physical removal ----------------------------------------------------------------------


def _set_attrs(undo, site, adapter, hq: int, hkv: int, groups: int) -> None:
    d = head_dim(site, adapter)
    values = {"heads": hq, "kv_heads": hkv, "groups": groups, "inner": hq * d}
    for attr, what in adapter.module_attrs.items():
        undo.set(site.module, attr, values[what])
    if adapter.reads_config_heads:  # Phi-3 reads config.num_attention_heads in forward
        undo.set(site.module, "config", SiteConfig(site.module.config, num_attention_heads=hq, num_key_value_heads=hkv))
    if hq == 0:
        undo.set(site.module, "forward", partial(empty_forward, adapter.empty, site.o, adapter.conv1d, site.module,
                                                 site.name.endswith("cross")))


def _prune_site(undo, site, adapter, remove, kv_ids=None) -> tuple:
    """Slice one site; returns the kept query positions and the KV rows (local indices)."""
    hq, hkv = head_counts(site, adapter)
    d, groups = head_dim(site, adapter), hq // hkv
    keep = [h for h in range(hq) if h not in set(remove)]
    kv_rows, new_groups = kv_layout(keep, groups, kv_ids)
    b, conv = site.block, adapter.conv1d
    if b.qkv is None:
        slice_rows(undo, site.sub(b.q), head_index(keep, d), conv)
        slice_rows(undo, site.sub(b.k), head_index(kv_rows, d), conv)
        slice_rows(undo, site.sub(b.v), head_index(kv_rows, d), conv)
    else:
        idx = torch.cat([head_index(keep, d), head_index(kv_rows, d, hq * d), head_index(kv_rows, d, (hq + hkv) * d)])
        slice_rows(undo, site.sub(b.qkv), idx, conv)
    slice_(undo, site.o, "weight", head_index(keep, d), _o_dim(adapter))
    for owner, dim in adapter.extras:
        module = getattr(site.module, owner, None)
        if module is not None:
            slice_(undo, module, "weight", torch.tensor(keep, dtype=torch.long), dim)
    _set_attrs(undo, site, adapter, len(keep), len(kv_rows), new_groups)
    return keep, kv_rows


def new_state(model, counts, from_config: bool = False) -> dict:
    """The pruning record of ``model`` (a copy of its own, or a new one recording its config as
    the original; ``from_config``: the model was just built from that config, which therefore
    describes it, as ``load_pruned`` builds it)."""
    old = getattr(model, STATE_ATTR, None)
    if old is not None:
        return copy.deepcopy(old)
    if not from_config:
        check_config(model, counts)
    return {
        "kept": [list(range(c[0])) for c in counts],
        "kv": [list(range(c[1])) for c in counts],
        "num_heads": [c[0] for c in counts],
        "per_layer_bias": [],
        "original_config": model.config.to_dict(),
    }


def check_config(model, counts) -> None:
    """The first pruning records ``model.config`` as the original that ``load_pruned`` rebuilds,
    and a save of a model never pruned writes it: refuse a config that does not describe the
    model's heads (edited after the model was built, or the model is part of one pruned as a
    whole, whose record is on that one), which would save a directory nothing loads. A class
    not built from its config alone (a subclass taking other arguments) is not checked:
    ``load_pruned`` cannot rebuild it either."""
    build = getattr(type(model), "_from_config", None)
    if build is None:
        return
    adapter = get_adapter(model)
    try:
        built = meta_model(lambda: build(copy.deepcopy(model.config)), sum(1 for _ in model.parameters()), "model",
                           "its config")
    except ValueError:
        return
    now = [(*c, head_dim(s, adapter)) for c, s in zip(counts, resolve_sites(model, adapter))]
    then = [(*head_counts(s, adapter), head_dim(s, adapter)) for s in resolve_sites(built, adapter)]
    if now != then:
        raise ValueError(f"model: its config describes (query heads, KV heads, head size) per site {then}, its "
                         f"attention modules hold {now}; a save writes the config as the model's, so the saved "
                         "directory would not load: if a model holding this one was pruned, pass that model (the "
                         "pruning's record is on it); else make the config and the modules agree (build the model "
                         "from the config) first")


def positions(model, sites, adapter, heads: dict) -> tuple:
    """``(positions, already removed)``: ``heads`` (``{site: [original head indices]}``, as
    transformers 4 took them, the same across repeated pruning and save/reload) as the sites'
    current positions, and the heads an earlier pruning already removed (ignored, as
    transformers 4 ignored them)."""
    state = getattr(model, STATE_ATTR, None)
    current = [head_counts(s, adapter)[0] for s in sites]
    if state is None:
        refuse_plain_loaded(model, current)
        return normalize_heads(heads, current), {}
    kept = state["kept"]
    original = state.get("num_heads") or [max((max(k) + 1 for k in kept if k), default=0)] * len(kept)
    ids = normalize_heads(heads, original)
    out, gone = {}, {}
    for site, hs in ids.items():
        where = {h: j for j, h in enumerate(kept[site])}
        out_site = [where[h] for h in hs if h in where]
        if out_site:
            out[site] = out_site
        if len(out_site) < len(hs):
            gone[site] = [h for h in hs if h not in where]
    return out, gone


def check_scores(model, scores, arg: str = "scores") -> HeadScores:
    """``scores``, after checking they are ``HeadScores`` collected on ``model`` as it is (its
    family, head layout and kept heads, and the output projections of its sites no active mask
    has changed): for the functions that take a model and its statistics."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    compare = [s.index for s in sites if not masked_heads(model, s.o.weight)]
    return _checked(scores, sites, adapter, arg, _kept(model, sites, adapter), compare)


def kept_heads(model) -> dict:
    """``{layer: original query heads kept}`` for every site (all heads if never pruned)."""
    check_module(model)
    refuse_records_elsewhere(model)
    adapter = get_adapter(model)
    return _kept(model, resolve_sites(model, adapter), adapter)


def _kept(model, sites, adapter) -> dict:
    """:func:`kept_heads` of sites already resolved."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return {s.index: list(range(head_counts(s, adapter)[0])) for s in sites}
    return {i: list(k) for i, k in enumerate(state["kept"])}


def zeroed_heads(model) -> dict:
    """``{layer: original query heads}`` whose output-projection columns are all exactly zero,
    as :func:`mask_heads` leaves them (in a model it masked, or one saved and loaded again): what
    they add is zero, so :func:`prune_heads` removes them without changing the function."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    kept, zeroed = _kept(model, sites, adapter), {}
    for site in sites:
        dead = sorted(kept[site.index][h] for h in zero_heads(site, adapter))
        if dead:
            zeroed[site.index] = dead
    return zeroed


def _pruning_plan(sites, adapter, heads: dict, ids: dict, **removal) -> tuple:
    """``(removal_plan, absent)`` of a pruning: heads a mask zeroed in a model saved and loaded
    again (columns all zero) stay out of a refit's kept columns and stay zero, as ``mask_heads``
    keeps them (``absent``: ``{site: positions}``; none where nothing is refit or compensated)."""
    refits = any(removal.get(k) is not None for k in ("compensate", "reconstruct", "values"))
    absent = {layer: zero_heads(sites[layer], adapter) - set(hs) for layer, hs in heads.items()} if refits else {}
    return removal_plan(sites, adapter, heads, absent=absent, kept=ids, **removal), absent


def _fresh_position_bias(module, args, kwargs):
    """T5 passes layer 0's position bias down the stack; once layers keep different heads,
    each layer computes its own from its own table instead."""
    return args, {**kwargs, "position_bias": None}


def _split_shared_bias(undo, model, sites, adapter, state, new_kept, force=()) -> None:
    """Give each layer of a T5 stack its own relative-bias table (a copy of layer 0's) when
    the layers of a block will keep different heads."""
    if not adapter.shared_position_bias:
        return
    blocks: dict = {}
    for s in sites:
        blocks.setdefault(f"{s.block.stack}.{s.block.kind}", []).append(s)
    for name, group in blocks.items():
        table = getattr(group[0].module, "relative_attention_bias", None)
        # without a table (T5's cross-attention) the bias passed down is zeros and the mask, alike
        # for every head: only another number of heads needs each layer's own
        same = (lambda k: k) if table is not None else len
        differ = any(same(new_kept[s.index]) != same(new_kept[group[0].index]) for s in group)
        if name in state["per_layer_bias"] or not (differ or name in force):
            continue
        for s in group:
            if table is not None and s is not group[0]:
                undo.set(s.module, "relative_attention_bias", copy.deepcopy(table))
                undo.set(s.module, "has_relative_attention_bias", True)
            undo.call(s.module.register_forward_pre_hook(_fresh_position_bias, with_kwargs=True).remove)
        state["per_layer_bias"].append(name)


def _refuse_active(model, sites, ids) -> None:
    """``ValueError`` while masks or gates are active on ``model``: slicing would copy a mask's
    zeros and orphan its handle's restore(); gates are sized to the heads at their block's entry."""
    masked = {s.index: sorted(ids[s.index][h] for h in masked_heads(model, s.o.weight)) for s in sites}
    masked = {k: v for k, v in masked.items() if v}
    refuse_gated(model, "prune_heads")
    if masked:
        raise ValueError(f"model: heads {masked} are masked by an active mask_heads handle; restore() it "
                         "(or leave its with block) before prune_heads")


@torch.inference_mode(False)  # the new parameters are ordinary tensors, trainable later, even when called in it
def prune_heads(model, heads: dict, *, compensate: Optional[HeadScores] = None,
                reconstruct: Optional[HeadScores] = None, damping: float = DEFAULT_DAMPING, values=None,
                refit_bias: bool = True, _per_layer_bias=(), _from_config: bool = False):
    """Physically remove heads: slice q/k/v rows (fused layouts included), o columns, biases
    and per-head extras, and update the modules' head counts, per layer.

    ``compensate`` / ``reconstruct`` / ``damping`` / ``values`` / ``refit_bias``: as for :func:`mask_heads` (mean
    compensation, or a least-squares refit of the kept columns, the bias and, with ``values``,
    the kept value rows); the masked and
    the pruned model compute the same function. A bias added where the family has none is
    recorded by ``save_pruned`` and rebuilt by ``load_pruned``, while plain
    ``from_pretrained`` refuses such a directory instead of dropping the bias.

    Counts may differ between layers; a layer may lose every head (its attention then adds
    only the o bias). Under GQA, KV heads whose query heads are all gone are removed; when
    a KV group is only partly pruned, KV heads are repeated so groups stay even (exact).
    The configs are updated when a single layout fits every layer. On any error the model
    is left unchanged. Returns a :class:`~headprune.hf.report.PruneReport`.
    """
    from .report import PruneReport, measure

    check_module(model)
    model = uncompiled(model)
    refuse_records_elsewhere(model)
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if not _from_config:  # load_pruned builds the saved layout on the meta device, then loads the weights
        refuse_meta(projection_parameters(sites))
    counts = [head_counts(s, adapter) for s in sites]
    heads, gone = positions(model, sites, adapter, heads)
    ids = _kept(model, sites, adapter)
    _refuse_active(model, sites, ids)
    plan, absent = _pruning_plan(sites, adapter, heads, ids, compensate=compensate, reconstruct=reconstruct,
                                 damping=damping, values=values, refit_bias=refit_bias)  # before slicing
    before = measure(model)
    if not any(heads.values()):  # nothing to remove (ratio 0, or every head removed before): the model stays as it is
        return PruneReport(before, before, {}, gone)
    state = new_state(model, counts, _from_config)
    removed_ids = {site: [state["kept"][site][p] for p in hs] for site, hs in heads.items()}
    state.setdefault("o_bias", [])
    new_kept = [[k for j, k in enumerate(state["kept"][i]) if j not in heads.get(i, ())] for i in range(len(sites))]
    undo = Undo()
    try:
        with torch.no_grad():
            _split_shared_bias(undo, model, sites, adapter, state, new_kept, _per_layer_bias)
            for layer, step in plan.items():
                o = sites[layer].o
                if step.bias is None:  # a refit without the bias: the projection keeps none
                    continue
                if o.bias is None:
                    state["o_bias"] = sorted({*state["o_bias"], layer})
                flag = (o.bias if o.bias is not None else o.weight).requires_grad  # a bias keeps its own
                undo.set(o, "bias", nn.Parameter(step.bias.to(o.weight.device, o.weight.dtype), requires_grad=flag))
            for layer, remove in heads.items():
                keep, kv_rows = _prune_site(undo, sites[layer], adapter, remove, state["kv"][layer])
                step = plan.get(layer)
                if step is not None and step.columns is not None:  # the refit kept columns
                    o = sites[layer].o
                    columns = with_absent(step.columns, keep, absent.get(layer, ()), sites[layer], adapter)
                    undo.set(o, "weight", nn.Parameter(columns.to(o.weight.device, o.weight.dtype).contiguous(),
                                                       requires_grad=o.weight.requires_grad))
                if step is not None and step.value_rows is not None:  # the value refit's kept rows
                    v = sites[layer].sub(sites[layer].block.v)
                    undo.set(v, "weight", nn.Parameter(step.value_rows.to(v.weight.device, v.weight.dtype).contiguous(),
                                                       requires_grad=v.weight.requires_grad))
                state["kept"][layer] = [state["kept"][layer][j] for j in keep]
                state["kv"][layer] = [state["kv"][layer][j] for j in kv_rows]
            state["uniform"] = update_configs(undo, model, sites, adapter, state)
            undo.set(model, STATE_ATTR, state)
            link_state(model, sites, undo)
            check_layout(model)
            after = measure(model)
    except BaseException:
        undo.rollback()
        raise
    return PruneReport(before, after, removed_ids, gone)
