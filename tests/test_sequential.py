"""Sequential calibration: each site's moments are those of the model with the earlier sites
already pruned and refit, the model comes back unchanged, and nothing is recomputed for the
unpruned path."""

import pytest
import torch

from hf_tiny import FAMILIES, tiny_batch, tiny_model
from model_snapshot import ModelSnapshot

from headprune.hf import collect, mask_heads
from headprune.hf.sequential import calibrate_sequentially

ONE_STACK = [f for f in FAMILIES if f != "t5"]


def _setup(family):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(3)]
    return model, batches, collect(model, batches, progress=False, fused=False, moments=True)


@pytest.mark.parametrize("family", ONE_STACK)
def test_without_removal_the_moments_are_the_one_shot_ones(family):
    model, batches, scores = _setup(family)
    heads, seq = calibrate_sequentially(model, batches, scores, {})
    assert heads == {}
    for a, b in zip(seq.moments.gram, scores.moments.gram):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "phi3"])
def test_each_site_sees_the_earlier_sites_pruned_and_refit(family):
    model, batches, scores = _setup(family)
    snap = ModelSnapshot(model)
    heads, seq = calibrate_sequentially(model, batches, scores, {0: 2, 1: 1})
    assert snap.differences() == []
    assert [len(heads.get(i, [])) for i in range(2)] == [2, 1]
    # site 1's moments = those collected with site 0 masked by its sequential refit
    with mask_heads(model, {0: heads[0]}, reconstruct=seq):
        again = collect(model, batches, progress=False, fused=False, moments=True)
    torch.testing.assert_close(seq.moments.gram[1], again.moments.gram[1], rtol=1e-9, atol=1e-9)
    assert torch.equal(seq.moments.gram[0], scores.moments.gram[0])


def test_group_units_and_a_custom_choice():
    model, batches, scores = _setup("llama")
    heads, _ = calibrate_sequentially(model, batches, scores, {0: 1, 1: 1}, gqa="group")
    assert all(hs in ([0, 1], [2, 3]) for hs in heads.values())
    heads, _ = calibrate_sequentially(model, batches, scores, {}, choose=lambda site, gram: [site.index + 1])
    assert heads == {0: [1], 1: [2]}


def test_even_units_keep_the_groups_equal(monkeypatch):
    # 2 KV groups of 3 query heads, a greedy order that takes group 0 first: "query" takes
    # heads 0 and 1 (groups of 1 and 3 left), "even" the cheapest even layout, 0 and 3
    import headprune.hf.sequential as S

    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    monkeypatch.setattr(S, "greedy_removal", lambda gram, proj, units, damping, energy: (list(range(len(units))), [], None))
    # (4 heads: group 0 whole and head 3, costing 0+1+2+3, is cheaper than 2 + 2, 0+1+3+4)
    want = {("query", 2): [0, 1], ("even", 2): [0, 3], ("even", 4): [0, 1, 2, 3]}
    for (gqa, count), heads in want.items():
        got, _ = calibrate_sequentially(model, batches, scores, {0: count, 1: count}, gqa=gqa)
        assert got == {0: heads, 1: heads}
    with pytest.raises(ValueError, match=r"counts: site 0: no even layout of 6 query heads in 2 KV groups removes 1"):
        calibrate_sequentially(model, batches, scores, {0: 1}, gqa="even")


def test_encoder_decoders_are_refused():
    model, batches, scores = _setup("t5")
    with pytest.raises(ValueError, match="model: sequential calibration supports one stack of layers"):
        calibrate_sequentially(model, batches, scores, {0: 1})


