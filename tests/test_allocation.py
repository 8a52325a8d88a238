"""Measured allocation: select_heads(counts=), allocate_by_cost against brute force, and
layer_costs / select_measured against masking by hand on tiny models."""

import copy
import itertools

import pytest
import torch

from headprune import select_heads
from headprune.hf import collect, mask_heads
from headprune.hf.allocation import layer_costs, select_measured
from headprune.hf.recover import distillation_loss
from headprune.ranking.allocation import allocate_by_cost

from hf_tiny import tiny_batch, tiny_model
from test_ranking import make_scores


# ---- allocate_by_cost ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_allocate_by_cost_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    sites = 2 + seed % 3
    tables = []
    for _ in range(sites):
        allowed = [k for k in range(1, 6) if torch.rand((), generator=g) < 0.6]
        tables.append({k: float(torch.rand((), generator=g)) * k for k in allowed})
    want = int(torch.randint(0, 4 * sites, (), generator=g))
    got = allocate_by_cost(tables, want)
    options = [[0] + sorted(t) for t in tables]
    totals = {sum(c) for c in itertools.product(*options) if sum(c) <= want}
    reach = max(totals)
    best = min(sum(t.get(k, 0.0) for t, k in zip(tables, c))
               for c in itertools.product(*options) if sum(c) == reach)
    assert sum(got) == reach
    assert all(k == 0 or k in t for t, k in zip(tables, got))
    assert sum(t.get(k, 0.0) for t, k in zip(tables, got)) == pytest.approx(best, abs=1e-12)


def test_allocate_by_cost_refusals():
    with pytest.raises(ValueError, match="want: expected a non-negative int"):
        allocate_by_cost([{1: 0.0}], -1)
    with pytest.raises(ValueError, match="costs: site 0: counts \\[1\\] are negative or cost NaN"):
        allocate_by_cost([{1: float("nan")}], 1)


# ---- select_heads(counts=) -----------------------------------------------------------------


