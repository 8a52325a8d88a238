"""Sequential calibration in one pass (``calibrate_sequentially(..., ratio=)``): each layer's
count decided when the pass reaches it, its statistics collected on the inputs that reach it
with the layers before it pruned and refit, in place of a one-shot collection."""

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model
from model_snapshot import ModelSnapshot

from headprune.hf import collect, mask_heads
from headprune.hf.sequential import calibrate_sequentially
from headprune.ranking.allocation import RunningShares


def _layout(**config):
    from headprune.hf.collection import Collection

    return Collection(tiny_model("llama", **config), "qk").scores()


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_each_layers_statistics_are_those_of_the_layers_before_it_pruned(family):
    model = tiny_model(family, num_hidden_layers=3)
    # batches of other sizes and padding: each batch's own padding decides the rows counted
    batches = [tiny_batch(family, seed=0), tiny_batch(family, batch=2, seq=7, seed=1), tiny_batch(family, seed=2)]
    batches[1]["attention_mask"][0, 4:] = 0
    snap = ModelSnapshot(model)
    heads, seq = calibrate_sequentially(model, batches, ratio=0.5, gqa="query")
    assert snap.differences() == []
    one = collect(model, batches, progress=False, moments=True)
    first = min(heads)
    for i in range(first + 1):  # up to the first pruned layer: what the one-shot collection sees
        torch.testing.assert_close(seq.moments.gram[i], one.moments.gram[i], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(seq.stats[i], one.stats[i], rtol=1e-9, atol=1e-9)
    with mask_heads(model, {first: heads[first]}, reconstruct=seq):
        again = collect(model, batches, progress=False, moments=True)
    nxt = first + 1  # the next layer's: those of the model with the first pruned layer refit
    assert not torch.allclose(seq.moments.gram[nxt], one.moments.gram[nxt], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seq.moments.gram[nxt], again.moments.gram[nxt], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seq.stats[nxt], again.stats[nxt], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seq.outputs[nxt], again.outputs[nxt], rtol=1e-6, atol=1e-6)
    assert seq.moments.sequences.tolist() == one.moments.sequences.tolist()
    assert seq.moments.projection is not None and seq.moments.unmasked is None
    for a, b in zip(seq.moments.projection, one.moments.projection):  # the model's own weights, not the refit's
        assert torch.equal(a, b)


def test_the_counts_are_the_running_shares():
    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       num_hidden_layers=4)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    for gqa, ratio in (("even", 0.5), ("query", 0.3), ("group", 0.5)):
        heads, _ = calibrate_sequentially(model, batches, ratio=ratio, gqa=gqa)
        plan = RunningShares(collect(model, batches[:1], progress=False), ratio=ratio, gqa=gqa)
        unit = 2 if gqa == "group" else 1
        assert [len(heads.get(i, [])) for i in range(4)] == [plan.take(i) * unit for i in range(4)]
        assert 0 not in heads  # the default recipe's protected first layer


