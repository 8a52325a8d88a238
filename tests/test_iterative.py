"""headprune.hf.select_iteratively: re-collection between pruning rounds."""

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model
from model_snapshot import ModelSnapshot

from headprune import select_heads
from headprune.hf import collect, mask_heads, prune_heads, select_iteratively


def _setup(family="llama", layers=3):
    model = tiny_model(family, num_hidden_layers=layers)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    return model, batches


def test_one_step_is_one_shot_selection():
    model, batches = _setup()
    heads, scores = select_iteratively(model, batches, steps=1, ratio=0.5)
    assert heads == select_heads(collect(model, batches, progress=False, moments=True), ratio=0.5)


@pytest.mark.parametrize("kw", [dict(ratio=0.5), dict(count=5, scope="global", score="entropy", order="high", gqa="query"),
                                dict(ratio=0.5, scope="per_layer", gqa="group", protect_layers=[])])
def test_rounds_equal_the_manual_procedure_and_leave_the_model_unchanged(kw):
    model, batches = _setup()
    snap = ModelSnapshot(model)
    seen = []
    heads, last = select_iteratively(model, batches, steps=3, on_step=lambda i, s, h: seen.append((i, s, dict(h))), **kw)
    assert snap.differences() == []
    # by hand: collect, select a third, mask it, collect again, ...
    handles, chosen = [], {}
    try:
        for step in (1, 2, 3):
            # the default recipe (and the reconstruction score) needs the second moments
            scores = collect(model, batches, progress=False, moments=kw.get("score") is None)
            torch.testing.assert_close(scores.stats, seen[step - 1][1].stats, rtol=0, atol=0)
            part = dict(kw)
            if "ratio" in part:
                part["ratio"] = kw["ratio"] * step / 3
            else:
                part["count"] = kw["count"] * step // 3
            new = select_heads(scores, pruned=chosen, **part)
            assert new == seen[step - 1][2]
            added = {l: [h for h in hs if h not in chosen.get(l, [])] for l, hs in new.items()}
            added = {l: hs for l, hs in added.items() if hs}
            chosen = new
            if step < 3 and added:
                handles.append(mask_heads(model, added))
    finally:
        for h in reversed(handles):
            h.restore()
    assert heads == chosen and snap.differences() == []
    assert all(set(seen[0][2].get(l, [])) <= set(heads.get(l, [])) for l in seen[0][2])
    # re-collection under masks sees a different model: later statistics differ
    assert not torch.equal(seen[0][1].stats, last.stats)


def test_bad_steps_and_failures_restore_the_model():
    model, batches = _setup()
    with pytest.raises(ValueError, match="steps: expected a positive int or .auto."):
        select_iteratively(model, batches, steps=0, ratio=0.5)
    with pytest.raises(TypeError, match="pass a list"):
        select_iteratively(model, iter(batches), steps=2, ratio=0.5)
    with pytest.raises(ValueError, match="ratio: expected a number in"):
        select_iteratively(model, batches, steps=2, ratio=2.0)
    # statistics without second moments ranked round 1 by another recipe than the rounds after it
    with pytest.raises(ValueError, match="scores: have no second moments, which the refit and the default ranking"):
        select_iteratively(model, batches, steps=2, ratio=0.5, scores=collect(model, batches, progress=False))
    snap = ModelSnapshot(model)

    def boom(step, scores, heads):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        select_iteratively(model, batches, steps=3, ratio=0.5, on_step=boom)
    assert snap.differences() == []


def test_auto_steps_prune_at_most_a_tenth_per_round():
    from headprune.hf import auto_steps

    assert [auto_steps(u, 100) for u in (0, 1, 10, 11, 30, 50)] == [1, 1, 1, 2, 3, 5]
    model, batches = _setup(layers=5)  # 20 heads: 50% = 10 units, 5 rounds of 2
    seen = []
    select_iteratively(model, batches, ratio=0.5, on_step=lambda i, s, h: seen.append(sum(map(len, h.values()))))
    assert seen == [2, 4, 6, 8, 10]