def _scores(sites=4, hq=6, kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_scores(torch.rand(sites, hq, generator=g, dtype=torch.float64), kv=kv)


def test_counts_take_each_layers_best_ranked_heads():
    s = _scores()
    per_layer = select_heads(s, ratio=0.5, score="entropy", scope="per_layer")  # 3 of 6 in every layer
    assert select_heads(s, counts={i: 3 for i in range(4)}, score="entropy") == per_layer
    got = select_heads(s, counts={0: 1, 2: 5}, score="entropy")
    order = [sorted(range(6), key=lambda h: (-float(s.entropy[i, h]), h)) for i in range(4)]
    assert got == {0: sorted(order[0][:1]), 2: sorted(order[2][:5])}


def test_counts_under_even_layouts():
    s = _scores(sites=3, hq=9, kv=[3] * 3)
    got = select_heads(s, counts={0: 3, 1: 5, 2: 6}, score="entropy", gqa="even")
    assert [len(got[i]) for i in range(3)] == [3, 5, 6]
    for hs in got.values():  # every kept group keeps the same number of heads
        kept = [3 - sum(h // 3 == k for h in hs) for k in range(3)]
        assert len({k for k in kept if k}) == 1
    with pytest.raises(ValueError, match="counts: layer 0: no even layout of 9 query heads in 3 KV groups removes 4"):
        select_heads(s, counts={0: 4}, score="entropy", gqa="even")
    with pytest.raises(ValueError, match="counts: layer 0: 4 heads are not whole KV groups of 3"):
        select_heads(s, counts={0: 4}, score="entropy", gqa="group")
    whole = select_heads(s, counts={1: 6}, score="entropy", gqa="group")[1]
    assert len(whole) == 6 and len({h // 3 for h in whole}) == 2  # two whole groups


def test_counts_refusals():
    s = _scores()
    with pytest.raises(ValueError, match="counts: gives every layer's count itself; drop ratio"):
        select_heads(s, counts={0: 1}, ratio=0.3)
    with pytest.raises(ValueError, match=r"counts: layer 4 out of range for 4 layers"):
        select_heads(s, counts={4: 1})
    with pytest.raises(ValueError, match=r"counts: layer 0: expected an int in \[0, 5\]"):
        select_heads(s, counts={0: 6})
    with pytest.raises(ValueError, match=r"counts: layer 0: expected an int in \[0, 6\]"):
        select_heads(s, counts={0: 1.0}, min_heads_per_layer=0)
    with pytest.raises(ValueError, match=r"counts: layers \[1\] are protected"):
        select_heads(s, counts={1: 2}, score="entropy", protect_layers=[1])
    with pytest.raises(TypeError, match="counts: expected a dict"):
        select_heads(s, counts=[1, 2])


# ---- layer_costs / select_measured on tiny models ------------------------------------------


@pytest.fixture(scope="module", params=["llama", "bert"])
def tiny(request):
    model = tiny_model(request.param)
    batches = [tiny_batch(request.param, seed=i) for i in range(3)]
    scores = collect(model, batches, moments=True, progress=False)
    return request.param, model, batches, scores


def _five_sequence_loss(model, batches):
    """``loss(site, heads)``: by hand, what layer_costs(..., sequences=5) measures: the
    distillation loss over the first 5 sequences (3 + 2) with only ``heads`` of ``site`` masked,
    refit from the moments of the other 4 alone (each refit leaves out the sequences measured on)."""
    teacher = copy.deepcopy(model)
    first = {k: v[:3] for k, v in batches[0].items()}
    second = {k: v[:2] for k, v in batches[1].items()}
    rest = collect(model, [{k: v[2:] for k, v in batches[1].items()}, batches[2]], moments=True, progress=False)

    def loss(site, heads):
        with mask_heads(model, {site: heads}, reconstruct=rest), torch.no_grad():
            both = 3 * distillation_loss(model, teacher, first) + 2 * distillation_loss(model, teacher, second)
            return float(both / 5)

    return loss


def _count_measurements(monkeypatch) -> list:
    """The ``choose`` of every layer_costs call from now on."""
    import headprune.hf.allocation as A

    calls, real = [], A.layer_costs
    monkeypatch.setattr(A, "layer_costs", lambda *a, **k: calls.append(k.get("choose")) or real(*a, **k))
    return calls


def test_layer_costs_are_the_distillation_loss_of_each_mask_alone(tiny):
    kind, model, batches, scores = tiny
    before = copy.deepcopy(model.state_dict())
    costs = layer_costs(model, batches, scores, sequences=5, choose="ranking")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    assert costs.sequences == 5 and costs.options["choose"] == "ranking"
    loss = _five_sequence_loss(model, batches)
    measured = 0
    for site, table in enumerate(costs.costs):
        assert set(table) == set(costs.heads[site])
        for k, cost in table.items():
            heads = costs.heads[site][k]
            assert len(heads) == k
            assert heads == select_heads(scores, counts={site: k})[site]
            assert cost == pytest.approx(loss(site, heads), rel=1e-5, abs=1e-7)
            assert cost >= -1e-7
            measured += 1
    assert measured > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_select_measured_takes_the_cheapest_counts(tiny):
    kind, model, batches, scores = tiny
    costs = layer_costs(model, batches, scores, sequences=4, choose="ranking")
    total = sum(scores.num_heads)
    for ratio in (0.25, 0.5):
        heads, again = select_measured(model, batches, scores, ratio=ratio, costs=costs)
        assert again is costs
        counts = [len(heads.get(i, [])) for i in range(scores.num_sites)]
        assert counts == allocate_by_cost(costs.costs, int(ratio * total))
        assert heads == select_heads(scores, counts={i: k for i, k in enumerate(counts) if k})
    with pytest.raises(ValueError, match="costs: measured with"):
        select_measured(model, batches, scores, ratio=0.25, costs=costs, min_heads_per_layer=0)
    for other, named in [({"damping": 1e3}, "damping=0.01, not with damping=1000.0"),
                         ({"score": "entropy", "order": "high"}, "score=None, order=None.*, not with score='entropy', "
                                                                 "order='high'.*"),
                         ({"protect_layers": [1]}, "protect_layers=\\[[0]?\\], not with protect_layers=\\[1\\]")]:
        with pytest.raises(ValueError, match=f"costs: measured with {named}; measure again"):
            select_measured(model, batches, scores, ratio=0.25, costs=costs, **other)
    select_measured(model, batches, scores, ratio=0.25, costs=costs, seed=3)  # the seed orders random heads only
    if kind == "bert":
        with pytest.raises(ValueError, match="choose='greedy'"):
            select_measured(model, batches, scores, ratio=0.25, costs=costs, choose="greedy")


def test_greedy_choice_adds_the_cheapest_measured_head(tiny):
    """choose="greedy": each count's heads are the previous count's plus the head whose removal
    with them measured cheapest, and its cost is that measurement (checked by brute force)."""
    kind, model, batches, scores = tiny
    default = layer_costs(model, batches, scores, sequences=5)
    if kind == "llama":  # grouped queries: units of several heads, ranked
        assert default.options["choose"] == "ranking"
        with pytest.raises(ValueError, match="choose: 'greedy' removes one head at a time"):
            layer_costs(model, batches, scores, sequences=5, choose="greedy")
        return
    assert default.options["choose"] == "greedy"
    assert layer_costs(model, batches, scores, sequences=5, score="variance").options["choose"] == "ranking"
    with pytest.raises(ValueError, match="choose: expected one of ranking, greedy, got 'best'"):
        layer_costs(model, batches, scores, choose="best")
    loss = _five_sequence_loss(model, batches)
    for site, table in enumerate(default.costs):
        assert sorted(table) == list(range(1, scores.num_heads[site]))  # every count but the last head
        chosen = []
        for k in sorted(table):
            tried = {h: loss(site, sorted(chosen + [h])) for h in range(scores.num_heads[site]) if h not in chosen}
            best = min(tried.values())
            picked = set(default.heads[site][k]) - set(chosen)
            assert len(picked) == 1 and set(chosen) < set(default.heads[site][k])
            assert tried[picked.pop()] == pytest.approx(best, rel=1e-5, abs=1e-7)
            assert table[k] == pytest.approx(best, rel=1e-5, abs=1e-7)
            chosen = default.heads[site][k]
    heads, again = select_measured(model, batches, scores, ratio=0.5, costs=default, choose="greedy")
    counts = [len(heads.get(i, [])) for i in range(scores.num_sites)]
    assert counts == allocate_by_cost(default.costs, sum(scores.num_heads) // 2)
    assert heads == {i: default.heads[i][k] for i, k in enumerate(counts) if k}



def test_greedy_choice_on_a_pruned_model_names_its_heads_by_original_id():
    """It measured positions 0.. and returned them as head ids, which a pruned model no longer
    has (or are other heads): a second prune of a pruned encoder failed."""
    from headprune.hf import kept_heads, prune_heads

    model = tiny_model("bert")
    prune_heads(model, {0: [0, 3], 1: [1, 3]})
    batches = [tiny_batch("bert", seed=i) for i in range(3)]
    scores = collect(model, batches, moments=True, progress=False)
    costs = layer_costs(model, batches, scores, sequences=5)
    kept = kept_heads(model)
    assert costs.options["choose"] == "greedy" and kept == {0: [1, 2], 1: [0, 2]}
    assert all(set(hs) <= set(kept[site]) for site, table in enumerate(costs.heads) for hs in table.values())
    heads, _ = select_measured(model, batches, scores, count=2, costs=costs)
    prune_heads(model, heads)  # original ids: accepted
    assert kept_heads(model) == {s: [h for h in kept[s] if h not in heads.get(s, [])] for s in range(2)}

def test_layer_costs_refusals(tiny):
    kind, model, batches, scores = tiny
    plain = collect(model, batches, progress=False)
    with pytest.raises(ValueError, match="scores: measured allocation refits .* needs second moments"):
        layer_costs(model, batches, plain)
    with pytest.raises(ValueError, match="sequences: expected a positive int"):
        layer_costs(model, batches, scores, sequences=0)
    with pytest.raises(ValueError, match="gqa: expected one of"):
        layer_costs(model, batches, scores, gqa="kv")
    with pytest.raises(ValueError, match="sequences: 9 of the 9 calibration sequences would leave none"):
        layer_costs(model, batches, scores, sequences=9)  # every sequence: no refit left to measure
    assert layer_costs(model, batches, scores).sequences == 2  # a quarter of 9 by default


def test_prune_commands_default_scope(tiny):
    from argparse import Namespace

    from headprune.app.prune_checks import with_scope as _with_scope

    kind, model, batches, scores = tiny
    args = Namespace(steps=1, distributed=False)
    default = "measured" if kind == "bert" else None  # encoders with the refit; causal LMs keep per_layer
    assert _with_scope(args, {"gqa": "even"}, scores, "refit").get("scope") == default
    assert _with_scope(args, {"gqa": "even"}, scores, "mean").get("scope") is None
    assert _with_scope(Namespace(steps=2, distributed=False), {}, scores, "refit").get("scope") is None
    assert _with_scope(args, {"uniform": True}, scores, "refit").get("scope") is None
    assert _with_scope(args, {"scope": "per_layer"}, scores, "refit")["scope"] == "per_layer"
    assert _with_scope(args, {"scope": "measured"}, scores, "refit")["scope"] == "measured"
    ranks = Namespace(steps=1, distributed=True)  # the writing rank measures on every batch, as one process
    assert _with_scope(ranks, {}, scores, "refit").get("scope") == default
    assert _with_scope(ranks, {"scope": "measured"}, scores, "refit")["scope"] == "measured"


def test_recipe_text_says_how_the_heads_were_chosen():
    from headprune.app.recipe_text import describe_recipe

    greedy = "query heads removed one at a time within each layer"
    assert describe_recipe({"scope": "measured"}, "refit", grouped=False).startswith(greedy)
    for select, kw in [({"scope": "measured", "choose": "ranking"}, {"grouped": False}),
                       ({"scope": "measured", "score": "variance"}, {"grouped": False}),
                       ({"scope": "measured"}, {"grouped": True}),
                       ({"scope": "measured"}, {"grouped": False, "sequential": True}),
                       ({"scope": "per_layer"}, {"grouped": False})]:
        text = describe_recipe(select, "refit", **kw)
        assert greedy not in text and text.startswith("query heads ranked by"), (select, kw, text)
    # a uniform layout takes each layer's own cheapest heads: --scope global said "over the whole model"
    text = describe_recipe({"scope": "global", "uniform": True}, "refit", grouped=False)
    assert "within each layer" in text and "over the whole model" not in text, text
    assert "over the whole model" in describe_recipe({"scope": "global"}, "refit", grouped=False)


def test_recipe_text_says_no_refit_ran_where_the_ranking_prices_one():
    """``--no-reconstruct`` keeps the reconstruction ranking and removes by mean compensation: the
    text says the refit that priced the heads did not run."""
    from headprune.app.recipe_text import describe_recipe

    refit = describe_recipe({"score": "reconstruction"}, "refit", causal=True, grouped=True)
    assert "what the least-squares refit cannot recover" in refit and "no refit applied" not in refit
    for removal in ("mean", "zero"):
        text = describe_recipe({"score": "reconstruction"}, removal, causal=True, grouped=True)
        assert "would not recover (greedy structured OBS; no refit applied)" in text, text
        assert "cannot recover" not in text and "refit by least squares" not in text, text


def test_sweep_measures_once_for_recipes_that_measure_alike(tiny, monkeypatch):
    """The sweep shares one layer-cost measurement between recipes whose measurement is the
    same (the default and its measured allocation; ranked heads where greedy is not possible)."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    kind, model, batches, scores = tiny
    calls = _count_measurements(monkeypatch)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0, "fidelity": 1.0})
    recipes = {"default": {"scope": "measured"}, "again": {"scope": "measured"},
               "ranked": {"scope": "measured", "choose": "ranking"}}
    config = S.SweepConfig(model="tiny", ratios=[0.25, 0.5], seeds=0, quiet=True, eval_windows=1)
    loaded = Loaded(model, None, "causal" if kind == "llama" else "encoder", "tiny")
    res = S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes, batches=batches)
    # grouped queries (llama): every recipe ranks, one measurement; bert: greedy and ranked
    assert len(calls) == (1 if kind == "llama" else 2)
    assert res["heads"]["default"] == res["heads"]["again"]
    assert set(res["measured_allocation"]) == set(recipes)


def test_a_sweep_measures_again_where_a_shared_cache_holds_other_settings(tiny, monkeypatch):
    """``run_sweep(measured=)`` keeps layer costs by recipe name for later sweeps: a later sweep
    of another damping measures again instead of taking the earlier damping's costs."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    kind, model, batches, scores = tiny
    calls = _count_measurements(monkeypatch)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0, "fidelity": 1.0})
    loaded = Loaded(model, None, "causal" if kind == "llama" else "encoder", "tiny")

    def sweep(damping, measured):
        config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=0, quiet=True, eval_windows=1, damping=damping)
        return S.run_sweep(config, loaded, scores, [], {"data": "x"}, {"m": {"scope": "measured"}},
                           batches=batches, measured=measured)["heads"]["m"]

    shared = {}
    sweep(1e-4, shared)
    again = sweep(1e4, shared)
    assert len(calls) == 2 and again == sweep(1e4, None)
    sweep(1e4, shared)  # the same settings: taken from the cache
    assert len(calls) == 3


def test_sweep_measures_the_ranked_heads_for_sequential_recipes(tiny, monkeypatch):
    """A sweep recipe with a measured allocation and sequential calibration measures the
    ranking's heads, as `prune --sequential` does (the sequential pass re-ranks them)."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    kind, model, batches, scores = tiny
    if kind != "bert":
        pytest.skip("grouped queries rank in any case")
    calls = _count_measurements(monkeypatch)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0, "fidelity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.25], seeds=0, quiet=True, eval_windows=1)
    recipes = {"measured, sequential": {"scope": "measured", "sequential": True}, "measured": {"scope": "measured"}}
    S.run_sweep(config, Loaded(model, None, "encoder", "tiny"), scores, [], {"data": "x"}, recipes, batches=batches)
    assert calls == ["ranking", None]


@pytest.mark.parametrize("sequential", [False, True])
def test_prune_measures_the_ranked_heads_when_sequential_re_ranks_them(tiny, monkeypatch, sequential):
    """`headprune prune --sequential` re-chooses each layer's heads by the ranking, so its
    measured allocation measures the ranking's heads (greedy ones would be thrown away)."""
    from argparse import Namespace

    import headprune.app.prune_command as P

    kind, model, batches, scores = tiny
    if kind != "bert":
        pytest.skip("grouped queries rank in any case")
    calls = _count_measurements(monkeypatch)
    monkeypatch.setattr(P, "_sequential", lambda args, loaded, batches, scores, heads: (heads, scores))
    args = Namespace(steps=1, ratio=0.25, count=None, damping=0.01, quiet=True, sequential=sequential, gqa="even")
    loaded = Namespace(model=model)
    heads, _ = P._select(args, loaded, batches, scores, {"scope": "measured", "gqa": "even"}, "refit")
    assert calls == (["ranking"] if sequential else [None])
    assert sum(map(len, heads.values())) == sum(scores.num_heads) // 4


def test_measured_allocation_of_an_image_model():
    model = tiny_model("vit")
    batches = [tiny_batch("vit", seed=s) for s in range(3)]
    scores = collect(model, batches, moments=True, progress=False)
    costs = layer_costs(model, batches, scores, sequences=2, choose="ranking", protect_layers=[])
    with torch.no_grad():
        positions = model(**batches[0]).last_hidden_state.shape[1]  # the patches and the class token
    assert costs.sequences == 2 and costs.tokens == 2 * positions
    heads, _ = select_measured(model, batches, scores, ratio=0.25, costs=costs)
    assert sum(map(len, heads.values())) == sum(scores.num_heads) // 4


@pytest.mark.parametrize("quiet", [True, False])
def test_a_sweeps_measurement_has_a_progress_bar_unless_quiet(tiny, monkeypatch, capsys, quiet):
    """A sweep of an encoder measured for minutes behind a bar that counted recipes only."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    kind, model, batches, scores = tiny
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0, "fidelity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.25], seeds=0, quiet=quiet, eval_windows=1)
    kind = "causal" if kind == "llama" else "encoder"
    S.run_sweep(config, Loaded(model, None, kind, "tiny"), scores, [], {"data": "x"}, {"m": {"scope": "measured"}},
                batches=batches)
    assert ("headprune: measuring layer costs" in capsys.readouterr().err) != quiet
