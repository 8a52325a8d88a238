"""Even and uniform layouts (headprune.ranking.layouts, select_heads(gqa="even"), uniform=True)
on synthetic scores: the KV cache never grows, uniform selections share one layout, and the
heads chosen are the ranking's cheapest."""

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from headprune.prune.slicing import kv_layout
from headprune.ranking import select_heads
from headprune.ranking.layouts import best_layout, even_layouts

from test_ranking import make_scores


def _kv_after(hq, hkv, removed):
    keep = [h for h in range(hq) if h not in set(removed)]
    rows, _ = kv_layout(keep, hq // hkv)
    return len(rows)


def test_even_layouts_of_a_grouped_site():
    layouts = even_layouts(9, 3)
    assert sorted(layouts) == [0, 3, 5, 6, 7, 8, 9]
    assert sorted(layouts[3]) == [(0, 1), (1, 0)]
    assert sorted(even_layouts(9, 3, whole_groups_only=True)) == [0, 3, 6, 9]
    assert sorted(even_layouts(4, 4)) == [0, 1, 2, 3, 4]  # no grouping: every count


def test_best_layout_is_the_cheapest_by_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        costs = [rng.random() for _ in range(9)]
        for r, layouts in even_layouts(9, 3).items():
            got = min(best_layout(costs, 3, g, t) for g, t in layouts)
            brute = min(sum(costs[h] for h in c) for c in itertools.combinations(range(9), r)
                        if _kv_after(9, 3, c) <= 3 and _even(c, 9, 3))
            assert got[0] == pytest.approx(brute)
            assert len(got[1]) == r and _even(got[1], 9, 3)


def _even(removed, hq, hkv):
    size = hq // hkv
    kept = [size - sum(1 for h in removed if h // size == k) for k in range(hkv)]
    return len({k for k in kept if k}) <= 1


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), ratio=st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7]),
       scope=st.sampled_from(["global", "per_layer"]))
def test_even_selection_never_grows_the_kv_cache(seed, ratio, scope):
    g = torch.Generator().manual_seed(seed)
    s = make_scores(torch.rand(5, 9, generator=g, dtype=torch.float64), kv=[3] * 5)
    heads = select_heads(s, ratio=ratio, gqa="even", scope=scope, score="entropy", order="high")
    want = int(ratio * 45 + 1e-9)
    got = sum(map(len, heads.values()))
    assert want - 2 <= got <= want  # layouts change a site's count by 1 to 3 heads
    for site, hs in heads.items():
        assert _even(hs, 9, 3) and _kv_after(9, 3, hs) <= 3 and len(hs) <= 8


