"""Least-squares reconstruction: second moments gathered by collect, the refit against
torch.linalg.lstsq on the calibration activations, its reduction to mean compensation, and
masked == pruned == reloaded with the refit."""

import copy
import errno
import os

import pytest
import torch

from hf_tiny import FAMILIES, tiny_batch, tiny_model
from model_snapshot import ModelSnapshot
from numerics import assert_same_function, float64_output
from test_compensate import _first, _o_inputs

from headprune.hf import collect, load_pruned, mask_heads, prune_heads, resolve_sites, save_pruned
from headprune.hf.adapters import get_adapter, head_counts, head_dim
from headprune.prune.compensation import removed_mean_output
from headprune.prune.reconstruct import DEFAULT_DAMPING, kept_columns, refit_output
from headprune.stats import OutputMoments

HEADS = {"t5": {0: [1, 3], 3: [0], 5: [2]}}


def _heads(family):
    return HEADS.get(family, {0: [1, 3], 1: [0]})


def _setup(family, n=3):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(n)]
    return model, batches, collect(model, batches, progress=False, fused=False, moments=True)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "t5"])
def test_moments_are_the_second_moments_of_the_projection_inputs(family):
    model, batches, scores = _setup(family)
    xs = _o_inputs(model, batches)
    for i, x in enumerate(xs):
        xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        torch.testing.assert_close(scores.moments.gram[i], xt.T @ xt, rtol=1e-10, atol=1e-9)
    assert scores.moments.nbytes == sum(8 * (x.shape[1] + 1) ** 2 + 4 * (x.shape[1] + 1) * p.shape[0]
                                        for x, p in zip(xs, scores.moments.projection))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_refit_is_the_least_squares_solution_on_the_calibration_tokens(family):
    model, batches, scores = _setup(family, n=6)
    adapter = get_adapter(model)
    xs = _o_inputs(model, batches)
    for site, x in zip(resolve_sites(model, adapter), xs):
        hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
        keep = kept_columns(hq, d, [1])
        w = site.o.weight.detach().double()
        w = w.t() if adapter.conv1d else w
        b = site.o.bias.detach().double() if site.o.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        target = x @ w.T + b
        design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        want = torch.linalg.lstsq(design, target, driver="gelsd").solution.T  # [out, |K| + 1]
        cols, bias = refit_output(site.o.weight.detach(), site.o.bias, scores.moments.gram[site.index], keep,
                                  damping=0.0, conv1d=adapter.conv1d)
        got = torch.cat([(cols.t() if adapter.conv1d else cols).double(), bias[:, None]], 1)
        # the fit's residual on the calibration tokens, not the coefficients (the design can be
        # ill-conditioned): both solve the same problem to float64 rounding
        res = lambda m: (design @ m.T - target).pow(2).sum()  # noqa: E731
        assert res(got) <= res(want) * (1 + 1e-6) + 1e-9


def test_refit_with_the_kept_columns_frozen_is_mean_compensation():
    model, batches, scores = _setup("llama")
    adapter = get_adapter(model)
    mean = scores.output_mean()
    for site in resolve_sites(model, adapter):
        d = head_dim(site, adapter)
        keep = kept_columns(4, d, [0, 2])
        cols, bias = refit_output(site.o.weight.detach(), None, scores.moments.gram[site.index], keep, freeze_kept=True)
        assert torch.equal(cols, site.o.weight.detach()[:, keep])
        want = removed_mean_output(site.o.weight.detach(), [0, 2], d, mean[site.index, [0, 2], :d])
        torch.testing.assert_close(bias, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_mask_equals_refit_prune_and_restores_exactly(family):
    model, batches, scores = _setup(family)
    heads = _heads(family)
    batch = tiny_batch(family, seed=5)
    snap = ModelSnapshot(model)
    with torch.no_grad():
        original = _first(model(**batch))
        with mask_heads(model, heads, reconstruct=scores):
            masked = _first(model(**batch))
        assert torch.equal(_first(model(**batch)), original)
    assert snap.differences() == []
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads, reconstruct=scores)
    with torch.no_grad():
        out = _first(pruned(**batch))
    assert_same_function({"masked": masked, "pruned": out}, float64_output(pruned, batch, lambda m, b: _first(m(**b))))