def test_kv_ratio_over_rounds_is_refused_and_one_round_keeps_it(monkeypatch):
    """A round's share of the query heads cannot hold the whole KV share: refused by name (it
    failed in the first round's allocation, after a collection), before any collection when
    the rounds are given; one round (steps=1, or "auto" at a small ratio) is one-shot selection."""
    model, batches = _setup(layers=4)  # tiny llama: 4 query heads, 2 KV heads per layer
    scores = collect(model, batches, moments=True)
    calls = []
    monkeypatch.setattr("headprune.hf.iterative.collect", lambda *a, **k: calls.append(1) or scores)
    for steps in (2, "auto"):
        with pytest.raises(ValueError, match=r"kv_ratio: applies to one selection, not to [25] rounds; pass steps=1"):
            select_iteratively(model, batches, steps=steps, ratio=0.5, kv_ratio=0.25, gqa="even")
    assert len(calls) == 1  # only "auto", which needs the statistics to count its rounds
    want = select_heads(scores, ratio=0.5, kv_ratio=0.25, gqa="even")
    assert select_iteratively(model, batches, steps=1, ratio=0.5, kv_ratio=0.25, gqa="even")[0] == want
    # a uniform layout likewise (it collected and selected a round, then failed in the second)
    calls.clear()
    with pytest.raises(ValueError, match=r"^uniform: one layout for every layer is chosen in one selection, not in 2"):
        select_iteratively(model, batches, steps=2, ratio=0.5, uniform=True)
    assert not calls


def test_sweep_iterative_recipes_nest_and_start_like_one_shot(monkeypatch):
    import headprune.app.sweep as S
    from headprune.app.load import Loaded
    from headprune.app.sweep import SweepConfig, run_sweep

    model, batches = _setup(layers=4)
    scores = collect(model, batches, progress=False)
    recipes = {"one": {"score": "entropy", "order": "high"}, "it": {"score": "entropy", "order": "high", "iterative": True}}
    args = SweepConfig(model="tiny", ratios=[0.25, 0.5, 0.75], seeds=1, gqa="query", quiet=True, eval_windows=1,
                       removal="mean")
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})  # the selections are under test
    loaded = Loaded(model, None, "causal", "tiny")
    snap = ModelSnapshot(model)
    res = run_sweep(args, loaded, scores, [], {"data": "x"}, recipes, batches=batches)
    assert snap.differences() == []
    it, one = res["heads"]["it"], res["heads"]["one"]
    assert it[0] == one[0]
    for a, b in zip(it, it[1:]):
        assert all(set(a[l]) <= set(b.get(l, [])) for l in a)
    assert [sum(map(len, h.values())) for h in it] == [4, 8, 12]
    with pytest.raises(ValueError, match="needs the calibration batches"):
        run_sweep(args, loaded, scores, [], {"data": "x"}, recipes)


def test_a_plain_torch_model_is_selected_iteratively_without_second_moments():
    """The default score asked every round's collection for second moments, which a plain
    torch model cannot give (refused): its default is the fallback recipe, as in one round."""
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    batches = [torch.randn(2, 6, 32) for _ in range(2)]
    heads, _ = select_iteratively(model, batches, steps=2, ratio=0.5, progress=False)
    assert sum(map(len, heads.values())) == 4