def test_running_shares_spread_the_budget_over_the_open_layers():
    # 30 layers of 9 query heads in 3 KV groups, as SmolLM2-135M
    layout = _layout(hidden_size=36, num_attention_heads=9, num_key_value_heads=3, head_dim=4, num_hidden_layers=30)
    want = {("even", 0.3): (81, {0, 3}), ("even", 0.5): (135, {3, 6}), ("even", 0.7): (189, {6, 7}),
            ("query", 0.3): (81, {2, 3}), ("group", 0.5): (45, {1, 2})}
    for (gqa, ratio), (total, sizes) in want.items():
        plan = RunningShares(layout, ratio=ratio, gqa=gqa)
        taken = [plan.take(i) for i in range(30)]
        assert taken[0] == 0 and sum(taken) == total and set(taken[1:]) == sizes, (gqa, ratio, taken)
    # whole groups and heads of every group, not both, where those reach the share (5: a group and 1 + 1)
    assert RunningShares(layout, ratio=0.5, gqa="even").options[1] == [0, 3, 6]
    plan = RunningShares(layout, count=4, gqa="query", protect_layers=[], min_heads_per_layer=8)
    taken = [plan.take(i) for i in range(30)]  # one head where the running share passes 0.5, 1.5, 2.5, 3.5
    assert [i for i, n in enumerate(taken) if n] == [3, 11, 18, 26] and set(taken) == {0, 1}
    with pytest.raises(ValueError, match="ratio/count: 60 units requested but protect_layers and min_heads_per_layer=8 "
                                         "allow at most 30"):
        RunningShares(layout, count=60, gqa="query", protect_layers=[], min_heads_per_layer=8)
    with pytest.raises(ValueError, match=r"protect_layers: indices \[30\] out of range for 30 layers"):
        RunningShares(layout, ratio=0.3, protect_layers=[30])
    with pytest.raises(ValueError, match="gqa: expected one of"):
        RunningShares(layout, ratio=0.3, gqa="kv")


@pytest.mark.parametrize("kwargs, message", [
    ({"counts": {0: 1}, "scores": True, "protect_layers": [1]}, "protect_layers: the per-site counts are taken as "
                                                                 "given"),
    ({"counts": {0: 1}, "scores": True, "min_heads_per_layer": 2}, "min_heads_per_layer: the per-site counts"),
    ({"counts": {0: 1}, "scores": True, "fused": False}, "fused: the per-site counts are taken as given, and no "
                                                         "statistics are collected"),
    ({"ratio": 0.5, "choose": lambda site, gram: [0]}, "choose: replaces each layer's choice, its count included"),
    ({"counts": {0: 1}, "ratio": 0.5}, "counts: give the per-site counts, or ratio= or count=, not both"),
    ({"counts": {0: 1}}, "scores: per-site counts are re-chosen from the statistics of the unpruned model"),
    ({"scores": True, "ratio": 0.5}, "scores: with ratio= or count= the pass collects its own statistics"),
    ({}, r"counts: give the per-site counts \(with scores\), or ratio= or count="),
])
def test_the_budget_is_given_one_way(kwargs, message):
    model = tiny_model("llama")
    batches = [tiny_batch("llama")]
    if kwargs.get("scores"):
        kwargs["scores"] = collect(model, batches, progress=False, moments=True)
    with pytest.raises(ValueError, match=message):
        calibrate_sequentially(model, batches, **kwargs)