def test_refit_fits_the_calibration_tokens_better_than_mean_compensation():
    """On the calibration data itself the refit cannot do worse than the mean (which it
    contains as the special case of frozen columns), layer by layer."""
    model, batches, scores = _setup("llama", n=8)
    heads = {0: [1, 2], 1: [0, 3]}
    adapter = get_adapter(model)
    xs = _o_inputs(model, batches)
    for layer, hs in heads.items():
        site = resolve_sites(model, adapter)[layer]
        d = head_dim(site, adapter)
        keep = kept_columns(4, d, hs)
        gram = scores.moments.gram[layer]
        w = site.o.weight.detach().double()
        target = xs[layer] @ w.T
        err = {}
        for name, frozen in (("refit", False), ("mean", True)):
            cols, bias = refit_output(site.o.weight.detach(), None, gram, keep, damping=1e-6, freeze_kept=frozen)
            err[name] = (xs[layer][:, keep] @ cols.double().T + bias - target).pow(2).mean().item()
        assert err["refit"] <= err["mean"] * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_refit_prune_saves_and_reloads_exactly(family, dtype, tmp_path):
    """In float64 the refit's bias and columns were views of one solution matrix (``.to()``
    copies nothing), and safetensors refused the parameters sharing its storage."""
    model, batches, scores = _setup(family)
    model.to(dtype)
    prune_heads(model, {0: [1], 1: [1]}, reconstruct=scores)
    save_pruned(model, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    batch = tiny_batch(family, seed=3)
    with torch.no_grad():
        assert torch.equal(_first(back(**batch)), _first(model(**batch)))


def test_reconstruct_errors_are_named():
    model, batches, scores = _setup("llama")
    plain = collect(model, batches, progress=False)
    snap = ModelSnapshot(model)
    with pytest.raises(ValueError, match="reconstruct: these scores have no second moments"):
        mask_heads(model, {0: [1]}, reconstruct=plain)
    with pytest.raises(ValueError, match="compensate, reconstruct: give at most one"):
        prune_heads(model, {0: [1]}, compensate=scores, reconstruct=scores)
    with pytest.raises(ValueError, match="damping: expected a finite non-negative number"):
        mask_heads(model, {0: [1]}, reconstruct=scores, damping=-1.0)
    with pytest.raises(ValueError, match="moments: expected True, False"):
        collect(model, batches, progress=False, moments="float16")
    assert snap.differences() == []


def test_moments_merge_save_and_load(tmp_path):
    model = tiny_model("llama")
    a = collect(model, [tiny_batch("llama", seed=0)], progress=False, moments=True)
    b = collect(model, [tiny_batch("llama", seed=1)], progress=False, moments=True)
    both = collect(model, [tiny_batch("llama", seed=0), tiny_batch("llama", seed=1)], progress=False, moments=True)
    merged = a.merge(b).moments
    for g, h in zip(merged.gram, both.moments.gram):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-10)
    merged.save(tmp_path / "m.safetensors")
    back = OutputMoments.load(tmp_path / "m.safetensors")
    assert all(torch.equal(g, h) for g, h in zip(back.gram, merged.gram))
    saved = (tmp_path / "m.safetensors").read_bytes()  # a failed save keeps the file there (it was truncated)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(OSError, match=r"^\[Errno 28\] moments: cannot write .*m\.safetensors \(No space left"):
            a.moments.save(tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == saved and os.listdir(tmp_path) == ["m.safetensors"]
    assert all(torch.equal(g, h) for g, h in zip(back.projection, merged.projection))
    # the sequences they hold: both collections' (3 + 3), read back; with one side unrecorded, unknown
    assert torch.equal(back.sequences, both.moments.sequences) and len(set(back.sequences.tolist())) == 6
    assert a.moments.merge(OutputMoments(b.moments.gram, b.moments.projection)).sequences is None
    f32 = collect(model, [tiny_batch("llama", seed=0)], progress=False, moments="float32").moments
    assert f32.gram[0].dtype == torch.float32 and f32.nbytes < a.moments.nbytes
    torch.testing.assert_close(f32.gram[0].double(), a.moments.gram[0], rtol=1e-5, atol=1e-4)
    # a site without moments on both sides (a layer left without heads) merges to none
    none = OutputMoments([None, *a.moments.gram[1:]], a.moments.projection)
    merged = none.merge(OutputMoments([None, *b.moments.gram[1:]], b.moments.projection))
    assert merged.gram[0] is None and torch.equal(merged.gram[1], a.moments.gram[1] + b.moments.gram[1])


def _damped_loss(gram, proj, keep, damping):
    """The damped least-squares objective at its optimum for the kept columns (brute force)."""
    d = gram.shape[0] - 1
    g = gram.double() / gram[d, d]
    w = proj.double()
    s = torch.tensor(list(keep) + [d])
    a = g[s][:, s].clone()
    a.diagonal()[: len(keep)] += damping * g.diagonal()[:d].mean()
    opt = w @ g[:, s] @ torch.linalg.inv(a)
    return float(torch.einsum("od,de,oe->", w, g, w) - torch.einsum("os,st,ot->", opt, a, opt))


def _check_greedy(gram, proj, units, width) -> float:
    """Greedy removal takes the unit whose removal costs least by brute force at every step,
    and says its cost; returns the energy."""
    from headprune.ranking.reconstruction import greedy_removal

    order, costs, energy = greedy_removal(gram, proj, units, damping=1e-2)
    removed = []
    for u, cost in zip(order, costs):
        keep_of = lambda extra: [c for c in range(width) if all(c not in units[r] for r in removed + extra)]  # noqa: E731
        before = _damped_loss(gram, proj, keep_of([]), 1e-2)
        after = {v: _damped_loss(gram, proj, keep_of([v]), 1e-2) for v in range(len(units)) if v not in removed}
        assert min(after, key=after.get) == u
        assert cost == pytest.approx(after[u] - before, rel=1e-6, abs=1e-12)
        removed.append(u)
    assert greedy_removal(gram, proj, units, damping=1e-2, energy=False) == (order, costs, None)  # the order alone
    return energy


@pytest.mark.parametrize("gqa", ["query", "group"])
def test_greedy_removal_takes_the_cheapest_unit_at_every_step(gqa):
    from headprune.ranking.reconstruction import site_units

    model, batches, scores = _setup("llama", n=4)
    for i in range(2):
        gram, proj = scores.moments.gram[i], scores.moments.projection[i]
        units = site_units(4, 2, 8, gqa)
        _check_greedy(gram, proj, units, 32)


def _random_moments(d, out, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.cat([x + torch.randn(d, generator=gen, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    return x.t() @ x, torch.randn(out, d + 1, generator=gen)


def test_greedy_removal_with_columns_outside_every_unit_matches_brute_force():
    """Scattered units that leave some columns always kept; ties go to the first unit."""
    from headprune.ranking.reconstruction import greedy_removal

    gram, proj = _random_moments(23, 7, 200, 0)
    units = [[0, 5, 9], [1, 2, 20], [22, 3, 4], [10, 11, 12], [15, 16, 17]]  # 6-8, 13, 14, 18, 19, 21 always kept
    energy = _check_greedy(gram, proj, units, 23)
    g = gram / gram[-1, -1]
    assert energy == pytest.approx(float(torch.einsum("od,de,oe->", proj.double(), g, proj.double())), rel=1e-5)
    same = torch.eye(7, dtype=torch.float64)  # three identical units: removed in their given order
    assert greedy_removal(same, torch.ones(3, 7), [[4, 5], [0, 1], [2, 3]], damping=0.0)[0] == [0, 1, 2]


def test_second_moments_of_wide_inputs_match_float64():
    """Inputs of 256 columns and more take the symmetric blocked product."""
    from headprune.hf.collection import _add_gram_

    for d in (255, 300):
        rows = torch.randn(700, d, dtype=torch.float64)
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        _add_gram_(gram, rows[:400])
        _add_gram_(gram, rows[400:])
        full = torch.cat([rows, torch.ones(700, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(gram, full.t() @ full, rtol=1e-12, atol=1e-9)


def test_greedy_removal_refuses_units_of_different_sizes():
    from headprune.ranking.reconstruction import greedy_removal

    gram = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="units: expected blocks of one size, got sizes \\[1, 3\\]"):
        greedy_removal(gram, torch.ones(2, 5), [[0], [1, 2, 3]])
    with pytest.raises(ValueError, match="units: expected disjoint blocks of the 4 input columns"):
        greedy_removal(gram, torch.ones(2, 5), [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="units: expected disjoint blocks"):
        greedy_removal(gram, torch.ones(2, 5), [[3, 4]])  # 4 is the constant


def test_reconstruction_score_ranks_within_and_across_sites():
    from headprune import select_heads

    model, batches, scores = _setup("llama", n=4)
    v = __import__("headprune.ranking.reconstruction", fromlist=["x"]).reconstruction_score(scores)
    per_layer = select_heads(scores, ratio=0.5, score="reconstruction")
    assert per_layer == {i: sorted(v[i].argsort()[:2].tolist()) for i in range(2)}
    group = select_heads(scores, ratio=0.5, score="reconstruction", gqa="group")
    assert all(hs in ([0, 1], [2, 3]) for hs in group.values())
    with pytest.raises(ValueError, match="needs second moments"):
        select_heads(collect(model, batches, progress=False), ratio=0.5, score="reconstruction")


def test_reconstruction_ranking_follows_the_refits_damping():
    """The score ranks by the errors of the refit the heads will be removed with: the
    damping given to select_heads is the one the score's greedy removal uses."""
    from headprune import select_heads
    from headprune.ranking.reconstruction import reconstruction_score

    _, _, scores = _setup("llama", n=4)
    picks = {}
    for damping in (1e-2, 1e3):
        picks[damping] = select_heads(scores, ratio=0.5, score="reconstruction", scope="per_layer", damping=damping)
        by_hand = reconstruction_score(scores, "query", damping)
        assert picks[damping] == select_heads(scores, ratio=0.5, score=by_hand, order="low", scope="per_layer")
    assert picks[1e-2] != picks[1e3]  # on this model the damping changes the choice
    assert select_heads(scores, ratio=0.5, score="reconstruction", scope="per_layer") == picks[1e-2]  # the default
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="damping: expected a finite non-negative number"):
            select_heads(scores, ratio=0.5, score="reconstruction", damping=bad)


@pytest.mark.parametrize("first", [{}, {"reconstruct": True}])
def test_a_refit_over_an_active_mask_keeps_its_heads_removed(first):
    """A second masking with a refit treats the heads an earlier mask zeroed as removed: it
    neither writes their columns back nor reads them (iterative pruning masks this way)."""
    model, batches, scores = _setup("llama")
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    snap = ModelSnapshot(model)
    older = mask_heads(model, {0: [1]}, **({"reconstruct": scores} if first else {}))
    d, hq = head_dim(sites[0], adapter), head_counts(sites[0], adapter)[0]
    w, b = sites[0].o.weight.detach().clone(), sites[0].o.bias
    newer = mask_heads(model, {0: [3]}, reconstruct=scores)
    o = sites[0].o.weight.detach()
    assert torch.equal(o[:, 1 * d:2 * d], torch.zeros_like(o[:, :d]))
    assert torch.equal(o[:, 3 * d:4 * d], torch.zeros_like(o[:, :d]))
    keep = kept_columns(hq, d, [1, 3])
    cols, bias = refit_output(w, None if b is None else b.detach(), scores.moments.gram[0], keep, damping=DEFAULT_DAMPING)
    torch.testing.assert_close(o[:, keep], cols, rtol=1e-6, atol=1e-7)
    newer.restore()
    older.restore()
    assert snap.differences() == []


def test_columns_that_saw_only_zeros_get_a_finite_ridge():
    """The ridge's floor was ``damping`` times float64's smallest normal number: subnormal, its
    inverse infinite, so kept columns that saw only zeros came back NaN (``anchor="zero"``) and
    removing heads that output nothing cost inf in the greedy instead of nothing."""
    from headprune.ranking.reconstruction import greedy_removal, site_units
    from headprune.stats.moments import ridge

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    x[:, :6] = 0  # heads 0 and 1 (head size 3) never output anything
    xt = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
    assert float(ridge(xt.T @ xt, 1e-2, 6)) == 1e-2
    cols, _ = refit_output(w, b, xt.T @ xt, kept_columns(4, 3, [2, 3]), damping=1e-2, anchor="zero")
    torch.testing.assert_close(cols, torch.zeros_like(cols), rtol=0, atol=1e-12)  # the ridge takes them to 0
    xt[:, :12] = 0
    _, costs, _ = greedy_removal(xt.T @ xt, torch.cat([w, b[:, None]], 1), site_units(4, 4, 3, "query"), damping=1e-2)
    assert all(0 <= c < 1e-20 for c in costs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refit_without_the_bias_is_the_least_squares_fit_of_the_kept_columns_alone(family):
    """fit_bias=False: the kept columns reproduce W x (the bias left as it is, none staying none)."""
    model, batches, scores = _setup(family, n=6)
    adapter = get_adapter(model)
    for site, x in zip(resolve_sites(model, adapter), _o_inputs(model, batches)):
        keep = kept_columns(head_counts(site, adapter)[0], head_dim(site, adapter), [1])
        w = site.o.weight.detach().double()
        w = w.t() if adapter.conv1d else w
        want = torch.linalg.lstsq(x[:, keep], x @ w.T, driver="gelsd").solution.T
        cols, bias = refit_output(site.o.weight.detach(), site.o.bias, scores.moments.gram[site.index], keep,
                                  damping=0.0, conv1d=adapter.conv1d, fit_bias=False)
        got = (cols.t() if adapter.conv1d else cols).double()
        res = lambda m: (x[:, keep] @ m.T - x @ w.T).pow(2).sum()  # noqa: E731
        assert res(got) <= res(want) * (1 + 1e-6) + 1e-9
        assert bias is None if site.o.bias is None else torch.equal(bias, site.o.bias.detach().double())


@pytest.mark.parametrize("family", ["mistral", "t5"])
def test_refit_without_the_bias_keeps_a_plain_config(family, tmp_path):
    """A family whose config declares no attention bias: the uniform layout refit without the
    bias masks and prunes to the same function, creates no bias and reloads with plain
    from_pretrained bit-exactly."""
    import json

    import transformers

    model, batches, scores = _setup(family)
    heads = {i: ([2, 3] if family == "mistral" else [1]) for i in range(scores.num_sites)}
    batch = tiny_batch(family, seed=5)
    with torch.no_grad(), mask_heads(model, heads, reconstruct=scores, refit_bias=False):
        masked = _first(model(**batch))
        assert all(s.o.bias is None for s in resolve_sites(model))
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads, reconstruct=scores, refit_bias=False)
    assert all(s.o.bias is None for s in resolve_sites(pruned))
    with torch.no_grad():
        out = _first(pruned(**batch))
    assert_same_function({"masked": masked, "pruned": out}, float64_output(pruned, batch, lambda m, b: _first(m(**b))))
    save_pruned(pruned, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "headprune.json").read_text())["plain_loadable"]
    plain = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(_first(plain(**batch)), _first(pruned.base_model(**batch)) if family == "mistral" else out)
    with pytest.raises(ValueError, match="refit_bias: False leaves the bias out"):
        mask_heads(model, heads, compensate=scores, refit_bias=False)
    with pytest.raises(TypeError, match="refit_bias: expected a bool"):
        mask_heads(model, heads, reconstruct=scores, refit_bias=0)