def test_moments_collected_under_a_mask_are_checked_against_the_weights_before_it():
    """Moments of another model were accepted when that model had a head masked while they were
    collected (the projection check skipped masked sites); the same model's, once its mask is
    restored, are its own."""
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    batches = [tiny_batch("llama")]
    with mask_heads(other, {0: [1]}, reconstruct=collect(other, batches, moments=True, progress=False)):
        theirs = collect(other, batches, moments=True, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for remove in (mask_heads, prune_heads):
        with pytest.raises(ValueError, match=r"^reconstruct: site 0's output projection differs from the one the "
                                             r"scores were collected with"):
            remove(model, {0: [1, 2]}, reconstruct=theirs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with mask_heads(model, {0: [1]}, reconstruct=collect(model, batches, moments=True, progress=False)):
        ours = collect(model, batches, moments=True, progress=False)
    prune_heads(model, {0: [1, 2]}, reconstruct=ours)  # restored: the weights it was collected under the mask of


def test_even_rounds_keep_the_final_budget_in_reach():
    """A round's share of an even-layout budget could take a layout (3 of a layer's 4 heads: one
    whole KV group and one head of the other) that no later round completes in another layer, so
    4 rounds removed 3 heads where one shot removes 4, all in one layer (a per-layer spread of 3/0
    against 2/2); a round now takes the largest selection that keeps the final budget in reach."""
    model = tiny_model("llama", num_hidden_layers=2)  # 4 query heads over 2 KV heads per layer
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    scores = collect(model, batches, moments=True, progress=False)
    one = select_heads(scores, count=4, protect_layers=[])
    rounds = []
    heads, _ = select_iteratively(model, batches, steps=4, count=4, protect_layers=[], removal="refit", scores=scores,
                                  on_step=lambda i, s, h: rounds.append({k: list(v) for k, v in h.items()}))
    assert sum(map(len, heads.values())) == sum(map(len, one.values())) == 4
    assert sorted(map(len, heads.values())) == [2, 2]
    for before, after in zip(rounds, rounds[1:]):  # the rounds nest
        assert all(set(v) <= set(after.get(k, [])) for k, v in before.items())


@pytest.mark.parametrize("kw, said", [(dict(ratio=2.0), "ratio: expected a number in \\[0, 1\\], got 2.0"),
                                      (dict(ratio=0.5, count=2), "ratio, count: give exactly one of them"),
                                      (dict(count=-1), "count: expected a non-negative int, got -1")])
def test_a_budget_is_refused_before_the_first_collection(kw, said):
    """A ratio of 2 or a ratio with a count was refused only after a whole collection."""
    model, batches = _setup()

    def refused(*a, **k):
        raise AssertionError("collected before refusing the budget")

    with pytest.raises(ValueError, match=said):
        select_iteratively(model, batches, steps=2, collect_fn=refused, **kw)


def test_a_round_that_chose_no_head_more_is_not_collected_again():
    """Under even layouts a round's share can round to no new layout (4 query heads over 2 KV
    heads: a round of 10% takes none); the next round collected again on the same model, a whole
    collection that gave the same sums."""
    model, batches = _setup()
    calls, seen = [], []

    def counting(*a, **kw):
        calls.append(1)
        return collect(*a, **kw)

    heads, _ = select_iteratively(model, batches, steps="auto", ratio=0.4, gqa="even", collect_fn=counting,
                                  on_step=lambda i, s, h: seen.append(sum(map(len, h.values()))))
    assert seen == [0, 2, 2, 4] and len(calls) == 2  # collected for rounds 1 and 3 only
    # statistics given by the caller rank round 1 only: round 2 collects whatever round 1 chose
    given = collect(model, [tiny_batch("llama", seed=7)], progress=False, moments=True)
    calls.clear()
    select_iteratively(model, batches, steps="auto", ratio=0.4, gqa="even", collect_fn=counting, scores=given)
    assert len(calls) == 2  # rounds 2 and 3
    calls.clear()  # unless they are the rounds' own first collection (prune --steps passes its collection)
    own = collect(model, batches, progress=False, moments=True)
    again = select_iteratively(model, batches, steps="auto", ratio=0.4, gqa="even", collect_fn=counting, scores=own,
                               fresh=True)
    assert len(calls) == 1 and again[0] == heads  # round 3 only, and the heads of the rounds' own collection
    with pytest.raises(ValueError, match=r"^fresh: expected a bool, True only with scores, got True"):
        select_iteratively(model, batches, steps=2, ratio=0.4, fresh=True)


def test_the_heatmap_says_when_rounds_or_a_second_pass_chose_the_heads():
    """With --steps or --sequential, the heatmap's selection panel showed the first collection's
    values (the unpruned model's) as "the score that chose the heads"; later rounds, and the
    layer-by-layer pass, chose on other statistics."""
    from headprune.app.selection_panel import selection_label

    model, batches = _setup()
    scores = collect(model, batches, progress=False, moments=True)
    assert selection_label(scores, {"scope": "per_layer", "steps": 1}).endswith("(the score that chose the heads)")
    assert selection_label(scores, {"scope": "per_layer", "steps": 3}).endswith(
        "of round 1 of 3 (for reference: later rounds ranked the model with the earlier rounds' heads removed)")
    assert selection_label(scores, {"scope": "per_layer", "steps": 1, "sequential": True}).endswith(
        "(for reference: --sequential chose each layer's heads again on the pruned layers' outputs)")
