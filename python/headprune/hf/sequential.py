"""Layer-by-layer (sequential) calibration of the least-squares refit, as SparseGPT and SlimGPT do.

One-shot calibration measures every site's second moments on the unpruned model, so the refit
of layer l fits inputs that the pruned layers before it no longer produce. Sequentially, the
moments of layer l are taken with layers 0..l-1 already pruned and refit, so each refit is
fitted to the inputs that reach it (it reproduces the layer's own output on them; the error the
earlier layers made is not undone). It runs over cached hidden states, one layer at a time:

1. one pass with every layer replaced by a stub that records its arguments (the hidden states
   entering the first layer, and each layer's other arguments: masks, position embeddings),
   so nothing but the embeddings is computed;
2. per layer: the layer runs on the current hidden states until its output projection, whose
   inputs are cached and summed into the layer's moments (given a budget rather than counts,
   a collection records the layer's entropies and output statistics on the way, as
   ``collect`` does); its count is decided, its heads are chosen and refit (masked, so
   everything is restored at the end); then the layer is finished from the cached projection
   inputs (the attention is not recomputed) to give the next layer's input.

About one forward in all (with a budget, in place of the collection), and the memory of one
layer's activations besides the hidden states. Decoder-only and encoder-only families (one
stack of layers) are supported.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, nullcontext
from typing import Callable, Optional

import torch

from ..prune.heads import head_index
from ..prune.mask import MaskHandle, active_masks
from ..prune.reconstruct import kept_columns, refit_output
from ..ranking import DEFAULT_GQA
from ..ranking.allocation import RunningShares
from ..ranking.layouts import head_costs, layout_heads
from ..ranking.reconstruction import greedy_removal, site_units
from ..stats.moments import DEFAULT_DAMPING, OutputMoments
from ..stats.scores import HeadScores
from .adapters import get_adapter, head_counts, head_dim, resolve_sites
from .batches import check_batches, forward_kwargs, sequence_digests
from .collect import _check_mask, moments_dtype, moments_like
from .gates import refuse_gated
from .collection import Collection, _add_gram_, padding_of, projection, query_mask, valid_chunks
from ..core.modules import eval_mode, instance_forward, ordinary_tensors
from .prune import _kept

__all__ = ["calibrate_sequentially"]


class _Stop(Exception):
    """Ends a forward early (the stub pass, the projection-input pass)."""


@ordinary_tensors  # the statistics, even when called in inference mode
def calibrate_sequentially(model, batches: list, scores: Optional[HeadScores] = None, counts: Optional[dict] = None, *,
                           ratio: Optional[float] = None, count: Optional[int] = None, gqa: Optional[str] = None,
                           damping: float = DEFAULT_DAMPING, choose: Optional[Callable] = None,
                           protect_layers=None, min_heads_per_layer: Optional[int] = None,
                           fused: Optional[bool] = None, moments=None, progress: bool = False) -> tuple:
    """``(heads, scores)``: the heads removed per site, by original index as ``prune_heads``
    takes them (a model pruned before keeps fewer), and statistics with the moments measured
    sequentially, ready for ``prune_heads(..., reconstruct=)``. The budget is given one of two ways:

    * ``scores`` and ``counts``: ``scores`` of the unpruned model (a one-shot collection) and
      the units to remove per site (heads, or KV groups with ``gqa="group"``; ``gqa`` default
      ``"query"``), e.g. the sizes of a one-shot selection; ``scores`` comes back with the
      sequential moments, summed in the float type of its own (``moments`` is for the one pass). ``choose(site, gram) -> [heads]`` may replace the choice within a site.
    * ``ratio`` or ``count`` (no ``scores``): one pass does it all, in place of the collection.
      Each site's count is decided when the pass reaches it (before it the layers after it are
      not seen): its share of the spread ``select_heads(..., scope="per_layer")`` gives, a unit
      more where the running total lags, the later sites still able to make the budget
      (:class:`~headprune.ranking.allocation.RunningShares`; ``gqa``, ``protect_layers`` and
      ``min_heads_per_layer`` as ``select_heads`` takes them, ``None``: its defaults, even
      layouts and the default recipe's protected layers). The statistics come back as
      ``collect(..., moments=moments, fused=fused)`` gives them (``moments``: the float type the
      second moments are summed in, ``True``/``"float64"`` or ``"float32"``; ``None``: float64),
      each site's measured on the inputs that reach it with the sites before it pruned.

    Within a site the units are chosen by greedy structured OBS on its sequential moments. The
    model is left exactly as it was.
    """
    adapter, sites = _check(model, batches, scores, counts, ratio, count,
                            {"choose": choose, "protect_layers": protect_layers,
                             "min_heads_per_layer": min_heads_per_layer, "fused": fused})
    kind = _moments_kind(moments, counts, scores)
    session = None if counts is not None else Collection(model, "qk", fused=fused is not False, moments=kind)
    gqa = gqa or ("query" if counts is not None else DEFAULT_GQA)
    plan = None if session is None else RunningShares(session.scores(), ratio=ratio, count=count, gqa=gqa,
                                                      protect_layers=protect_layers,
                                                      min_heads_per_layer=1 if min_heads_per_layer is None
                                                      else min_heads_per_layer)
    ids = _kept(model, sites, adapter)  # position -> original index
    layers = [s.parent for s in sites]
    kwargs = [forward_kwargs(model, b) for b in batches]
    if not kwargs:
        raise ValueError("batches: got none; every layer is calibrated on the calibration batches")
    for kw in kwargs if session is not None else ():  # the padding the statistics read, as collect checks it
        _check_mask(kw)
    gram, heads = [None] * len(sites), {}
    with ExitStack() as undo, torch.no_grad():
        undo.enter_context(eval_mode(model))  # dropout would change the moments
        if session is not None:
            undo.enter_context(session.active())
        hidden, calls = _capture(model, layers, kwargs)
        bar = _bar(len(sites), progress)
        for site in sites:
            n = plan.take(site.index) if plan is not None else counts.get(site.index, 0)
            if head_counts(site, adapter)[0] == 0:  # every head gone already: no moments, the layer runs as it is
                hidden = [site.parent(h, *args, **kw).detach() for h, (args, kw) in zip(hidden, calls[site.index])]
                bar.update(1)
                continue
            xs = _projection_inputs(site, calls, hidden, session, kwargs)
            gram[site.index] = _gram(xs, kwargs, site, kind) if session is None else session.gram[site.index]
            removed = (choose(site, gram[site.index]) if choose is not None else
                       _obs_heads(gram[site.index], site, adapter, n, gqa, damping))
            if removed:
                heads[site.index] = sorted(ids[site.index][h] for h in removed)
                undo.enter_context(_RefitMask(model, site, adapter, removed, gram[site.index], damping,
                                              heads[site.index]))
            hidden = _finish(site, adapter, calls, hidden, xs, session)
            bar.update(1)
        bar.close()
    if session is not None:  # the masks are restored: the statistics hold the model's own projections
        session.sequences = [d for kw in kwargs for d in sequence_digests(kw)]
        return heads, session.scores()
    moments = OutputMoments(gram, None if scores.moments is None else scores.moments.projection)
    return heads, dataclasses.replace(scores, moments=moments)


def _check(model, batches, scores, counts, ratio, count, options: dict) -> tuple:
    """``(adapter, sites)`` of a model sequential calibration supports, the budget given one way
    (``options``: those of one way only)."""
    check_batches(batches)
    for name in ("protect_layers", "min_heads_per_layer", "fused") if counts is not None else ("choose",):
        if options[name] is not None:
            raise ValueError(f"{name}: " + ("the per-site counts are taken as given, and no statistics are collected; "
                                            "give ratio= or count= for the one pass" if counts is not None else
                                            "replaces each layer's choice, its count included; give per-site counts "
                                            "with it"))
    if counts is not None and (ratio is not None or count is not None):
        raise ValueError("counts: give the per-site counts, or ratio= or count=, not both")
    if counts is not None and scores is None:
        raise ValueError("scores: per-site counts are re-chosen from the statistics of the unpruned model; pass them "
                         "(collect(..., moments=True)), or give ratio= or count= for one pass that collects its own")
    if counts is None and scores is not None:
        raise ValueError("scores: with ratio= or count= the pass collects its own statistics layer by layer; "
                         "leave scores out, or give per-site counts")
    if counts is None and ratio is None and count is None:
        raise ValueError("counts: give the per-site counts (with scores), or ratio= or count=")
    adapter = get_adapter(model)
    if len(adapter.blocks) != 1:
        raise ValueError(f"model: sequential calibration supports one stack of layers; {adapter.model_type} has "
                         f"{len(adapter.blocks)} attention blocks")
    if active_masks(model):
        raise ValueError("model: has heads masked by active mask_heads handles; restore them first (each layer's "
                         "refit here starts from its weights as they are, and would write the masked columns)")
    refuse_gated(model, "calibrate_sequentially", why=", whose gates would scale the moments collected")
    if options["fused"] is not None and not isinstance(options["fused"], bool):
        raise TypeError(f"fused: expected a bool, got {type(options['fused']).__name__}")
    return adapter, resolve_sites(model, adapter)


def _bar(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="headprune: sequential calibration", unit="layer", disable=not enabled)


def _capture(model, layers, kwargs) -> tuple:
    """Per batch, the hidden states entering the first layer, and per layer and batch its
    other arguments; every layer is a stub returning its input, so nothing else runs."""
    hidden, calls = [], [[] for _ in layers]

    def stub(i):
        def forward(*args, **kw):
            if i == 0:
                hidden.append(args[0].detach())
            calls[i].append((args[1:], kw))
            return args[0]
        return forward

    with ExitStack() as stack, torch.no_grad():
        for i, layer in enumerate(layers):
            stack.enter_context(instance_forward(layer, stub(i)))
        for kw in kwargs:
            model(**kw)
    return hidden, calls


def _projection_inputs(site, calls, hidden, session=None, kwargs=()) -> list:
    """The output projection's input of every batch (the layer runs until it; a ``session``
    records the attention's statistics and the projection input's on the way, each batch's
    padding read from its ``kwargs``)."""
    xs = []

    def grab(module, args):
        xs.append(args[0].detach())
        raise _Stop

    handle = site.o.register_forward_pre_hook(grab)  # after the session's own: it records first
    try:
        for i, (h, (args, kw)) in enumerate(zip(hidden, calls[site.index])):
            if session is not None:
                session.padding = padding_of(kwargs[i])
            try:
                site.parent(h, *args, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return xs


def _moments_kind(moments, counts, scores) -> torch.dtype:
    """The type the pass sums its moments in: given scores and counts, the scores' (``moments``
    refused there by name); in one pass, ``moments`` (float64 where ``None``; refused by name where
    it is no type of moments)."""
    if moments is not None and counts is not None:
        raise ValueError(f"moments: given scores and counts, the pass sums in the type of the scores' moments; "
                         f"leave moments out (got {moments!r})")
    if counts is not None:
        return moments_dtype((scores is not None and moments_like(scores)) or True)
    try:
        kind = moments_dtype(True if moments is None else moments)
    except ValueError:
        kind = None
    if kind is None:
        raise ValueError(f"moments: expected True, 'float64' or 'float32', got {moments!r}")
    return kind


def _gram(xs, kwargs, site, dtype=torch.float64) -> torch.Tensor:
    """A site's second moments of ``xs`` (its projection's inputs), summed in ``dtype``."""
    d = xs[0].shape[-1]
    gram = torch.zeros(d + 1, d + 1, dtype=dtype)
    for x, kw in zip(xs, kwargs):
        qm = query_mask(site, padding_of(kw), x.shape[0], x.shape[1], x.device) if x.dim() == 3 else None
        for c in valid_chunks(x.reshape(-1, d), None if qm is None else qm.reshape(-1)):
            _add_gram_(gram, c.cpu())
    return gram


def _obs_heads(gram, site, adapter, count, gqa, damping) -> list:
    if count <= 0:
        return []
    (hq, hkv), d = head_counts(site, adapter), head_dim(site, adapter)
    proj = projection(site, adapter)
    units = site_units(hq, hkv, d, gqa)
    order, _, _ = greedy_removal(gram, proj, units, damping=damping, energy=False)
    if gqa == "even":  # the cheapest even layout of this size, heads costing their greedy rank
        costs = head_costs([(0, [col // d for col in units[u][::d]]) for u in order], [hq])[0]
        return layout_heads(costs, hkv, count, f"site {site.name}: ")
    return sorted({col // d for u in order[:count] for col in units[u]})


class _RefitMask:
    """Masks ``removed`` (positions; ``original``: their original indices, for the handle) with the
    refit from ``gram`` for the rest of the pass (restored on exit)."""

    def __init__(self, model, site, adapter, removed, gram, damping, original):
        hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
        dim = 0 if adapter.conv1d else 1
        cols, bias = refit_output(site.o.weight.detach(), getattr(site.o, "bias", None), gram,
                                  kept_columns(hq, d, removed), damping=damping, conv1d=adapter.conv1d)
        self.handle = MaskHandle(model, {site.index: list(original)})
        # weights made under inference mode are written (and restored) in it: the pass runs outside it
        self.mode = torch.inference_mode() if site.o.weight.is_inference() else nullcontext()
        try:
            with self.mode:
                keep = [h for h in range(hq) if h not in set(removed)]
                self.handle.write_columns_(site.o.weight, head_index(keep, d), cols, dim)
                self.handle.set_bias_(site.o, bias.to(site.o.weight.dtype))
                self.handle.zero_(site.o.weight, list(removed), hq, d, dim)
        except BaseException:
            with self.mode:
                self.handle.restore()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with self.mode:
            self.handle.restore()
        return False


def _finish(site, adapter, calls, hidden, xs, session=None) -> list:
    """Each batch's layer output, with the attention module answering from the cached
    projection inputs (through the possibly refit projection); a ``session`` records nothing
    of it (its projection input was recorded before the refit)."""
    out, module = [], site.module
    with nullcontext() if session is None else session.paused():
        for h, (args, kw), x in zip(hidden, calls[site.index], xs):
            value = (x, None) if adapter.empty == "context" else (site.o(x), None)
            with instance_forward(module, lambda *a, _v=value, **k: _v):
                out.append(site.parent(h, *args, **kw).detach())
    return out
