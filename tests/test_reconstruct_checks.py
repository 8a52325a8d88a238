"""What the refit and the reconstruction score refuse: merges that would drop or mix second
moments, and singular moments without damping."""

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect


def test_merges_that_would_drop_or_mix_moments_are_refused():
    """A merge kept the moments only when both sides had them (the default recipe then fell back
    to another score), took one side's dtype, and summed moments taken under other weights."""
    import dataclasses

    model = tiny_model("llama")
    a = collect(model, [tiny_batch("llama", seed=0)], progress=False, moments=True)
    b = collect(model, [tiny_batch("llama", seed=1)], progress=False, moments=True)
    plain = collect(model, [tiny_batch("llama", seed=1)], progress=False)
    for x, y in ((a, plain), (plain, a)):
        with pytest.raises(ValueError, match="scores hold second moments; collect both alike"):
            x.merge(y)
    with pytest.raises(ValueError, match="scores hold output statistics; collect both alike"):
        a.merge(dataclasses.replace(b, outputs=None, moments=None))
    with pytest.raises(ValueError, match="other: collected with method 'eager', these with 'qk'"):
        a.merge(dataclasses.replace(b, method="eager"))
    f32 = collect(model, [tiny_batch("llama", seed=1)], progress=False, moments="float32")
    for x, y in ((a, f32), (f32, a)):
        with pytest.raises(ValueError, match="moments in torch.float32 and torch.float64; collect both in one dtype"):
            x.merge(y)
    torch.manual_seed(1)
    other = collect(tiny_model("llama"), [tiny_batch("llama", seed=1)], progress=False, moments=True)
    if all(torch.equal(p, q) for p, q in zip(a.moments.projection, other.moments.projection)):
        other.moments.projection[0] = other.moments.projection[0] + 1  # a model of other weights
    with pytest.raises(ValueError, match="under other output-projection weights"):
        a.merge(other)
    old = dataclasses.replace(a, causal=None)  # a file from before ``causal``: the known side's, in either order
    assert old.merge(b).causal == b.causal == b.merge(old).causal and b.causal is not None


def test_greedy_removal_without_damping_refuses_singular_moments():
    """damping=0 on singular moments (a head that outputs nothing; fewer tokens than inputs)
    raised linalg's own error from select_heads, or ranked by costs of rounding (all about 0)."""
    import headprune as hp
    from headprune.ranking.reconstruction import greedy_removal, site_units

    model = tiny_model("llama")
    with torch.no_grad():  # KV head 1 of layer 0 (query heads 2 and 3) gives nothing
        model.layers[0].self_attn.v_proj.weight[8:16] = 0
    scores = collect(model, [tiny_batch("llama", seed=s) for s in range(2)], progress=False, moments=True)
    assert hp.select_heads(scores, ratio=0.25, damping=1e-2, protect_layers=[])
    with pytest.raises(ValueError, match="damping: 0 leaves these second moments singular"):
        hp.select_heads(scores, ratio=0.25, damping=0.0, protect_layers=[])
    # a random order reads no cost: chosen as with any damping (it was refused with the costs)
    assert (hp.select_heads(scores, ratio=0.25, damping=0.0, order="random", protect_layers=[])
            == hp.select_heads(scores, ratio=0.25, damping=1e-2, order="random", protect_layers=[]))
    torch.manual_seed(3)
    x = torch.cat([torch.randn(5, 12, dtype=torch.float64), torch.ones(5, 1, dtype=torch.float64)], 1)
    w = torch.randn(5, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match="fewer calibration tokens than the site's 12 inputs"):
        greedy_removal(x.t() @ x, w, site_units(4, 4, 3, "query"), damping=0.0)
    x = torch.cat([torch.randn(40, 12, dtype=torch.float64), torch.ones(40, 1, dtype=torch.float64)], 1)
    order, costs, _ = greedy_removal(x.t() @ x, w, site_units(4, 4, 3, "query"), damping=0.0)  # enough tokens
    y = x @ w.t()
    torch.testing.assert_close(sum(costs), float((y - y.mean(0)).square().sum(1).mean()), rtol=1e-9, atol=0)


