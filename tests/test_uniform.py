"""Uniform layouts whose fragile layers' heads are chosen by measurement (headprune.hf.uniform)."""

import copy
import dataclasses

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model
from test_allocation import _five_sequence_loss

from headprune import select_heads
from headprune.hf import collect
from headprune.hf.uniform import group_sets, layout_count, layout_options, measure_uniform, pass_cost


def test_layout_options_are_every_set_of_the_same_layout():
    # 9 heads in 3 groups, one head from each group: 3 x 3 x 3 sets
    opts = layout_options(9, 3, [0, 5, 7])
    assert len(opts) == 27 and [0, 5, 7] in opts and len({tuple(o) for o in opts}) == 27
    assert all(sorted(len(set(o) & set(range(k, k + 3))) for k in (0, 3, 6)) == [1, 1, 1] for o in opts)
    # one whole group and one head of each other group: 3 groups x 3 x 3
    opts = layout_options(9, 3, [0, 1, 2, 4, 8])
    assert len(opts) == 27 and [0, 1, 2, 4, 8] in opts
    assert layout_options(4, 4, [1]) == [[0], [1], [2], [3]]  # no grouped queries: any one head
    with pytest.raises(ValueError, match=r"removes \[2, 1, 0\] heads from the KV groups"):
        layout_options(9, 3, [0, 1, 5])
    with pytest.raises(ValueError, match=r"expected heads in \[0, 9\)"):
        layout_options(9, 3, [9])


@pytest.fixture(scope="module")
def tiny_llama():
    model = tiny_model("llama")  # 2 layers of 4 query heads in 2 KV groups
    batches = [tiny_batch("llama", seed=i) for i in range(3)]
    return model, batches, collect(model, batches, moments=True, progress=False)