def test_the_one_pass_takes_select_heads_defaults():
    """Even layouts, as select_heads' default (the counts' form keeps its "query"), and the sites
    in order, each once."""
    from headprune.ranking.layouts import even_layouts

    model = tiny_model("llama", hidden_size=36, num_attention_heads=9, num_key_value_heads=3, head_dim=4,
                       num_hidden_layers=4)
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    heads, _ = calibrate_sequentially(model, batches, ratio=0.4)
    assert heads == calibrate_sequentially(model, batches, ratio=0.4, gqa="even")[0]
    for hs in heads.values():  # every group kept keeps as many query heads as the others
        left = [3 - sum(h // 3 == g for h in hs) for g in range(3)]
        assert len({n for n in left if n}) == 1 and len(hs) in even_layouts(9, 3)
    with pytest.raises(TypeError, match="fused: expected a bool, got str"):
        calibrate_sequentially(model, batches, ratio=0.4, fused="no")
    plan = RunningShares(collect(model, batches[:1], progress=False), ratio=0.4)
    with pytest.raises(ValueError, match="site: the sites are taken in order, each once; expected site 0, got 2"):
        plan.take(2)


def test_the_sweeps_one_pass_recipe(monkeypatch):
    """The sweep's one-pass recipe (for benchmarks) is calibrate_sequentially(ratio=) with the
    default's protection; the other sequential recipes keep the one-shot selection's counts."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=0, quiet=True, eval_windows=1, fused=False)
    named = {"named": {**S.ONE_PASS_RECIPE["default, sequential in one pass"], "score": "reconstruction",
                       "min_heads_per_layer": 2}}  # a named score: no layer protected by default
    recipes = {**S.ONE_PASS_RECIPE, **named, "default, sequential": S.RECIPES["default, sequential"]}
    res = S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, recipes,
                      batches=batches)
    want, _ = calibrate_sequentially(model, batches, ratio=0.5, gqa=config.gqa, damping=config.damping, fused=False)
    got = {int(k): v for k, v in res["heads"]["default, sequential in one pass"][0].items()}
    assert got == want and 0 not in got
    want, _ = calibrate_sequentially(model, batches, ratio=0.5, gqa=config.gqa, damping=config.damping, fused=False,
                                     protect_layers=(), min_heads_per_layer=2)
    got = {int(k): v for k, v in res["heads"]["named"][0].items()}
    assert got == want and 0 in got and all(len(hs) <= 4 for hs in got.values())
    for scope in ("global", None):  # refused before anything is evaluated (an encoder's measured one: minutes)
        monkeypatch.setattr(S, "quality", lambda *a, **k: pytest.fail("evaluated"))
        with pytest.raises(ValueError, match=f"recipes: 'x' calibrates in one pass, which spreads the budget evenly "
                                             f"over the layers; give it scope='per_layer', not {scope!r}"):
            S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"},
                        {"x": {"sequential": "one pass", **({"scope": scope} if scope else {})}}, batches=batches)


@pytest.mark.parametrize("option", [{"order": "high"}, {"learned": {}}, {"kv_ratio": 0.5}, {"uniform": True},
                                    {"iterative": True}])
@pytest.mark.parametrize("sequential", [True, "one pass"])
def test_sweep_refuses_what_a_sequential_recipe_would_ignore(monkeypatch, option, sequential):
    """A sequential recipe re-chooses each layer's heads by greedy OBS: an order, learned gates,
    a KV share, a uniform layout or rounds would not decide them, and are refused before
    anything is evaluated; the one-pass recipe runs no one-shot selection it would discard."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    model = tiny_model("llama", num_hidden_layers=2)
    batches = [tiny_batch("llama", seed=0)]
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    monkeypatch.setattr(S, "quality", lambda *a, **k: pytest.fail("evaluated"))
    config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=0, quiet=True, eval_windows=1, fused=False)
    recipe = {"sequential": sequential, "scope": "per_layer", **option}
    with pytest.raises(ValueError, match=f"recipes: 'x' re-chooses each layer's heads by the refit's error, layer by "
                                         f"layer, so {next(iter(option))} would not decide them; drop one"):
        S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, {"x": recipe},
                    batches=batches)
    if sequential == "one pass" and "order" in option:
        monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
        monkeypatch.setattr(S, "select_heads", lambda *a, **k: pytest.fail("selected"))
        S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"},
                    {"x": {"sequential": sequential, "scope": "per_layer", "protect_layers": []}}, batches=batches)


def test_fused_is_passed_on_and_bad_batches_are_refused(monkeypatch):
    from headprune.core import ops

    model = tiny_model("llama")
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    calls = []
    real = ops.attention_stats_accumulate_
    monkeypatch.setattr(ops, "attention_stats_accumulate_", lambda *a, **k: calls.append(1) or real(*a, **k))
    calibrate_sequentially(model, batches, ratio=0.3, fused=False)
    assert calls == []
    calibrate_sequentially(model, batches, ratio=0.3)
    assert calls
    with pytest.raises(ValueError, match="batches: got none"):
        calibrate_sequentially(model, [], ratio=0.3)
    wide = dict(batches[0], attention_mask=batches[0]["attention_mask"][:, None, None, :])
    with pytest.raises(ValueError, match="'attention_mask' has 4 dimensions"):
        calibrate_sequentially(model, [wide], ratio=0.3)


