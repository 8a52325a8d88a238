"""Measured allocation: how many heads each layer gives, from what removing them costs the model.

:func:`~headprune.ranking.select_heads` spreads a budget by a rule: evenly over the layers
(the default) or by one ranking over the whole model. Neither sees how much of a layer's work
the rest of the network needs, nor how a layer's removal error grows through the layers after
it. :func:`layer_costs` measures that: for every site and every count of heads its layouts
allow, the heads the ranking removes there (the same as ``select_heads(..., counts=)``), or
the heads chosen one at a time by this same measurement (``choose``), are masked with the
least-squares refit, that site alone, and the model's distillation loss
against itself unpruned is taken on a few calibration sequences (the first ones; the refit of
the measurement leaves their tokens out of its moments, so a layer whose refit fits the
calibration text better than other text does not look cheaper than it is): the KL divergence of
the next-token distributions for causal LMs, 1 - cosine of the pooled last hidden states
for encoders (the loss :func:`headprune.hf.recover` trains on). :func:`select_measured` picks the
per-site counts of least summed cost that meet the budget (:func:`~headprune.ranking.allocation.allocate_by_cost`).

The costs do not depend on the budget, so one :class:`LayerCosts` serves every ratio. They take
one forward of the sequences per (site, count) (with the greedy choice, one per head left at
each count); in a model with one stack of layers the layers before the masked site answer from
their outputs in the unpruned forward, so each measurement runs only the layers from the site on.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.modules import eval_mode, instance_forward
from ..ranking.allocation import allocate_by_cost
from ..ranking.layouts import even_layouts, has_grouped_queries
from ..ranking.recipes import DEFAULT_GQA, GQA_MODES, default_choice, resolve_recipe
from ..ranking.select import budget, select_heads
from ..ranking.units import count_arg, unit_sizes
from ..stats.moments import DEFAULT_DAMPING
from ..stats.scores import HeadScores
from .adapters import get_adapter, resolve_sites
from .batches import batch_rows, check_batches, check_inputs_of
from .collect import collect, moments_like
from .prune import check_scores, mask_heads
from .distil import _Teacher, _kwargs, _loss
from .training import _digest as tensors_digest

__all__ = ["CHOICES", "LayerCosts", "layer_costs", "select_measured", "DEFAULT_SEQUENCES"]

#: calibration sequences each cost is measured on by default (the first of the batches; at
#: most a quarter of them, the refit of the measurement fitting the rest)
DEFAULT_SEQUENCES = 16
#: which heads each measured count removes (``layer_costs``' ``choose``): the selection's
#: ranking, or greedily by the measured loss itself. On all-MiniLM-L6-v2 (256 calibration
#: paragraphs, 16 measured), greedy against ranking by output variance, held-out fidelity at
#: 30% / 50% of heads, calibrated and evaluated on the same text: the Python tutorial 0.9786 /
#: 0.9441 against 0.9786 / 0.9415, the Debian licences 0.9821 / 0.9544 against 0.9778 / 0.9412,
#: the prose 0.9831 / 0.9551 against 0.9808 / 0.9551; calibrated on the prose and evaluated on
#: the tutorial 0.9550 / 0.8878 against 0.9526 / 0.9037 (the heads fit the kind of text they were
#: measured on). It took 46-55 s against 7-8 s (docs/quality.md, "Measured allocation").
CHOICES = ("ranking", "greedy")


@dataclass
class LayerCosts:
    """What removing heads from one site at a time costs: ``costs[site]`` maps each count of
    heads removed to the distillation loss with only those heads removed (refit), ``heads[site]``
    the same counts to the heads; sites that may not lose heads have empty tables. ``options``
    is the selection the costs were measured for (``gqa``, ``score``, ...)."""

    costs: list
    heads: list
    sequences: int
    tokens: int
    seconds: float
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"costs": [{str(k): v for k, v in c.items()} for c in self.costs],
                "heads": [{str(k): v for k, v in h.items()} for h in self.heads],
                "sequences": self.sequences, "tokens": self.tokens, "seconds": self.seconds, "options": self.options}


def _counts(scores: HeadScores, site: int, gqa: str, min_heads: int) -> list:
    """The numbers of heads ``site`` may lose under ``gqa`` (positive, at most what min_heads allows:
    units, as :func:`~headprune.ranking.select_heads` counts them, KV groups under ``"group"``)."""
    hq, hkv = scores.num_heads[site], scores.num_kv_heads[site]
    size = unit_sizes(scores, gqa)[site]
    top = hq - min_heads * size
    if gqa == "even" and has_grouped_queries(scores):
        return [k for k in sorted(even_layouts(hq, hkv)) if 0 < k <= top]
    return list(range(size, top + 1, size))


def _measured_count(sequences: Optional[int], total: int) -> int:
    """The sequences to measure on, of ``total``: ``sequences``, checked, or by default at most
    a quarter of them (the rest is the refit's)."""
    if sequences is None:
        return min(DEFAULT_SEQUENCES, max(1, total // 4))
    sequences = count_arg("sequences", sequences)
    if sequences >= total:
        raise ValueError(f"sequences: {sequences} of the {total} calibration sequences would leave none for the "
                         "refit the measurement leaves them out of; pass fewer")
    return sequences


def _sequences(batches, n: int) -> list:
    """The first ``n`` sequences of ``batches``, as batches (the last one cut)."""
    out, left = [], n
    for batch in batches:
        rows = batch_rows(batch)
        if rows > left:
            batch = {k: (v[:left] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v)
                     for k, v in batch.items()}
            rows = left
        out.append(batch)
        left -= rows
        if left == 0:
            break
    if not out:
        raise ValueError("batches: expected at least one batch, got none")
    return out


def _without(scores: HeadScores, part: HeadScores) -> HeadScores:
    """``scores`` with the second moments of ``part`` (a subset of its calibration sequences)
    taken out (:meth:`~headprune.stats.moments.OutputMoments.without`)."""
    return dataclasses.replace(scores, moments=scores.moments.without(part.moments, scores.names))


def layer_costs(model, batches, scores: HeadScores, *, gqa: str = DEFAULT_GQA, score=None, order=None,
                seed: int = 0, protect_layers=None, min_heads_per_layer: int = 1, damping: float = DEFAULT_DAMPING,
                sequences: Optional[int] = None, choose: Optional[str] = None, progress: bool = False) -> LayerCosts:
    """Measure, per site and per count of heads, the model's distillation loss with only those
    heads removed (masked with the refit from ``scores``, which must hold second moments:
    ``collect(..., moments=True)``, less the measured sequences' own). ``batches``: the
    calibration batches ``scores`` were collected on (batched as you like; sequences the
    moments do not hold are refused), of which the first ``sequences``
    sequences are measured on (default: :data:`DEFAULT_SEQUENCES`, at most a quarter of them).
    The selection options mean what they mean for :func:`~headprune.ranking.select_heads`;
    protected sites are not measured. ``choose`` (:data:`CHOICES`) says which heads each count
    removes: ``"ranking"``, the ones ``select_heads(..., counts=)`` ranks first; ``"greedy"``,
    the previous count's heads plus the one whose removal measured cheapest (one measurement
    per head left at each count: about ``heads**2 / 2`` per site instead of ``heads``); default
    (``None``): greedy where every unit is one head and no ``score`` or ``order`` is given (on
    all-MiniLM-L6-v2 it kept the embeddings closer on the kind of text measured on, less close
    on another, see :data:`CHOICES`), else ranking. The model is left exactly as it was."""
    if getattr(scores, "moments", None) is None:
        raise ValueError("scores: measured allocation refits the heads it removes and needs second moments; "
                         "collect with moments=True")
    check_scores(model, scores)
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
    choose = resolve_choice(scores, gqa, score, order, choose)
    part = measured_part(batches, sequences)
    select = dict(gqa=gqa, score=score, order=order, seed=seed, protect_layers=protect_layers,
                  min_heads_per_layer=min_heads_per_layer, damping=damping)
    select_heads(scores, counts={}, **select)  # the options, checked
    options = _options(scores, choose, **select)
    protect = set(options["protect_layers"])
    counts = [[] if site in protect else _counts(scores, site, gqa, min_heads_per_layer)
              for site in range(scores.num_sites)]
    start = time.perf_counter()
    # forwards: greedy measures every head left at each count up to the largest, ranking one per count
    bar = _bar(sum(sum(h - j for j in range(max(c, default=0))) if choose == "greedy" else len(c)
                   for h, c in zip(scores.num_heads, counts)), progress)
    with measuring(model, part, scores, damping, bar) as measure:
        if choose == "greedy":
            heads, costs = zip(*(_greedy(measure, site, ids, c) for site, (ids, c) in
                                 enumerate(zip(scores.site_heads(), counts))))
        else:
            heads = [{k: select_heads(scores, counts={site: k}, **select)[site] for k in c}
                     for site, c in enumerate(counts)]
            costs = [{k: measure(site, hs) for k, hs in table.items()} for site, table in enumerate(heads)]
    return LayerCosts(list(costs), list(heads), measure.rows, measure.tokens, time.perf_counter() - start, options)


def _options(scores, choose, *, gqa: str = DEFAULT_GQA, score=None, order=None, seed: int = 0, protect_layers=None,
             min_heads_per_layer: int = 1, damping: float = DEFAULT_DAMPING) -> dict:
    """:attr:`LayerCosts.options`: what a measurement depends on besides the model and its batches."""
    return {"gqa": gqa, "score": score if isinstance(score, (str, type(None))) else "tensor", "order": order,
            "seed": seed, "min_heads_per_layer": min_heads_per_layer, "damping": damping, "choose": choose,
            "protect_layers": sorted(resolve_recipe(scores, score, order, protect_layers).protect_layers),
            "heads": scores.site_heads(), "scores": _digest(scores)}


def _digest(scores: HeadScores) -> str:
    """Which statistics costs were measured with (another model's or calibration's differ)."""
    return "statistics sha256:" + tensors_digest([t for t in (scores.stats, scores.outputs) if t is not None])


def costs_differ(costs, scores: HeadScores, *, choose=None, **select) -> dict:
    """``{option: (measured with, asked)}``: :func:`layer_costs`' options ``select`` (its defaults where absent)
    that ``costs`` were measured with otherwise; ``choose=None`` matches any, the seed matters to random orders only."""
    now = _options(scores, choose, **select)
    skip = {"heads", *(["choose"] if choose is None else []), *(["seed"] if now["order"] != "random" else [])}
    return {k: (costs.options[k], v) for k, v in now.items() if k not in skip and costs.options.get(k, v) != v}


def measured_part(batches, sequences: Optional[int]) -> list:
    """The batches of the first ``sequences`` calibration sequences, which a measurement is
    taken on (default: :data:`DEFAULT_SEQUENCES`, at most a quarter of them)."""
    check_batches(batches)
    batches = list(batches)
    for batch in batches:  # before their rows are counted
        check_inputs_of(batch)
    return _sequences(batches, _measured_count(sequences, sum(batch_rows(b) for b in batches)))


@contextmanager
def measuring(model, part: list, scores: HeadScores, damping: float, bar, refit_bias: bool = True):
    """A :class:`_Measure` over the sequences ``part``, each measurement refit from ``scores``'
    moments less ``part``'s own (so a layer whose refit fits its calibration tokens better
    than it generalises does not look cheap), the model in eval mode without gradients;
    ``bar`` closed at the end, and every module's training flag restored on any exit
    (``refit_bias``: as for ``mask_heads``)."""
    if getattr(model.config, "is_encoder_decoder", False):
        bar.close()
        raise ValueError(f"model: measuring what removing heads costs runs causal LMs and encoders, not "
                         f"{type(model).__name__} (encoder-decoder); choose by the ranking (scope='per_layer', "
                         "and the ranking's heads for a uniform layout)")
    refit = _without(scores, collect(model, part, progress=False, moments=moments_like(scores) or True))  # same type
    with eval_mode(model), torch.no_grad(), _Measure(model, part, refit, damping, bar, refit_bias) as measure:
        yield measure
    bar.close()


def resolve_choice(scores: HeadScores, gqa: str, score, order, choose: Optional[str]) -> str:
    """The ``choose`` :func:`layer_costs` runs with these options (``None`` resolved, checked)."""
    single = set(unit_sizes(scores, gqa)) == {1} and not has_grouped_queries(scores)  # units of one head
    if choose is None:
        return default_choice(single, score, order)
    if choose not in CHOICES:
        raise ValueError(f"choose: expected one of {', '.join(CHOICES)}, got {choose!r}")
    if choose == "greedy" and not single:
        raise ValueError("choose: 'greedy' removes one head at a time, and these sites' units under "
                         f"gqa={gqa!r} are groups of heads; use 'ranking'")
    return choose


def _greedy(measure, site: int, heads: list, counts: list) -> tuple:
    """``(heads, costs)`` of one site by counts: each count the previous one's heads plus the
    head whose removal with them measured cheapest (the lowest id on a tie). ``heads``: the
    site's heads by original id (a pruned model's positions are not its ids)."""
    chosen, table, costs = [], {}, {}
    for k in range(1, max(counts, default=0) + 1):
        cost, head = min((measure(site, sorted(chosen + [h])), h) for h in heads if h not in chosen)
        chosen.append(head)
        if k in counts:
            table[k], costs[k] = sorted(chosen), cost
    return table, costs


class _Measure:
    """``measure(site, heads)``: the distillation loss over the measured sequences with only
    ``heads`` of ``site`` masked (refit), one step of ``bar``; in a one-stack model the layers
    before the site answer from the unpruned forward's recorded outputs."""

    def __init__(self, model, part: list, refit: HeadScores, damping: float, bar, refit_bias: bool = True):
        self.model, self.refit, self.damping, self.bar, self.refit_bias = model, refit, damping, bar, refit_bias
        self.kws = [_kwargs(model, b) for b in part]
        self.sizes = [batch_rows(b) for b in part]
        self.rows = sum(self.sizes)
        self.tokens = sum(_positions(kw, model.config) for kw in self.kws)

    def __enter__(self):
        teacher = _Teacher(self.model, cache=True)
        self.layers = _layers(self.model)
        with _Record(self.layers) as recorded:
            self.targets = [teacher(i, kw) for i, kw in enumerate(self.kws)]
        self.outputs, self.modes = recorded.outputs, teacher.modes
        return self

    def __exit__(self, *exc):
        self.targets = self.outputs = None
        return False

    def __call__(self, site: int, heads: list) -> float:
        with _Replay(self.layers, self.outputs, site) as replay, \
                mask_heads(self.model, {site: heads}, reconstruct=self.refit, damping=self.damping,
                           refit_bias=self.refit_bias):
            loss = 0.0
            for i, (t, kw, n) in enumerate(zip(self.targets, self.kws, self.sizes)):
                replay.batch = i
                loss += _loss(self.model, t, kw, self.modes).item() * n
        self.bar.update(1)
        return loss / self.rows


def _layers(model) -> Optional[list]:
    """The decoder or encoder layers in order, one attention site each, when the model is one
    stack of them (else ``None``: every measurement runs the whole model)."""
    adapter = get_adapter(model)
    if len(adapter.blocks) != 1:
        return None
    layers = [site.parent for site in resolve_sites(model, adapter)]
    return layers if len({id(m) for m in layers}) == len(layers) else None


class _Record:
    """Records every layer's output, per forward, while the unpruned model runs."""

    def __init__(self, layers):
        self.layers, self.outputs, self.hooks = layers or [], [[] for _ in layers or []], []

    def __enter__(self):
        for j, layer in enumerate(self.layers):
            self.hooks.append(layer.register_forward_hook(lambda m, a, out, j=j: self.outputs[j].append(out)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False


class _Replay:
    """Layers before ``site`` answer with their recorded output of forward ``batch`` (they
    are not masked, so it is what they compute), so only the layers from ``site`` on run."""

    def __init__(self, layers, outputs, site: int):
        self.layers = (layers or [])[:site]
        self.outputs, self.batch = outputs, 0

    def __enter__(self):
        self.stack = ExitStack()
        with self.stack:  # on an error midway, the layers replaced so far are put back
            for j, layer in enumerate(self.layers):
                self.stack.enter_context(instance_forward(layer, lambda *a, j=j, **k: self.outputs[j][self.batch]))
            self.stack = self.stack.pop_all()
        return self

    def __exit__(self, *exc):
        self.stack.close()
        return False


def _positions(kw: dict, config) -> int:
    """The valid positions of one forward's inputs: its attention mask's, else every token;
    images count their patches and the class token (ViT's layout), or one each where the
    config names no patch size."""
    if isinstance(kw.get("attention_mask"), torch.Tensor):
        return int(kw["attention_mask"].sum())
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kw.get(key), torch.Tensor):
            return int(kw[key].shape[0] * kw[key].shape[1])
    pixels, patch = kw["pixel_values"], getattr(config, "patch_size", None)
    per_image = 1 if not isinstance(patch, int) else (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) + 1
    return int(pixels.shape[0]) * per_image


def _bar(total, enabled, desc: str = "headprune: measuring layer costs"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="mask", disable=not enabled)


def select_measured(model, batches, scores: HeadScores, *, ratio: Optional[float] = None,
                    count: Optional[int] = None, costs: Optional[LayerCosts] = None, gqa: str = DEFAULT_GQA,
                    score=None, order=None, seed: int = 0, protect_layers=None, min_heads_per_layer: int = 1,
                    damping: float = DEFAULT_DAMPING, sequences: Optional[int] = None,
                    choose: Optional[str] = None, progress: bool = False) -> tuple:
    """``(heads, costs)``: the heads to prune, ``ratio`` or ``count`` of the model's units
    (as in :func:`~headprune.ranking.select_heads`), spread over the sites where
    :func:`layer_costs` measured them to cost least in all; ``costs`` reuses an earlier
    measurement (it must have been taken with the same selection options). ``choose``: which
    heads each count removes (see :func:`layer_costs`). The total is the nearest the measured
    counts reach at or below the request: a few heads short where even layouts skip a size, and
    as many as ``protect_layers`` and ``min_heads_per_layer`` allow where the request is more
    (``select_heads`` refuses that; ``headprune prune`` warns): compare the result with the request."""
    if costs is None:
        costs = layer_costs(model, batches, scores, gqa=gqa, score=score, order=order, seed=seed,
                            protect_layers=protect_layers,
                            min_heads_per_layer=min_heads_per_layer, damping=damping, sequences=sequences,
                            choose=choose, progress=progress)
    elif not isinstance(costs, LayerCosts) or len(costs.costs) != scores.num_sites:
        raise ValueError(f"costs: expected the LayerCosts of these {scores.num_sites} sites, got {costs!r:.80}")
    elif (i := scores.other_site(dict(enumerate(costs.options.get("heads", scores.site_heads()))))) is not None:
        raise ValueError(f"costs: measured when site {i} held heads {costs.options['heads'][i]}, the scores' model "
                         f"holds {scores.site_heads()[i]}; measure again")  # before (or after) a pruning
    elif differ := costs_differ(costs, scores, choose=choose, gqa=gqa, score=score, order=order, seed=seed,
                                protect_layers=protect_layers, min_heads_per_layer=min_heads_per_layer, damping=damping):
        raise ValueError("costs: measured with " + ", ".join(f"{k}={a!r}" for k, (a, _) in differ.items())
                         + ", not with " + ", ".join(f"{k}={b!r}" for k, (_, b) in differ.items()) + "; measure again")
    size, *more = sorted({u for u, h in zip(unit_sizes(scores, gqa), scores.num_heads) if h} or {1})  # emptied: none
    if more:
        raise ValueError(f"gqa: the sites' units have different sizes {[size, *more]}; measured allocation needs one")
    want = budget(ratio, count, sum(scores.num_heads) // size) * size
    counts = allocate_by_cost(costs.costs, want)
    heads = {site: costs.heads[site][k] for site, k in enumerate(counts) if k}
    return heads, costs