def test_first_layer_takes_the_cheapest_set_of_its_layout(tiny_llama):
    model, batches, scores = tiny_llama
    heads = select_heads(scores, ratio=0.5, uniform=True)
    before = copy.deepcopy(model.state_dict())
    out, report = measure_uniform(model, batches, scores, heads, sequences=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    loss = _five_sequence_loss(model, batches)  # what the measurement computes, by hand
    options = layout_options(4, 2, heads[0])
    by_hand = [loss(0, o) for o in options]
    best = min(range(len(options)), key=lambda i: (by_hand[i], i))
    assert out[0] == options[best] and out[1] == heads[1]  # only the protected first layer moves
    assert report["sites"][0]["options"] == len(options) and report["sites"][0]["method"] == "every set"
    assert report["sites"][0]["chosen_loss"] == pytest.approx(by_hand[best], rel=1e-5)
    assert report["sites"][0]["ranked_loss"] == pytest.approx(by_hand[options.index(heads[0])], rel=1e-5)
    assert sorted(map(len, out.values())) == sorted(map(len, heads.values()))


def test_group_sets_change_one_group_and_a_pass_counts_its_forwards():
    # 9 heads in 3 groups, one head from each: group 1's three choices, the rest fixed
    assert group_sets(9, 3, [0, 5, 7], 1) == [[0, 3, 7], [0, 4, 7], [0, 5, 7]]
    assert group_sets(9, 3, [0, 1, 2, 4, 8], 0) == [[0, 1, 2, 4, 8]]  # a whole group: one choice
    assert pass_cost(9, 3, [0, 5, 7]) == 1 + 3 * 2 and pass_cost(9, 3, [0, 1, 2, 4, 8]) == 1 + 2 * 2
    assert pass_cost(32, 8, [0, 4, 8, 12, 16, 20, 24, 28]) == 1 + 8 * 3  # 4^8 = 65,536 sets
    assert len(layout_options(32, 8, [0, 4, 8, 12, 16, 20, 24, 28])) == 4 ** 8
    assert layout_count(32, 8, [0, 4, 8, 12, 16, 20, 24, 28]) == 4 ** 8
    assert layout_count(9, 3, [0, 1, 2, 4, 8]) == len(layout_options(9, 3, [0, 1, 2, 4, 8])) == 27
    two_each = [h for g in range(8) for h in (8 * g, 8 * g + 1)]  # 8 groups of 8, two heads from each
    assert layout_count(64, 8, two_each) == 28 ** 8 and pass_cost(64, 8, two_each) == 1 + 8 * 27


def test_too_many_sets_are_measured_one_group_at_a_time(tiny_llama, monkeypatch):
    """Above MAX_OPTIONS sets, each KV group's heads are re-chosen in turn with the others
    fixed, from the ranking's set, when that pass fits in MAX_OPTIONS forwards."""
    import headprune.hf.uniform as U

    model, batches, scores = tiny_llama
    heads = select_heads(scores, ratio=0.5, uniform=True)
    assert len(layout_options(4, 2, heads[0])) == 4 and pass_cost(4, 2, heads[0]) == 3
    monkeypatch.setattr(U, "MAX_OPTIONS", 3)
    out, report = U.measure_uniform(model, batches, scores, heads, sequences=5)
    loss = _five_sequence_loss(model, batches)
    current = sorted(heads[0])
    for g in (0, 1):  # the pass, by hand
        options = group_sets(4, 2, current, g)
        by_hand = [loss(0, o) for o in options]
        current = options[min(range(len(options)), key=lambda i: (by_hand[i], i))]
    assert out[0] == current and out[1] == heads[1]
    site = report["sites"][0]
    assert site["method"] == "groups" and site["options"] == 4
    assert site["chosen_loss"] == pytest.approx(loss(0, current), rel=1e-5)
    assert site["ranked_loss"] == pytest.approx(loss(0, sorted(heads[0])), rel=1e-5)
    assert site["chosen_loss"] <= site["ranked_loss"] * (1 + 1e-6)
    monkeypatch.setattr(U, "MAX_OPTIONS", 2)  # the pass no longer fits: the ranking's heads
    out, report = U.measure_uniform(model, batches, scores, heads, sequences=5)
    assert out == heads and report["sites"][0]["method"] == "ranking" and "chosen_loss" not in report["sites"][0]


def test_whole_groups_of_one_head_are_not_said_measured_one_group_at_a_time(monkeypatch):
    """Heads of their own KV head (GPT-2) leave a pass over the groups no choice: it measured the
    ranking's set once and reported it as measured ("groups") instead of keeping the ranking."""
    import headprune.hf.uniform as U

    model = tiny_model("gpt2")
    batches = [tiny_batch("gpt2", seed=i) for i in range(2)]
    scores = collect(model, batches, moments=True, progress=False)
    heads = select_heads(scores, ratio=0.5, uniform=True)
    assert layout_count(4, 0, heads[0]) == 6 and pass_cost(4, 0, heads[0]) == 1
    monkeypatch.setattr(U, "MAX_OPTIONS", 3)
    out, report = U.measure_uniform(model, batches, scores, heads, sequences=2)
    assert out == heads and report["sites"][0]["method"] == "ranking"


def test_measure_uniform_refusals(tiny_llama):
    model, batches, scores = tiny_llama
    heads = select_heads(scores, ratio=0.5, uniform=True)
    with pytest.raises(ValueError, match="needs second moments"):
        measure_uniform(model, batches, collect(model, batches, progress=False), heads)
    assert measure_uniform(model, batches, scores, heads, sites=())[0] == heads  # nothing to measure
    for sites in ([5], [-1], 0, "0"):  # were ignored, or failed with a bare TypeError
        with pytest.raises(ValueError, match=r"sites: expected site indices in \[0, 2\)"):
            measure_uniform(model, batches, scores, heads, sites=sites)
    with pytest.raises(ValueError, match="heads: expected .* got keys \\['1'\\]"):
        measure_uniform(model, batches, scores, {"1": [0]})


def test_an_encoder_decoder_is_not_measured():
    """T5's default-protected site is the decoder's first: measuring it pooled decoder states
    with the encoder's mask and failed on a shape; it is refused, and prune does not ask."""
    from headprune.hf.uniform import measures

    model, batches = tiny_model("t5"), [tiny_batch("t5", seed=i) for i in range(3)]
    scores = collect(model, batches, progress=False, moments=True)
    heads = select_heads(scores, ratio=0.5, uniform=True)
    with pytest.raises(ValueError, match="not T5Model \\(encoder-decoder\\)"):
        measure_uniform(model, batches, scores, heads)
    assert not measures({"uniform": True}, "refit", scores)


@pytest.mark.parametrize("extra, measured", [({}, True), ({"score": "variance"}, False), ({"order": "low"}, False)])
def test_prune_uniform_measures_the_first_layer_for_the_default_ranking(tiny_llama, monkeypatch, extra, measured):
    """`headprune prune --uniform` re-chooses the first layer's heads by measurement with the
    default ranking (a recipe given by --score or --order keeps its own), and says so."""
    from argparse import Namespace

    import headprune.app.prune_command as P
    import headprune.hf.uniform as U

    model, batches, scores = tiny_llama
    calls, real = [], U.measure_uniform
    monkeypatch.setattr(U, "measure_uniform", lambda *a, **k: calls.append(k["damping"]) or real(*a, **k))
    args = Namespace(steps=1, ratio=0.5, count=None, damping=0.03, quiet=True, sequential=False, gqa="even",
                     distributed=False)
    kw = {"uniform": True, "gqa": "even", **extra}
    heads, _ = P._select(args, Namespace(model=model), batches, scores, kw, "refit")
    assert calls == ([0.03] if measured else [])
    assert ("first layer's heads the set of that layout" in P._recipe(args, kw, "refit", scores)) is measured
    assert not P._measures_uniform(Namespace(**{**vars(args), "sequential": True}), kw, "refit", scores)
    assert not P._measures_uniform(args, kw, "mean", scores)
    pruned_before = dataclasses.replace(scores, head_ids=[list(range(h)) for h in scores.num_heads])
    assert not P._measures_uniform(args, kw, "refit", pruned_before)  # positions are not the original heads


def test_sweep_measures_each_uniform_selection_once(tiny_llama, monkeypatch):
    """The sweep's uniform recipe measures the first layer as prune --uniform does, once for
    ratios that round to the same uniform selection."""
    import headprune.app.sweep as S
    import headprune.hf.uniform as U
    from headprune.app.load import Loaded

    model, batches, scores = tiny_llama
    calls, real = [], U.measure_uniform
    monkeypatch.setattr(U, "measure_uniform", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.4, 0.5], seeds=0, quiet=True, eval_windows=1)
    res = S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"},
                      {"uniform": {"uniform": True}}, batches=batches)
    picks = [select_heads(scores, ratio=r, uniform=True) for r in (0.4, 0.5)]
    assert picks[0] == picks[1] and calls == [picks[0]]  # the same selection: one measurement
    assert res["heads"]["uniform"][0] == res["heads"]["uniform"][1]