def test_the_sweeps_sequential_default_is_the_default_recalibrated(monkeypatch):
    """The sweep's "default, sequential" recipe keeps the default's counts per layer and
    re-chooses and refits them layer by layer, as `prune --sequential` does."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded
    from headprune.ranking import select_heads, unit_sizes

    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=0, quiet=True, eval_windows=1)
    recipes = {k: S.RECIPES[k] for k in ("default", "default, sequential")}
    res = S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, recipes,
                      batches=batches)
    one_shot = select_heads(scores, ratio=0.5, gqa=config.gqa, damping=config.damping)
    unit = unit_sizes(scores, config.gqa)
    want, _ = calibrate_sequentially(model, batches, scores, {s: len(h) // unit[s] for s, h in one_shot.items()},
                                     gqa=config.gqa, damping=config.damping)
    got = {int(k): v for k, v in res["heads"]["default, sequential"][0].items()}
    assert want != one_shot  # (on this model the layer-by-layer choice differs)
    assert got == want and {int(k): v for k, v in res["heads"]["default"][0].items()} == one_shot
    assert {s: len(h) for s, h in got.items()} == {s: len(h) for s, h in one_shot.items()}


def _counting_forward(layer):
    """An instance ``forward`` (as accelerate's hooks install) that counts its calls."""
    calls, inner = [], layer.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    layer.forward = forward
    return calls, forward


def test_dropout_flags_and_instance_forwards_are_left_as_they_were():
    from headprune.hf.allocation import layer_costs

    model = tiny_model("bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    batches = [tiny_batch("bert", seed=s) for s in range(3)]
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    model.train()
    model.embeddings.eval()  # a submodule the user froze
    flags = {name: m.training for name, m in model.named_modules()}
    layer = model.encoder.layer[0]
    calls, forward = _counting_forward(layer)
    _, seq = calibrate_sequentially(model, batches, scores, {})
    for a, b in zip(seq.moments.gram, scores.moments.gram):  # eval mode: no dropout in the moments
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    layer_costs(model, batches, scores, sequences=2, protect_layers=[], choose="ranking")
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert layer.__dict__.get("forward") is forward
    calls.clear()
    with torch.no_grad():
        model(**batches[0])
    assert calls == [1]


def test_a_layer_left_without_heads_is_passed_through():
    from headprune.hf import prune_heads

    model = tiny_model("llama", num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    prune_heads(model, {1: [0, 1, 2, 3]})
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    heads, seq = calibrate_sequentially(model, batches, scores, {})
    assert heads == {} and seq.moments.gram[1] is None
    for i in (0, 2):
        torch.testing.assert_close(seq.moments.gram[i], scores.moments.gram[i], rtol=1e-9, atol=1e-9)
    heads, _ = calibrate_sequentially(model, batches, scores, {0: 1, 2: 1})
    assert sorted(heads) == [0, 2]


def test_an_active_mask_is_refused():
    model, batches, scores = _setup("llama")
    with mask_heads(model, {0: [1]}):
        with pytest.raises(ValueError, match="model: has heads masked by active mask_heads handles; restore them"):
            calibrate_sequentially(model, batches, scores, {1: 1})


def test_a_pruned_model_gets_original_head_indices():
    """The heads came back as positions: on a model an earlier pruning left with heads 2 and 3,
    prune_heads (original indices) removed the wrong heads or none."""
    from headprune.hf import kept_heads, prune_heads

    model = tiny_model("llama", num_hidden_layers=2)
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    prune_heads(model, {0: [0, 1], 1: [0, 1]})
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    heads, seq = calibrate_sequentially(model, batches, scores, {0: 1, 1: 1}, gqa="query")
    assert all(len(hs) == 1 and set(hs) <= {2, 3} for hs in heads.values()) and set(heads) == {0, 1}
    prune_heads(model, heads, reconstruct=seq)
    assert kept_heads(model) == {s: [h for h in (2, 3) if h not in heads[s]] for s in (0, 1)}


def test_the_projection_is_built_on_the_weights_device():
    """A bias-free output projection's zero bias was made on the CPU (another device than the
    weight's under --device cuda); the meta device stands in for a GPU."""
    from headprune.hf.adapters import get_adapter, resolve_sites
    from headprune.hf.collection import projection as _projection

    model = tiny_model("llama")
    adapter = get_adapter(model)
    site = resolve_sites(model, adapter)[0]
    assert site.o.bias is None
    site.o.to("meta")
    assert _projection(site, adapter).device.type == "meta"
