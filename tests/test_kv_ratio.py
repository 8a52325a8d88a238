"""--kv-ratio / select_heads(kv_ratio=): even layouts that remove at least a fraction of the
KV heads, chosen by the least bonus per whole group that reaches it."""

import pytest
import torch

from headprune import select_heads
from headprune.ranking.layouts import allocate_even, allocate_kv, kv_groups_removed

from test_ranking import make_scores


def _scores(sites=6, hq=9, hkv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_scores(torch.rand(sites, hq, generator=g, dtype=torch.float64), kv=[hkv] * sites)


@pytest.mark.parametrize("kv", [0.1, 0.25])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_kv_ratio_removes_at_least_that_many_kv_heads(ratio, kv):
    s = _scores()
    plain = select_heads(s, ratio=ratio, score="entropy", gqa="even")
    got = select_heads(s, ratio=ratio, score="entropy", gqa="even", kv_ratio=kv)
    assert sum(map(len, got.values())) == sum(map(len, plain.values()))  # the same number of query heads
    assert kv_groups_removed(got, s.num_heads, s.num_kv_heads) >= -(-kv * 18 // 1)
    for hs in got.values():  # even layouts: every kept group keeps the same number of heads
        kept = [3 - sum(h // 3 == k for h in hs) for k in range(3)]
        assert len({k for k in kept if k}) <= 1


def test_kv_ratio_zero_or_reached_is_the_plain_even_selection():
    s = _scores()
    plain = select_heads(s, ratio=0.3, score="entropy", gqa="even")
    have = kv_groups_removed(plain, s.num_heads, s.num_kv_heads)
    assert select_heads(s, ratio=0.3, score="entropy", gqa="even", kv_ratio=0.0) == plain
    assert select_heads(s, ratio=0.3, score="entropy", gqa="even", kv_ratio=have / 18) == plain


def test_allocate_kv_takes_the_cheapest_groups_by_the_ranking():
    # two sites of 4 heads in 2 groups; one head each to take, and one whole group wanted
    costs = [[0.0, 5.0, 1.0, 9.0], [1.5, 3.0, 7.0, 8.0]]
    assert allocate_even(costs, [2, 2], [2, 2], 2) == {0: [0, 2]}  # one head from each group: no KV head goes
    got = allocate_kv(costs, [2, 2], [2, 2], 2, 1)
    assert got == {1: [0, 1]}  # the cheapest whole group (1.5 + 3 against 0 + 5)
    assert kv_groups_removed(got, [4, 4], [2, 2]) == 1
    with pytest.raises(ValueError, match="kv_ratio: 3 KV heads requested but at most 1"):
        allocate_kv(costs, [2, 2], [2, 2], 2, 3)



def test_allocate_kv_growth_never_gives_back_a_whole_group():
    # two sites of 8 heads in 4 groups, at most 5 heads each, 7 wanted and 3 whole groups: the
    # growth took 2 whole groups at the second site, then filled the last head by turning them
    # into one group and one head of each other (5 heads), and the request was refused
    costs = [[21.0, 9.0, 19.0, 7.0, 1.0, 13.0, 5.0, 16.0], [6.0, 17.0, 2.0, 0.0, 8.0, 23.0, 4.0, 14.0]]
    got = allocate_kv(costs, [4, 4], [5, 5], 7, 3)
    assert kv_groups_removed(got, [8, 8], [4, 4]) >= 3
    assert sum(map(len, got.values())) <= 7
    assert allocate_even(costs, [4, 4], [5, 5], 7) == allocate_kv(costs, [4, 4], [5, 5], 7, 0)  # no bonus: unchanged

def test_kv_ratio_refusals():
    s = _scores()
    with pytest.raises(ValueError, match="kv_ratio: 9 KV heads requested but at most 5 go with 16 query heads .*; "
                                         r"remove more query heads \(a larger ratio or count\) or lower kv_ratio"):
        select_heads(s, ratio=0.3, score="entropy", gqa="even", kv_ratio=0.5)  # 16 heads hold 5 groups of 3
    for kw, match in [({"gqa": "group"}, "needs gqa='even'"), ({"gqa": "query"}, "needs gqa='even'"),
                      ({"gqa": "even", "uniform": True}, "without uniform")]:
        with pytest.raises(ValueError, match=match):
            select_heads(s, ratio=0.3, score="entropy", kv_ratio=0.25, **kw)
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="kv_ratio: expected a fraction"):
            select_heads(s, ratio=0.3, score="entropy", gqa="even", kv_ratio=bad)
    mha = _scores(hkv=9)
    with pytest.raises(ValueError, match="no grouped queries"):
        select_heads(mha, ratio=0.3, score="entropy", gqa="even", kv_ratio=0.25)


def test_the_command_line_reads_a_kv_share_of_zero_as_none():
    """--kv-ratio 0 passed the option's checks as "not given" but reached the selection as a
    share: an encoder's measured allocation became per layer, and --gqa query failed after the
    collection with the library's argument names."""
    from headprune.app.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["prune", "m", "--ratio", "0.3", "--kv-ratio", "0"]).kv_ratio is None
    assert parser.parse_args(["prune", "m", "--ratio", "0.3", "--kv-ratio", "0.25"]).kv_ratio == 0.25
    from hf_tiny import tiny_batch, tiny_model

    from headprune.hf import collect
    from headprune.ranking import default_allocation

    encoder = collect(tiny_model("bert"), [tiny_batch("bert")], progress=False, moments=True)
    assert default_allocation(encoder, "refit", kv_ratio=0.0) == default_allocation(encoder, "refit") == "measured"