def test_prune_uniform_warns_where_a_layer_has_too_many_sets(tiny_llama, monkeypatch, capsys):
    """A first layer with more sets of its layout than are measured keeps the ranking's heads,
    and prune says so."""
    from argparse import Namespace

    import headprune.app.prune_command as P
    import headprune.hf.uniform as U

    model, batches, scores = tiny_llama
    monkeypatch.setattr(U, "MAX_OPTIONS", 1)
    args = Namespace(steps=1, ratio=0.5, count=None, damping=0.01, quiet=True, sequential=False, gqa="even",
                     distributed=False)
    kw = {"uniform": True, "gqa": "even"}
    heads, _ = P._select(args, Namespace(model=model), batches, scores, kw, "refit")
    assert heads == select_heads(scores, ratio=0.5, uniform=True, gqa="even")
    assert ("layer 0 has 4 sets of heads of its layout, too many to measure in 1 forwards (every set, or one KV "
            "group at a time)") in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bert():
    model = tiny_model("bert")  # 2 layers of 4 heads, no grouped queries
    batches = [tiny_batch("bert", seed=i) for i in range(3)]
    return model, batches, collect(model, batches, moments=True, progress=False)


def test_encoder_uniform_layout_is_chosen_greedily_in_every_layer(tiny_bert):
    """On an encoder every layer's heads are re-chosen as its measured allocation chooses them:
    greedily, the cheapest head at each count up to the layout's, or the ranking's set where
    that measured cheaper (checked by brute force); the count stays the same in every layer."""
    model, batches, scores = tiny_bert
    heads = select_heads(scores, ratio=0.5, uniform=True)
    before = copy.deepcopy(model.state_dict())
    out, report = measure_uniform(model, batches, scores, heads, sequences=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    loss = _five_sequence_loss(model, batches)
    for site, ranked in heads.items():
        chosen = []
        for _ in ranked:
            chosen = min((sorted(chosen + [h]) for h in range(scores.num_heads[site]) if h not in chosen),
                         key=lambda s: loss(site, s))
        greedy, ranked_loss = loss(site, chosen), loss(site, sorted(ranked))
        assert out[site] == (chosen if greedy <= ranked_loss else sorted(ranked))
        r = report["sites"][site]
        assert r["method"] == "greedy" and r["options"] == layout_count(4, 4, ranked)
        assert r["ranked_loss"] == pytest.approx(ranked_loss, rel=1e-5, abs=1e-7)
        assert r["chosen_loss"] == pytest.approx(min(greedy, ranked_loss), rel=1e-5, abs=1e-7)
    assert {len(v) for v in out.values()} == {len(v) for v in heads.values()} == {2}
    assert measure_uniform(model, batches, scores, heads, sites=())[0] == heads  # sites given: only those


def test_prune_uniform_on_an_encoder_says_each_layer_was_measured(tiny_bert):
    from argparse import Namespace

    import headprune.app.prune_command as P

    model, batches, scores = tiny_bert
    args = Namespace(steps=1, ratio=0.5, count=None, damping=0.01, quiet=True, sequential=False, gqa="even",
                     distributed=False)
    kw = {"uniform": True, "gqa": "even"}
    heads, _ = P._select(args, Namespace(model=model), batches, scores, kw, "refit")
    assert heads == measure_uniform(model, batches, scores, select_heads(scores, ratio=0.5, uniform=True))[0]
    text = P._recipe(args, kw, "refit", scores)
    assert "each layer's heads removed one at a time" in text and "first layer" not in text


def test_t5_cross_attention_layers_keeping_other_heads_stay_plain(tmp_path):
    """T5's cross-attention has no relative-position table, so the bias its first layer passes
    down is zeros and the mask, alike for every head. Layers keeping as many heads but other
    ones were still given per-layer biases, which no config can declare: the directory was not
    plain. Self-attention layers share their first layer's table, so theirs must keep the same
    heads."""
    import json

    import transformers

    from headprune.hf import mask_heads, prune_heads, save_pruned

    model = tiny_model("t5")  # sites: encoder 0-1 self, decoder 0-1 self, decoder 0-1 cross
    heads = {0: [1], 1: [1], 2: [2], 3: [2], 4: [0], 5: [3]}
    pruned, masked = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    prune_heads(pruned, heads)
    mask_heads(masked, heads)
    assert pruned._headprune_state["per_layer_bias"] == []
    batch = tiny_batch("t5", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).last_hidden_state, masked(**batch).last_hidden_state,
                                   rtol=0, atol=1e-12)
    pruned.float()
    save_pruned(pruned, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "headprune.json").read_text())["plain_loadable"]
    plain = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).last_hidden_state, pruned(**batch).last_hidden_state)


