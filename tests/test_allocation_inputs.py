"""Measured allocation's inputs: the batches it measures on must be the scores' calibration."""

import pytest
import torch

from headprune.hf.allocation import layer_costs, select_measured

from hf_tiny import tiny_batch
from test_allocation import tiny  # noqa: F401  (the fixture: a tiny model, its batches and scores)


def _one_per_batch(batches) -> list:
    """The same sequences, one per batch, each cut to its own length (no padding)."""
    return [{k: v[r:r + 1, : int(b["attention_mask"][r].sum())] for k, v in b.items()}
            for b in batches for r in range(b["input_ids"].shape[0])]


def test_layer_costs_refuses_sequences_the_scores_were_not_collected_on(tiny):
    """The refit of each measurement takes the measured sequences' moments out of the scores':
    other sequences' would leave moments of no text, which the semi-definite check misses once
    the calibration has more tokens than dimensions. The same sequences batched otherwise are
    the calibration's, and measure the same."""
    kind, model, batches, scores = tiny
    other = [tiny_batch(kind, seed=10 + i) for i in range(3)]
    for call in (lambda: layer_costs(model, other, scores), lambda: select_measured(model, other, scores, ratio=0.25)):
        with pytest.raises(ValueError, match=r"batches: 2 of the first 2 sequences, which the costs are measured on, "
                                             r"are not among the sequences the scores' second moments"):
            call()
    mixed = [{k: torch.cat([v[:1], o[1:2]]) for (k, v), o in zip(batches[0].items(), other[0].values())}]
    with pytest.raises(ValueError, match=r"batches: 1 of the first 2 sequences"):
        layer_costs(model, mixed + batches[1:], scores)
    want = layer_costs(model, batches, scores, sequences=4)
    got = layer_costs(model, _one_per_batch(batches), scores, sequences=4)
    assert got.heads == want.heads and got.sequences == want.sequences
    for a, b in zip(got.costs, want.costs):  # float32 forwards of other shapes: 1 - cosine near 1 rounds at ~1e-7
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)


def test_costs_of_other_statistics_are_measured_again_or_refused(tiny):
    """Costs are measured for one model's statistics: another calibration's (or another model's)
    are refused by select_measured, and a sweep's cache measures again rather than reuse them."""
    from headprune.app.sweep import _reusable
    from headprune.hf import collect

    kind, model, batches, scores = tiny
    costs = layer_costs(model, batches, scores)
    other = collect(model, batches[:2], moments=True, progress=False)
    with pytest.raises(ValueError, match=r"costs: measured with scores='statistics sha256:\w+', not with "
                                         r"scores='statistics sha256:\w+'; measure again"):
        select_measured(model, batches[:2], other, ratio=0.25, costs=costs)
    assert _reusable(costs, other, "even", 1e-2, {}) is None
    assert select_measured(model, batches, scores, ratio=0.25, costs=costs)[1] is costs


def test_the_same_sequences_in_other_types_or_with_other_keys_are_the_calibrations(tiny):
    """A sequence is its tokens: int32 ids, a collator's labels or a tokenizer's all-zero
    token_type_ids leave the moments as they are, and the measurement takes them."""
    kind, model, batches, scores = tiny
    other = [{**{k: v.int() for k, v in b.items()}, "labels": b["input_ids"].clone(),
              "position_ids": torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]),
              **({"token_type_ids": torch.zeros_like(b["input_ids"])} if kind == "bert" else {})} for b in batches]
    assert layer_costs(model, other, scores).heads == layer_costs(model, batches, scores).heads
    # other positions, or the same tokens padded on the left (their positions move), are other sequences
    shifted = [{**b, "position_ids": 2 + torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])}
               for b in batches]
    cut = lambda v, r, n: torch.cat([v[r:r + 1, n:], v[r:r + 1, :n]], 1)  # noqa: E731  (the padding moved left)
    left = [{k: cut(v, r, int(b["attention_mask"][r].sum())) for k, v in b.items()}
            for b in batches[:1] for r in range(b["input_ids"].shape[0])] + batches[1:]
    for bad in (shifted, left):
        with pytest.raises(ValueError, match="batches: [12] of the first 2 sequences"):
            layer_costs(model, bad, scores)


def _llama():
    from hf_tiny import tiny_model

    from headprune import collect

    model = tiny_model("llama")  # 2 layers of 4 query heads over 2 KV heads
    batches = [tiny_batch("llama", seed=i) for i in range(3)]
    return model, batches, collect(model, batches, moments=True, progress=False)


def test_min_heads_per_layer_counts_kv_groups_under_group_pruning_everywhere():
    """counts= and the measured allocation counted query heads where ratio/count count groups:
    with min_heads_per_layer=2 a layer of 2 groups kept one."""
    from headprune import select_heads

    _, _, scores = _llama()
    kw = dict(gqa="group", min_heads_per_layer=2, protect_layers=[])
    with pytest.raises(ValueError, match=r"^counts: layer 0: expected an int in \[0, 0\] \(its 4 heads less "
                                         r"min_heads_per_layer=2 units of 2 heads\), got 2"):
        select_heads(scores, counts={0: 2}, **kw)
    assert select_heads(scores, counts={0: 2}, **{**kw, "min_heads_per_layer": 1}) in ({0: [0, 1]}, {0: [2, 3]})
    model, batches, scores = _llama()
    heads, costs = select_measured(model, batches, scores, count=1, **{**kw, "min_heads_per_layer": 1})  # a group
    assert [sorted(t) for t in costs.costs] == [[2], [2]] and sum(map(len, heads.values())) == 2
    heads, costs = select_measured(model, batches, scores, count=1, **kw)  # short: every group stays (documented)
    assert costs.costs == [{}, {}] and heads == {}