def test_files_of_statistics_that_would_load_wrong_are_refused(tmp_path):
    """Moments saved without their site count loaded as none, sites beyond the count were
    dropped; scores of fewer head slots than heads, or stored heads-first, loaded (and failed
    later, or read as other heads)."""
    import json

    from safetensors.torch import save_file

    from headprune.stats import HeadScores, OutputMoments

    scores = collect(tiny_model("llama"), [tiny_batch("llama")], progress=False, moments=True)
    save_file(scores.moments.state_dict(), tmp_path / "bare.st")
    with pytest.raises(ValueError, match="does not say how many sites it holds"):
        OutputMoments.load(tmp_path / "bare.st")
    save_file(scores.moments.state_dict(), tmp_path / "short.st", metadata={"sites": "1"})
    with pytest.raises(ValueError, match=r"tensors \['gram.1'.* are not of sites 0-0 \(1 sites\)"):
        OutputMoments.load(tmp_path / "short.st")
    scores.moments.save(tmp_path / "ok.st")
    back = OutputMoments.load(tmp_path / "ok.st")
    assert all(torch.equal(a, b) for a, b in zip(back.gram, scores.moments.gram))
    d = json.loads(json.dumps(scores.to_dict()))
    assert torch.equal(HeadScores.from_dict(d).stats, scores.stats)
    narrow = dict(d, stats=[site[:3] for site in d["stats"]])  # 3 slots for 4 heads
    with pytest.raises(ValueError, match="stats: 3 head slots per site, but a site has 4 heads"):
        HeadScores.from_dict(narrow)
    flipped = dict(d, stats=torch.tensor(d["stats"]).transpose(0, 1).tolist())  # [heads, sites, 6]
    with pytest.raises(ValueError, match=r"d: stats of shape \[4, 2, 6\], expected \[2 sites, heads, 6\]"):
        HeadScores.from_dict(flipped)