def test_t5_uniform_selection_ties_each_stacks_self_attention_and_saves_plainly(tmp_path):
    """T5's self-attention layers read their stack's first layer's position table: a uniform
    selection keeps the same heads in all of them (the least summed cost), so the pruned model's
    config describes it and plain from_pretrained rebuilds it exactly (without the refit, whose
    output bias no T5 config declares); cross-attention layers need only the same count."""
    import json

    import transformers

    from headprune.hf import prune_heads, save_pruned
    from headprune.ranking.layouts import tied_sites

    model = tiny_model("t5")  # sites: encoder 0-1 self, decoder 0-1 self, decoder 0-1 cross
    scores = collect(model, [tiny_batch("t5", seed=i) for i in range(3)], progress=False, moments=True)
    assert tied_sites(scores) == [[0, 1], [2, 3]]
    for score in ("entropy", "variance", None):
        heads = select_heads(scores, ratio=0.5, uniform=True, score=score)
        assert heads[0] == heads[1] and heads[2] == heads[3] and len({len(h) for h in heads.values()}) == 1
    refit = copy.deepcopy(model)
    prune_heads(refit, heads, reconstruct=scores)
    assert refit._headprune_state["per_layer_bias"] == [] and refit.config.num_heads == 2
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads)
    save_pruned(pruned, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "headprune.json").read_text())["plain_loadable"]
    plain = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    batch = tiny_batch("t5", seed=7)
    with torch.no_grad():
        assert torch.equal(plain(**batch).last_hidden_state, pruned(**batch).last_hidden_state)


def test_tied_position_tables_follow_the_adapters():
    """The ranking's list of model types whose self-attention shares a position table is the
    adapters' (the selection does not import them)."""
    from headprune.hf.adapters import ADAPTERS
    from headprune.ranking.layouts import SHARED_POSITION_TABLE

    assert {name for name, a in ADAPTERS.items() if a.shared_position_bias} == set(SHARED_POSITION_TABLE)
