"""headprune.ranking.select_heads on synthetic scores."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from functools import partial

from headprune.ranking import DEFAULT_RECIPE, OUTPUT_RECIPE, default_protected, rank_heads
from headprune.ranking import select_heads as _select_heads
from headprune.core.schema import NUM_STATS
from headprune.stats import HeadScores

# The mechanics below are written against the formula as written (highest entropy first).
select_heads = partial(_select_heads, score="entropy", order="high", scope="global")


def make_scores(entropy, kv=None):
    entropy = torch.as_tensor(entropy, dtype=torch.float64)
    layers, heads = entropy.shape
    stats = torch.zeros(layers, heads, NUM_STATS, dtype=torch.float64)
    stats[..., 0] = 10
    stats[..., 1] = entropy * 10
    stats[..., 2] = entropy**2 * 10
    kv = kv or [heads] * layers
    return HeadScores(stats, [heads] * layers, kv, [8] * layers, [str(i) for i in range(layers)], ["self"] * layers)


E = [[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.6]]


def test_global_highest_entropy_first():
    assert select_heads(make_scores(E), count=3) == {0: [1], 1: [0, 2]}
    assert select_heads(make_scores(E), count=3, order="low") == {0: [0, 3], 1: [1]}


def test_ratio_is_floored_over_all_heads():
    assert sum(map(len, select_heads(make_scores(E), ratio=0.4).values())) == 3


def test_per_layer_scope():
    assert select_heads(make_scores(E), ratio=0.5, scope="per_layer") == {0: [1, 2], 1: [0, 2]}


def test_min_heads_and_protected_layers():
    sel = select_heads(make_scores(E), count=6, min_heads_per_layer=1)
    assert all(len(v) <= 3 for v in sel.values())
    assert select_heads(make_scores(E), count=2, protect_layers=[1]) == {0: [1, 2]}
    with pytest.raises(ValueError, match="allow at most 3"):
        select_heads(make_scores(E), count=4, protect_layers=[1])
    assert select_heads(make_scores(E), count=8, min_heads_per_layer=0) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_ties_break_by_layer_then_head():
    assert select_heads(make_scores([[0.5, 0.5], [0.5, 0.5]]), count=2, min_heads_per_layer=0) == {0: [0, 1]}


def test_gqa_group_mode_prunes_whole_groups():
    s = make_scores(E, kv=[2, 2])
    # groups (mean entropy): L0 g0 0.5, g1 0.4; L1 g0 0.5, g1 0.65
    assert select_heads(s, count=1, gqa="group") == {1: [2, 3]}
    assert select_heads(s, count=2, gqa="group") == {0: [0, 1], 1: [2, 3]}


def test_random_order_is_seeded():
    s = make_scores(E)
    a = select_heads(s, count=3, order="random", seed=1)
    assert a == select_heads(s, count=3, order="random", seed=1)
    assert sum(map(len, a.values())) == 3


def test_alternative_scores():
    s = make_scores(E)
    s.stats[..., 4] = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]) * 10
    assert rank_heads(s, score="sink")[0] == (0, [0])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, "ratio, count: give exactly one"),
        (dict(ratio=0.1, count=1), ValueError, "ratio, count"),
        (dict(ratio=1.5), ValueError, "ratio: expected a number in"),
        (dict(count=-1), ValueError, "count: expected a non-negative int"),
        (dict(count=1, scope="x"), ValueError, "scope: expected one of"),
        (dict(count=1, order="x"), ValueError, "order: expected one of"),
        (dict(count=1, gqa="x"), ValueError, "gqa: expected one of"),
        (dict(count=1, score="x"), ValueError, "score: expected one of"),
        (dict(count=1, score=[[0.0] * 4] * 2), TypeError, "score: expected a score name or a .* tensor, got list"),
        (dict(count=1, score=torch.zeros(2, 4).numpy()), TypeError, "score: expected a score name .* got ndarray"),
        (dict(count=1, score=torch.zeros(2, 4, dtype=torch.complex64)), ValueError, "score: expected a tensor of real"),
        (dict(count=1, score=torch.zeros(2, 4, device="meta")), ValueError, "score: expected a tensor of real .* meta"),
        (dict(count=1, protect_layers=[7]), ValueError, "protect_layers: indices"),
        (dict(count=1, min_heads_per_layer=-1), ValueError, "min_heads_per_layer"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_heads(make_scores(E), **kwargs)


def test_integer_arguments_of_numpy_and_torch_are_ints():
    import numpy as np

    want = select_heads(make_scores(E), count=3, min_heads_per_layer=1)
    for n in (np.int64(3), torch.tensor(3)):
        assert select_heads(make_scores(E), count=n, min_heads_per_layer=np.int32(1)) == want
        assert select_heads(make_scores(E), counts={np.int64(0): n}) == select_heads(make_scores(E), counts={0: 3})
    with pytest.raises(ValueError, match="count: expected a non-negative int, got (np.float64\\()?3.0"):
        select_heads(make_scores(E), count=np.float64(3))
    for bad in (torch.tensor(True), torch.tensor([3])):
        with pytest.raises(ValueError, match="count: expected a non-negative int"):
            select_heads(make_scores(E), count=bad)
        with pytest.raises(ValueError, match="min_heads_per_layer: expected a non-negative int"):
            select_heads(make_scores(E), count=1, min_heads_per_layer=bad)
    assert select_heads(make_scores(E), count=3, min_heads_per_layer=torch.tensor(1)) == want


def test_scores_type_is_checked():
    with pytest.raises(TypeError, match="scores: expected HeadScores"):
        select_heads({"a": 1}, count=1)


def test_head_without_statistics_is_refused():
    s = make_scores(E)
    s.stats[0, 2] = 0
    with pytest.raises(ValueError, match="no statistics"):
        select_heads(s, count=1)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.integers(1, 4), st.integers(1, 6), st.integers(0, 30), st.integers(0, 2), st.sampled_from(["global", "per_layer"]),
    st.sampled_from(["high", "low", "random"]), st.integers(0, 2**31 - 1),
)
def test_invariants(layers, heads, count, min_heads, scope, order, seed):
    g = torch.Generator().manual_seed(seed)
    s = make_scores(torch.rand(layers, heads, generator=g).round(decimals=1))
    capacity = layers * max(0, heads - min_heads)
    kw = dict(scope=scope, order=order, seed=seed, min_heads_per_layer=min_heads)
    if scope == "global" and count > capacity:
        with pytest.raises(ValueError):
            select_heads(s, count=count, **kw)
        return
    share = math.ceil(count / layers - 1e-9) if count <= layers * heads else heads + 1  # per layer, rounded up
    if scope == "per_layer" and count > layers * min(share, max(0, heads - min_heads)):
        with pytest.raises(ValueError):
            select_heads(s, count=count, **kw)
        return
    sel = select_heads(s, count=count, **kw)
    assert sel == select_heads(s, count=count, **kw)
    for layer, hs in sel.items():
        assert hs == sorted(set(hs)) and heads - len(hs) >= min_heads
    total = sum(map(len, sel.values()))
    assert total == count
    if scope == "per_layer":  # an even spread: every layer gives floor or ceil of its share
        sizes = [len(sel.get(layer, [])) for layer in range(layers)]
        assert all(count // layers <= n <= share for n in sizes) and max(sizes) - min(sizes) <= 1
    if order == "high" and scope == "global" and sel:
        chosen = min(float(s.entropy[l, h]) for l, hs in sel.items() for h in hs)
        free = [float(s.entropy[l, h]) for l in range(layers) for h in range(heads) if h not in sel.get(l, [])]
        full = [l for l in range(layers) if heads - len(sel.get(l, [])) <= min_heads]
        others = [float(s.entropy[l, h]) for l in range(layers) if l not in full for h in range(heads) if h not in sel.get(l, [])]
        assert all(v <= chosen for v in others) or not free


def test_default_recipe_is_the_measured_one():
    g = torch.Generator().manual_seed(0)
    s = make_scores(torch.rand(3, 4, generator=g).tolist())
    s.stats[..., 3] = torch.rand(3, 4, generator=g, dtype=torch.float64) * 10  # normalised entropy sums
    s.stats[..., 4] = torch.rand(3, 4, generator=g, dtype=torch.float64) * 10  # sink mass sums
    # without output statistics: the entropy fallback (inert, per layer), with a warning
    with pytest.warns(UserWarning, match="falls back to score='inert'"):
        fallback = _select_heads(s, ratio=0.25)
    inert = s.score("sink") + (1 - s.score("sink")) * s.score("normalized")
    assert fallback == {layer: [int(inert[layer].argmax())] for layer in range(3)}  # one per layer, most inert
    s.outputs = HeadScores.empty_outputs(s.num_heads, s.head_dim)
    s.outputs[..., 0] = 10
    s.outputs[..., 1] = torch.rand(3, 4, 8, generator=g, dtype=torch.float64) * 10
    s.outputs[..., 2] = s.outputs[..., 1] ** 2 / 10 + torch.rand(3, 4, 8, generator=g, dtype=torch.float64) * 10
    s.outputs[..., 3] = 10 * torch.rand(3, 4, 8, generator=g, dtype=torch.float64)
    s.causal = [True] * 3  # a decoder-only LM
    # output statistics without second moments: output variance, with a warning
    with pytest.warns(UserWarning, match="no second moments.*falls back to score='variance'"):
        got = _select_heads(s, ratio=0.5)
    assert got == _select_heads(s, ratio=0.5, **OUTPUT_RECIPE, protect_layers=[0])
    # 6 of 12 heads from layers 1 and 2 (the first layer is kept whole), least variance first
    var = s.score("variance")
    assert got == {layer: sorted(var[layer].argsort()[:3].tolist()) for layer in (1, 2)}
    with pytest.warns(UserWarning):
        assert _select_heads(s, ratio=0.5, protect_layers=[]) != got  # an explicit choice wins
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="the default recipe keeps the first layer of each causal stack whole"):
        _select_heads(s, ratio=0.8)
    # encoders keep no layer whole: the recipe is the same, unprotected; nor do statistics
    # that do not say whether their sites are causal (format 1)
    for causal in ([False] * 3, None):
        s.causal = causal
        with pytest.warns(UserWarning, match="no second moments"):
            assert _select_heads(s, ratio=0.5) == _select_heads(s, ratio=0.5, protect_layers=[]), causal
    # an encoder-decoder (encoder self, decoder self, cross; one layer each here): the decoder's
    # first self-attention layer
    s.causal, s.depth = [False, True, False], [0, 0, 0]
    assert default_protected(s) == (1,)


def test_default_recipe_with_second_moments_ranks_by_reconstruction():
    from hf_tiny import tiny_batch, tiny_model

    from headprune.hf import collect
    from headprune.ranking.reconstruction import reconstruction_score

    model = tiny_model("llama")
    s = collect(model, [tiny_batch("llama")], progress=False, moments=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing: no fallback warning
        got = _select_heads(s, ratio=0.25)
    assert DEFAULT_RECIPE["score"] == "reconstruction"
    assert got == _select_heads(s, ratio=0.25, **DEFAULT_RECIPE, protect_layers=default_protected(s))
    assert default_protected(s) == (0,) and 0 not in got  # a causal LM keeps its first layer whole
    cost = reconstruction_score(s)
    for layer, heads in got.items():  # the cheapest heads of each layer to refit away go first
        assert cost[layer][heads].max() <= cost[layer].sort().values[len(heads) - 1] + 1e-12
    # an encoder ranks by output variance under the refit (measured better on MiniLM), unprotected
    bert = collect(tiny_model("bert"), [tiny_batch("bert")], progress=False, moments=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _select_heads(bert, ratio=0.25)
    assert got == _select_heads(bert, ratio=0.25, **OUTPUT_RECIPE, protect_layers=[])


def test_named_scores_prune_in_their_natural_order():
    s = make_scores(E)
    assert _select_heads(s, count=1, score="entropy", scope="global") == {0: [1]}  # highest entropy
    assert _select_heads(s, count=1, score="entropy", order="low", scope="global") == {0: [0]}


def test_per_layer_ratio_spreads_the_global_budget_instead_of_flooring_to_zero():
    # 9-head layers (SmolLM2): 10% of a layer floors to 0, but 10% of 4 x 9 heads is 3 heads
    g = torch.Generator().manual_seed(3)
    s = make_scores(torch.rand(4, 9, generator=g))
    sel = select_heads(s, ratio=0.1, scope="per_layer")
    assert sum(map(len, sel.values())) == 3 and all(len(h) == 1 for h in sel.values())
    # the extra units go to the layers whose best remaining head ranks first
    best = sorted(range(4), key=lambda layer: -float(s.entropy[layer].max()))[:3]
    assert sorted(sel) == sorted(best)
    assert all(sel[layer] == [int(s.entropy[layer].argmax())] for layer in sel)
    for r in (0.2, 0.3, 0.5):
        sel = select_heads(s, ratio=r, scope="per_layer")
        sizes = [len(sel.get(layer, [])) for layer in range(4)]
        assert sum(sizes) == int(r * 36 + 1e-9) and max(sizes) - min(sizes) <= 1


def test_pruned_heads_are_kept_and_count_towards_the_budget():
    s = make_scores(E)
    assert select_heads(s, count=3, pruned={0: [0]}) == {0: [0, 1], 1: [0]}
    assert select_heads(s, count=1, pruned={1: [1]}) == {1: [1]}
    with pytest.raises(ValueError, match="pruned: 2 units are already pruned, more than the 1"):
        select_heads(s, count=1, pruned={0: [0, 1]})
    with pytest.raises(ValueError, match="pruned: heads \\[7\\] out of range"):
        select_heads(s, count=2, pruned={0: [7]})
    with pytest.raises(ValueError, match="pruned: layers \\[1\\] are in protect_layers"):
        select_heads(s, count=2, pruned={1: [0]}, protect_layers=[1])
    with pytest.raises(ValueError, match="whole units"):
        select_heads(make_scores(E, kv=[2, 2]), count=2, gqa="group", pruned={0: [0]})
    assert select_heads(make_scores(E, kv=[2, 2]), count=2, gqa="group", pruned={0: [0, 1]}) == {0: [0, 1], 1: [2, 3]}


def test_inert_score_is_sink_plus_spread_of_the_rest():
    s = make_scores(E)
    s.stats[..., 3] = torch.tensor([[0.2, 0.9, 0.5, 0.1], [1.0, 0.0, 0.3, 0.6]]) * 10  # normalised entropy sums
    s.stats[..., 4] = torch.tensor([[0.9, 0.0, 0.5, 0.2], [0.0, 1.0, 0.1, 0.4]]) * 10  # first-key mass sums
    sink, norm = s.stats[..., 4] / 10, s.stats[..., 3] / 10
    torch.testing.assert_close(s.score("inert"), sink + (1 - sink) * norm)
    # 1.0 (uniform rest), 1.0 (all on the sink), then 0.92, 0.9: ties by (layer, head)
    assert rank_heads(s, score="inert", order="high")[:4] == [(1, [0]), (1, [1]), (0, [0]), (0, [1])]