def test_even_selection_follows_the_ranking():
    # site 0's heads 0-2 (one whole group) rank first: they go together, the KV head with them
    e = [[0.9, 0.95, 0.99, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3], [0.5] * 9]
    assert select_heads(make_scores(e, kv=[3, 3]), count=3, gqa="even", score="entropy", order="high",
                        scope="global") == {0: [0, 1, 2]}
    # one head per group ranks first: the KV heads stay
    e = [[0.9, 0.1, 0.1, 0.95, 0.1, 0.1, 0.99, 0.1, 0.1], [0.5] * 9]
    assert select_heads(make_scores(e, kv=[3, 3]), count=3, gqa="even", score="entropy", order="high",
                        scope="global") == {0: [0, 3, 6]}
    # without grouping, "even" is "query"
    e = torch.rand(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for count in range(0, 12):
        assert (select_heads(make_scores(e), count=count, gqa="even", score="entropy", order="high", scope="global")
                == select_heads(make_scores(e), count=count, gqa="query", score="entropy", order="high",
                                scope="global"))


@pytest.mark.parametrize("gqa", ["query", "even", "group"])
def test_uniform_selection_has_one_layout(gqa):
    g = torch.Generator().manual_seed(3)
    s = make_scores(torch.rand(6, 9, generator=g, dtype=torch.float64), kv=[3] * 6)
    for ratio in (0.1, 0.3, 0.5):
        heads = select_heads(s, ratio=ratio, gqa=gqa, uniform=True, score="entropy", order="high")
        shapes = set()
        for site in range(6):
            hs = heads.get(site, [])
            kept = tuple(sorted(3 - sum(1 for h in hs if h // 3 == k) for k in range(3)))
            shapes.add(kept)
            assert _even(hs, 9, 3)
            if gqa == "group":
                assert all(k in (0, 3) for k in kept)
        assert len(shapes) == 1
        n = sum(map(len, heads.values()))
        want = int(ratio * 54 + 1e-9)
        layouts = [r for r in even_layouts(9, 3, gqa == "group") if r < 9]
        assert abs(n - want) == min(abs(6 * r - want) for r in layouts)


def test_uniform_without_grouping_takes_each_sites_cheapest():
    e = [[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.6]]
    assert select_heads(make_scores(e), count=2, uniform=True, score="entropy", order="high") == {0: [1], 1: [0]}
    assert select_heads(make_scores(e), count=4, uniform=True, score="entropy", order="high") == {0: [1, 2],
                                                                                                  1: [0, 2]}


def test_uniform_and_even_refusals():
    s = make_scores([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.6]])
    with pytest.raises(ValueError, match="protect_layers: a uniform selection"):
        select_heads(s, count=2, uniform=True, protect_layers=[0])
    with pytest.raises(ValueError, match="pruned: iterative pruning is not supported with uniform"):
        select_heads(s, count=2, uniform=True, pruned={0: [1]})
    with pytest.raises(TypeError, match="protect_layers: expected an iterable of layer indices, got 0"):
        select_heads(s, count=2, uniform=True, protect_layers=0)
    grouped = make_scores(torch.rand(2, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                          kv=[3, 3])
    with pytest.raises(ValueError, match=r"pruned: layer 0 heads \[0, 1\] are not an even layout"):
        select_heads(grouped, count=6, gqa="even", pruned={0: [0, 1]}, score="entropy")
    with pytest.raises(ValueError, match="pruned: 6 heads are already pruned, more than the 3 requested"):
        select_heads(grouped, count=3, gqa="even", pruned={0: [0, 1, 2, 3, 4, 5]}, score="entropy")


@pytest.mark.parametrize("seed", range(5))
def test_even_selection_grows_from_earlier_rounds(seed):
    g = torch.Generator().manual_seed(seed)
    s = make_scores(torch.rand(4, 9, generator=g, dtype=torch.float64), kv=[3] * 4)
    kw = dict(gqa="even", score="entropy", order="high", scope="per_layer")
    first = select_heads(s, count=6, **kw)
    # the second round ranks differently (re-collected statistics): the first round's heads stay
    s2 = make_scores(torch.rand(4, 9, generator=g, dtype=torch.float64), kv=[3] * 4)
    second = select_heads(s2, count=18, pruned=first, **kw)
    assert all(set(hs) <= set(second.get(site, [])) for site, hs in first.items())
    assert 16 <= sum(map(len, second.values())) <= 18
    assert all(_even(hs, 9, 3) for hs in second.values())
    with pytest.raises(TypeError, match="uniform: expected a bool"):
        select_heads(s, count=2, uniform="yes")
    mixed = make_scores([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.6]], kv=[2, 4])
    with pytest.raises(ValueError, match="uniform: the sites have different head layouts"):
        select_heads(mixed, count=2, uniform=True, score="entropy")


def test_a_site_with_every_head_gone_has_one_layout_removing_none():
    """Iterative pruning may empty a layer (min_heads_per_layer=0): the even layouts skip it."""
    from headprune.ranking.layouts import allocate_even

    assert even_layouts(0, 0) == {0: [(0, 0)]} and best_layout([], 0, 0, 0) == (0.0, [])
    chosen = allocate_even([[], [3.0, 0.0, 2.0, 1.0]], [0, 2], [0, 4], 2)
    assert chosen == {1: [1, 3]}  # the cheapest head of each group: 1 (group 0), 3 (group 1)


def test_even_refuses_a_request_of_which_it_can_remove_nothing():
    grouped = make_scores(torch.rand(2, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                          kv=[3, 3])
    # layer 1 alone gives 8 (min_heads_per_layer=1 keeps one): the 9th is refused, as gqa="query" refuses it
    got = select_heads(grouped, count=8, gqa="even", protect_layers=[0], scope="global", score="entropy")
    assert list(got) == [1] and len(got[1]) == 8
    with pytest.raises(ValueError, match="9 heads requested but .* allow at most 8"):
        select_heads(grouped, count=9, gqa="even", protect_layers=[0], scope="global", score="entropy")
    # iterative: the only unprotected layer is already empty, so nothing more can go
    with pytest.raises(ValueError, match="12 heads requested .* allow at most 9"):
        select_heads(grouped, count=12, gqa="even", protect_layers=[0], scope="global", score="entropy",
                     min_heads_per_layer=0, pruned={1: list(range(9))})


def test_even_refuses_more_than_protection_and_the_minimum_allow_as_the_query_path_does():
    """4 layers of 8 heads in 2 groups, the first protected: even layouts remove at most 7 heads
    of a layer (4 + 3), 21 in all. Asked for 28, the selection returned 21 without a word,
    where gqa="query" refused."""
    grouped = make_scores(torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                          kv=[2] * 4)
    for gqa in ("query", "even"):
        with pytest.raises(ValueError, match="28 (units|heads) requested but protect_layers and min_heads_per_layer=1 "
                                             "allow at most 21"):
            select_heads(grouped, count=28, gqa=gqa, protect_layers=[0], scope="global", score="entropy")
    assert sum(map(len, select_heads(grouped, count=21, gqa="even", protect_layers=[0], scope="global",
                                     score="entropy").values())) == 21


def test_uniform_refuses_what_no_layout_can_remove_and_counts_minimum_groups():
    """A uniform request min_heads_per_layer leaves no layout for returned nothing, silently;
    under gqa="group" the minimum counts groups, as without uniform."""
    g = torch.Generator().manual_seed(0)
    mqa = make_scores(torch.rand(3, 4, generator=g, dtype=torch.float64), kv=[1] * 3)
    with pytest.raises(ValueError, match="ratio/count: 12 heads requested, but every uniform layout"):
        select_heads(mqa, ratio=1.0, gqa="group", score="entropy", uniform=True)
    plain = make_scores(torch.rand(3, 4, generator=g, dtype=torch.float64))
    with pytest.raises(ValueError, match="removes none"):
        select_heads(plain, ratio=0.5, score="entropy", min_heads_per_layer=4, uniform=True)
    grouped = make_scores(torch.rand(3, 8, generator=g, dtype=torch.float64), kv=[2] * 3)
    with pytest.raises(ValueError, match="removes none"):  # two groups kept of two: none can go
        select_heads(grouped, ratio=0.5, gqa="group", score="entropy", min_heads_per_layer=2, uniform=True)
    heads = select_heads(grouped, ratio=0.5, gqa="group", score="entropy", min_heads_per_layer=1, uniform=True)
    assert [len(h) for h in heads.values()] == [4, 4, 4]


def test_a_kv_budget_keeps_the_query_head_count_where_a_layout_allows():
    """The smallest group bonus that met the KV budget grew the layouts greedily to 3 of the 4
    heads asked, where a larger bonus removes all 4 and more KV heads."""
    from headprune.ranking.layouts import kv_groups_removed

    s = make_scores(torch.rand(2, 4, generator=torch.Generator().manual_seed(86), dtype=torch.float64), kv=[2, 2])
    args = dict(ratio=0.5, gqa="even", score="entropy", scope="per_layer", min_heads_per_layer=1)
    assert sum(map(len, select_heads(s, **args).values())) == 4
    heads = select_heads(s, kv_ratio=0.05, **args)
    assert sum(map(len, heads.values())) == 4 and kv_groups_removed(heads, [4, 4], [2, 2]) >= 1


def test_selection_arguments_name_themselves():
    """seed=None failed in int(), 1.7 was floored to 1; a layer key "1" failed in
    operator.index; with gqa="even" a forced layer could break min_heads_per_layer."""
    grouped = make_scores(torch.rand(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                          kv=[2] * 4)
    for seed in (None, 1.7, True):
        with pytest.raises(TypeError, match="seed: expected an int"):
            select_heads(grouped, count=2, order="random", seed=seed, score="entropy")
    import numpy

    same = [select_heads(grouped, count=2, order="random", seed=s, score="entropy")
            for s in (3, numpy.int64(3), torch.tensor(3))]
    assert same[0] == same[1] == same[2]
    with pytest.raises(TypeError, match="counts: expected int layer indices, got '1'"):
        select_heads(grouped, counts={"1": 4}, score="entropy")
    with pytest.raises(TypeError, match="pruned: expected int layer indices, got '1'"):
        select_heads(grouped, count=8, pruned={"1": [0, 1]}, score="entropy", protect_layers=[])
    with pytest.raises(ValueError, match=r"pruned: layers \[1\] already have more pruned heads than "
                                         "min_heads_per_layer=1 allows"):
        select_heads(grouped, count=10, gqa="even", pruned={1: list(range(8))}, score="entropy", protect_layers=[])
    # 2 of 8 groups uniformly: 0 or 4 groups are as near; the fewer, none (documented; prune refuses it)
    assert select_heads(grouped, count=2, uniform=True, gqa="group", score="entropy") == {}


def test_even_layouts_falling_short_of_what_the_minimum_allows_round_instead_of_refusing():
    """3 layers of 9 heads in 3 groups, 5 kept per layer: 12 may go, the query path gives 10,
    and the even layouts nearest 10 remove 9 (3 per layer): rounding, warned by prune, not a
    refusal."""
    grouped = make_scores(torch.rand(3, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                          kv=[3] * 3)
    kw = {"count": 10, "min_heads_per_layer": 5, "protect_layers": [], "scope": "global", "score": "entropy"}
    assert sum(map(len, select_heads(grouped, gqa="query", **kw).values())) == 10
    assert sum(map(len, select_heads(grouped, gqa="even", **kw).values())) == 9


def test_even_allocation_fills_the_request_exactly_where_the_growth_stalls():
    """8 heads in 2 groups give layouts of 0, 2, 4, 5, 6 or 7 heads. For 5 heads the growth
    took the cheapest step at each of two sites (2 + 2) and stopped, one short; a layout of 5
    at one site reaches it."""
    from headprune.ranking.layouts import allocate_even

    costs = [0.0, 5.0, 5.0, 5.0] * 2
    chosen = allocate_even([costs, costs], [2, 2], [8, 8], 5)
    assert sum(map(len, chosen.values())) == 5
    assert sum(map(len, allocate_even([costs, costs], [2, 2], [8, 8], 4).values())) == 4  # no stall: as before
    assert sum(map(len, allocate_even([costs, costs], [2, 2], [8, 8], 3).values())) == 2  # 3 has no fill: rounds
    # 9 heads in 3 groups (0, 3, 5, 6, 7 or 8 heads), at most 5 per site: 7 is out of reach, the growth
    # stalled at 5 (one site) and kept it; 3 + 3 is the nearest
    nine = [[0.0, 3.0, 8.0, 1.0, 4.0, 2.0, 16.0, 13.0, 6.0], [14.0, 9.0, 17.0, 12.0, 5.0, 7.0, 10.0, 11.0, 15.0]]
    assert sorted(map(len, allocate_even(nine, [3, 3], [5, 5], 7).values())) == [3, 3]


def _fill_reference(options, start, want):
    """The exact fill as a plain dictionary programme: the first partial total to reach each
    count keeps it on a tie, sites in order and each site's sizes in ``options`` order."""
    best, steps = {0: 0.0}, []
    for opts, first in zip(options, start):
        base = opts[first][0] if first else 0.0
        sizes = [(r, c - base) for r, (c, _, _) in opts.items() if r >= first] + [(0, 0.0)] * (not first)
        grown, back = {}, {}
        for total, cost in best.items():
            for r, c in sizes:
                t = total + r
                if t <= want and (t not in grown or cost + c < grown[t]):
                    grown[t], back[t] = cost + c, (r, total)
        best = grown
        steps.append(back)
    sizes, t = [], want if want in best else max(best)  # the most heads below the request where it is not reached
    for back in reversed(steps):
        r, t = back[t]
        sizes.append(r)
    return sizes[::-1]


def test_exact_fill_is_the_dictionary_programme_with_its_ties():
    """The vectorised fill gives the plain programme's sizes, ties included (rank costs are
    whole numbers, so equal totals are common), with unranked heads, forced heads and caps."""
    import random

    from headprune.ranking.layouts import _exact_fill, _options

    rng = random.Random(5)
    compared = 0
    for _ in range(300):
        sites, kv = rng.randint(1, 6), rng.choice([1, 2, 3, 4])
        hq = kv * rng.randint(1, 4)
        costs = [[float(rng.randint(0, 6)) if rng.random() > 0.1 else math.inf for _ in range(hq)] for _ in range(sites)]
        caps = [rng.randint(0, hq) for _ in range(sites)]
        forced = {}
        for s in range(sites):
            if rng.random() < 0.3:
                opts = _options(costs[s], kv, False, caps[s])
                if opts:
                    forced[s] = rng.choice(list(opts.values()))[1]
        options = [_options(c, kv, False, cap, forced.get(s, ())) for s, (c, cap) in enumerate(zip(costs, caps))]
        if any(not o and s in forced for s, o in enumerate(options)):
            continue
        start = [len(forced.get(s, ())) for s in range(sites)]
        for want in range(sum(start), sum(start) + 6):
            assert _exact_fill(options, start, want) == _fill_reference(options, start, want)
            compared += 1
    assert compared > 1000


def test_a_kv_budget_removes_as_many_query_heads_as_layouts_meeting_it_can():
    """Every group bonus's growth could stop short of the request (8 of 9 heads, 107 of 108 on
    SmolLM2's layout at 40%) although layouts meeting the KV budget removed the whole request."""
    from headprune.ranking.layouts import allocate_kv, kv_groups_removed

    costs = [[0.0, 3.0, 8.0, 1.0, 4.0, 2.0, 14.0, 12.0], [6.0, 13.0, 9.0, 15.0, 11.0, 5.0, 7.0, 10.0]]
    chosen = allocate_kv(costs, [2, 2], [8, 8], 9, 2)  # one group from each site, and one more head
    assert sum(map(len, chosen.values())) == 9 and kv_groups_removed(chosen, [8, 8], [2, 2]) == 2
    rng = random.Random(11)
    for _ in range(150):
        sites, (hq, kv) = rng.randint(1, 4), rng.choice([(8, 2), (9, 3), (6, 3), (4, 1), (12, 4)])
        costs = [[float(rng.randint(0, 20)) for _ in range(hq)] for _ in range(sites)]
        caps = [rng.randint(0, hq) for _ in range(sites)]
        want, kv_want = rng.randint(1, sum(caps) or 1), rng.randint(1, kv * sites)
        reach = {0: 0}  # heads removed -> the most whole groups with them, by brute force over layouts
        for cap in caps:
            sizes = [(r, g) for r, lts in even_layouts(hq, kv).items() for g, _ in lts if r <= cap]
            reach = {t: max(reach[t - r] + g for r, g in sizes if t - r in reach)
                     for t in range(want + 1) if any(t - r in reach for r, _ in sizes)}
        met = [t for t, g in reach.items() if g >= kv_want]
        try:
            chosen = allocate_kv(costs, [kv] * sites, caps, want, kv_want)
        except ValueError:
            assert not met
            continue
        assert sum(map(len, chosen.values())) == max(met)
        assert kv_groups_removed(chosen, [hq] * sites, [kv] * sites) >= kv_want