def test_running_shares_reach_what_the_per_layer_selection_reaches():
    """Sizes chosen nearest the running share alone left the last layers unable to close the gap
    (one head short of select_heads at 35%, 40%, 45% and 55% of SmolLM2's layout)."""
    from headprune.ranking import select_heads

    for config in ({"hidden_size": 36, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 4,
                    "num_hidden_layers": 30},
                   {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
                    "num_hidden_layers": 6}):
        layout = _layout(**config)
        n = config["num_hidden_layers"]
        for ratio in [r / 20 for r in range(1, 15)]:
            for protect in (None, ()):
                try:
                    one_shot = select_heads(_ranked(layout), ratio=ratio, gqa="even", scope="per_layer",
                                            score="entropy", protect_layers=protect if protect is not None else [0])
                except ValueError:  # beyond what the layers allow: refused alike
                    with pytest.raises(ValueError):
                        RunningShares(layout, ratio=ratio, gqa="even", protect_layers=protect)
                    continue
                plan = RunningShares(layout, ratio=ratio, gqa="even", protect_layers=protect)
                total = sum(plan.take(i) for i in range(n))
                assert total == sum(map(len, one_shot.values())), (config, ratio, protect)


@pytest.mark.parametrize("pruned", [{}, {0: [0], 2: [0, 2, 4], 3: [0, 1]}, {1: [0, 1, 2], 4: [3, 4, 5, 6]}])
def test_running_shares_refuse_and_reach_as_the_per_layer_selection(pruned):
    """On layouts an earlier pruning left uneven, RunningShares went ahead where select_heads
    refuses (whole groups of split groups, more than an even spread allows, nothing in even
    layouts) and stopped short of what it reaches; now both agree, every mode and option."""
    from headprune.hf import prune_heads
    from headprune.hf.collection import Collection
    from headprune.ranking import select_heads

    model = tiny_model("llama", hidden_size=36, num_attention_heads=9, num_key_value_heads=3, head_dim=4,
                       num_hidden_layers=5)
    prune_heads(model, pruned)
    layout = Collection(model, "qk").scores()
    for gqa in ("query", "even", "group"):
        for protect, keep in ((None, 1), ((), 0), ([1], 3), ((), 2)):
            for ratio in (0.05, 0.15, 0.3, 0.45, 0.6, 0.8):
                try:
                    chosen = select_heads(_ranked(layout), ratio=ratio, gqa=gqa, scope="per_layer", score="entropy",
                                          protect_layers=[0] if protect is None else protect,
                                          min_heads_per_layer=keep)
                except ValueError as e:
                    with pytest.raises(ValueError, match=str(e).split(":")[0]):
                        RunningShares(layout, ratio=ratio, gqa=gqa, protect_layers=protect, min_heads_per_layer=keep)
                    continue
                plan = RunningShares(layout, ratio=ratio, gqa=gqa, protect_layers=protect, min_heads_per_layer=keep)
                unit = [hq // k if gqa == "group" and k else 1 for hq, k in zip(layout.num_heads, layout.num_kv_heads)]
                taken = [plan.take(i) for i in range(5)]
                assert sum(taken) == sum(len(hs) // unit[i] for i, hs in chosen.items()), (gqa, protect, keep, ratio)
    tie = RunningShares(_layout(num_hidden_layers=2), count=1, gqa="query", protect_layers=())
    assert [tie.take(0), tie.take(1)] == [0, 1]  # half a unit due after the first: the smaller on a tie


def _ranked(layout):
    """The layout with random entropies to rank by (select_heads needs statistics)."""
    import copy

    from headprune.core.schema import Stat

    scores = copy.deepcopy(layout)
    torch.manual_seed(0)
    scores.stats[..., Stat.COUNT] = 1.0
    scores.stats[..., Stat.SUM] = torch.rand(scores.stats.shape[:2], dtype=scores.stats.dtype)
    return scores