def test_the_refit_without_damping_changes_singular_moments_least():
    """damping=0 on singular moments (fewer tokens than inputs) took the minimum-norm weights,
    not the least change of the kept ones: with no column removed the weights still moved (by
    3.2)."""
    from headprune.prune.reconstruct import refit_output

    torch.manual_seed(0)
    d, out = 12, 6
    x = torch.cat([torch.randn(5, d, dtype=torch.float64), torch.ones(5, 1, dtype=torch.float64)], 1)
    gram, w, b = x.t() @ x, torch.randn(out, d, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    new_w, new_b = refit_output(w, b, gram, list(range(d)), damping=0.0)
    assert torch.allclose(new_w, w, atol=1e-9) and torch.allclose(new_b, b, atol=1e-9)
    keep = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    new_w, new_b = refit_output(w, b, gram, keep, damping=0.0)
    s = keep + [d]
    g = gram / gram[d, d]
    wt = torch.cat([w, b[:, None]], 1)
    want = wt[:, s].t() + torch.linalg.pinv(g[s][:, s]) @ (g[s] @ wt.t() - g[s][:, s] @ wt[:, s].t())
    torch.testing.assert_close(torch.cat([new_w, new_b[:, None]], 1).t(), want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("tokens", [10, 30, 4096])
def test_float32_moments_without_damping_fit_without_blowing_up(tokens):
    """Fewer calibration tokens than kept columns leave G[K, K] singular; summed in float32 its
    rounding made it look full rank, and the refit without damping fitted the rounding: kept
    columns up to 10,000 times the original weights, where float64 sums give the least change
    of the kept weights. Both now fit the calibration exactly, with columns of the same size; with
    many tokens of inputs off centre both give the same fit (a first floor dropped real directions)."""
    from headprune.hf.collection import _add_gram_
    from headprune.prune.reconstruct import kept_columns, refit_output

    heads, d, out = 6, 8, 16
    for seed in range(20):
        torch.manual_seed(seed)
        scale = torch.logspace(0, -2, heads * d, dtype=torch.float64)  # attention outputs are not isotropic
        x = torch.randn(tokens, heads * d, dtype=torch.float64) * scale + (3.0 if tokens > 100 else 0.0)
        w, b = torch.randn(out, heads * d, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
        keep = kept_columns(heads, d, [2, 5])
        size, fit = {}, {}
        for dtype in (torch.float64, torch.float32):
            gram = torch.zeros(heads * d + 1, heads * d + 1, dtype=dtype)
            _add_gram_(gram, x)
            new_w, new_b = refit_output(w, b, gram, keep, damping=0.0)
            y = x @ w.t() + b
            fit[dtype] = ((x[:, keep] @ new_w.t() + new_b - y).pow(2).mean() / (y - y.mean(0)).pow(2).mean()).item()
            size[dtype] = new_w.abs().max().item()
        assert size[torch.float32] <= 2 * max(size[torch.float64], w.abs().max().item()), (seed, size)
        assert fit[torch.float32] <= fit[torch.float64] * 1.01 + 1e-6, (seed, fit)


def test_the_refit_without_damping_changes_singular_moments_least_where_cholesky_passes():
    """Moments of 3 tokens over 3 kept columns and the constant are singular, yet rounding let
    their Cholesky factorisation through (info 0): the refit solved by it, fitting the tokens
    exactly with the kept weights moved twice as far as the least change does."""
    from headprune.prune.reconstruct import refit_output

    torch.manual_seed(1)
    d, out = 7, 3
    x = torch.cat([torch.randn(3, d, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)], 1)
    gram, w, b = x.t() @ x, torch.randn(out, d, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    keep = [6, 2, 4]
    s = keep + [d]
    g = gram / gram[d, d]
    assert int(torch.linalg.cholesky_ex(g[s][:, s])[1]) == 0 and int(torch.linalg.matrix_rank(g[s][:, s])) == 3
    new_w, new_b = refit_output(w, b, gram, keep, damping=0.0)
    wt = torch.cat([w, b[:, None]], 1)
    want = wt[:, s].t() + torch.linalg.pinv(g[s][:, s]) @ (g[s] @ wt.t() - g[s][:, s] @ wt[:, s].t())
    torch.testing.assert_close(torch.cat([new_w, new_b[:, None]], 1).t(), want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_statistics_collected_under_a_mask_upstream_are_refused_once_it_is_restored(family):
    """Scores collected while site 0 was masked were accepted, after the mask was restored, to
    refit (or compensate) a later site: its moments were the masked model's inputs."""
    import copy

    from headprune.hf import mask_heads, prune_heads

    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    with mask_heads(model, {0: [1]}):
        stale = collect(model, batches, progress=False, moments=True)
    before = copy.deepcopy(model.state_dict())
    said = r"reconstruct: the scores were collected with heads \[1\] of site 0 masked, which the model has again"
    with pytest.raises(ValueError, match=said):
        prune_heads(model, {1: [0]}, reconstruct=stale)
    with pytest.raises(ValueError, match=said):
        mask_heads(model, {1: [0]}, reconstruct=stale)
    with pytest.raises(ValueError, match=said.replace("reconstruct", "compensate")):
        mask_heads(model, {1: [0]}, compensate=stale)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with mask_heads(model, {0: [1]}):  # masked again: the model the statistics are of
        with mask_heads(model, {1: [0]}, reconstruct=stale):
            pass
    prune_heads(copy.deepcopy(model), {0: [1], 1: [0]}, reconstruct=stale)  # removing it as well
    with mask_heads(model, {0: [1]}):  # without moments: the output statistics say it
        means = collect(model, batches, progress=False)
    with pytest.raises(ValueError, match=said.replace("reconstruct", "compensate")):
        mask_heads(model, {1: [0]}, compensate=means)
    # a mask changes nothing at its own site nor before it: those statistics were accepted, and are
    with mask_heads(model, {1: [1]}):
        later = collect(model, batches, progress=False, moments=True)
    prune_heads(copy.deepcopy(model), {0: [0]}, reconstruct=later)
    prune_heads(copy.deepcopy(model), {1: [2]}, reconstruct=later)


def test_pruning_every_kept_head_of_a_reloaded_masked_site(tmp_path):
    """With a site's remaining heads all zeroed by a mask saved so, the refit kept no columns, and
    placing them failed inside (an index of floats)."""
    from headprune.hf import load_pruned, mask_heads, prune_heads, save_pruned

    model = tiny_model("llama")
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    mask_heads(model, {1: [0]})
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    prune_heads(again, {1: [1, 2, 3]}, reconstruct=collect(again, batches, progress=False, moments=True))
    assert not again.layers[1].self_attn.o_proj.weight.any()


def test_moments_without_the_projection_still_refit():
    """Moments that keep no projection (calibrate_sequentially's from statistics collected without
    moments, or a file without them) failed the check for an upstream mask with a TypeError."""
    import dataclasses

    from headprune.hf import prune_heads
    from headprune.stats.moments import OutputMoments

    model = tiny_model("llama")
    scores = collect(model, [tiny_batch("llama", seed=s) for s in range(2)], progress=False, moments=True)
    bare = dataclasses.replace(scores, moments=OutputMoments(scores.moments.gram, None, scores.moments.sequences))
    prune_heads(model, {1: [0]}, reconstruct=bare)
