"""The joint value/output refit: its moments against a float64 computation from the attention
probabilities, its reduction to the output refit with no sweep, its error falling with every
sweep and below the output refit's on the calibration tokens, masked == pruned == reloaded,
exact restore, and named errors."""

import copy

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model
from model_snapshot import ModelSnapshot
from numerics import assert_same_function, float64_output
from test_compensate import _first

from headprune.hf import collect, load_pruned, mask_heads, prune_heads, resolve_sites, save_pruned
from headprune.hf.adapters import get_adapter, head_counts, head_dim
from headprune.hf.values import collect_values
from headprune.prune.reconstruct import kept_columns, refit_output
from headprune.prune.values import refit_values

FAMILIES = ["bert", "opt", "distilbert", "vit", "t5"]
HEADS = {"t5": {0: [1], 3: [0, 2], 5: [1]}}


def _heads(family):
    return HEADS.get(family, {0: [1], 1: [0, 2]})


def _setup(family, n=4):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(n)]
    return model, batches, collect(model, batches, progress=False, fused=False, moments=True)


def _z_and_y(model, batches, layer, kept):
    """Float64 ``z_K`` and ``y`` of one site's valid tokens, from the eager attention's
    probabilities and the value projection's input."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("eager")
    site = resolve_sites(model)[layer]
    got = {}
    hooks = [site.sub(site.block.v).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0])),
             site.module.register_forward_hook(lambda m, a, o: got.__setitem__("a", o[1])),
             site.o.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))]
    zs, ys = [], []
    with torch.no_grad():
        for b in batches:
            model(**b)
            z = torch.einsum("bhst,btc->bshc", got["a"][:, kept], got["x"]).flatten(2)
            valid = b["attention_mask"].bool()
            zs.append(z[valid])
            ys.append(got["y"][valid])
    for h in hooks:
        h.remove()
    return torch.cat(zs), torch.cat(ys)


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_moments_match_float64_attention_probabilities(family):
    model, batches, _ = _setup(family)
    heads = {1: [0, 2]}
    vm = collect_values(model, batches, heads)
    kept = vm.kept[1]
    z, y = _z_and_y(model, batches, 1, kept)
    zt = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    scale = (zt.T @ zt).abs().max()
    torch.testing.assert_close(vm.gram[1], zt.T @ zt, rtol=1e-5, atol=1e-5 * float(scale))
    torch.testing.assert_close(vm.cross[1], y.T @ zt, rtol=1e-5, atol=1e-5 * float((y.T @ zt).abs().max()))


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_no_sweep_is_the_output_refit(family):
    # both sides from one float64 model, so the two moment paths' float32 rounding (which the
    # solves amplify, differently by instruction set) is not compared; what differs is where
    # the ridge damping applies, to value-space moments on one side (about 1e-5 of the largest)
    model, batches, _ = _setup(family)
    model = copy.deepcopy(model).double()
    scores = collect(model, batches, progress=False, fused=False, moments=True)
    heads = {0: [1], 1: [0, 2]}
    vm = collect_values(model, batches, heads)
    adapter = get_adapter(model)
    for layer, hs in heads.items():
        site = resolve_sites(model, adapter)[layer]
        d, v = head_dim(site, adapter), site.sub(site.block.v)
        kept = vm.kept[layer]
        cols, bias = refit_output(site.o.weight.detach(), site.o.bias, scores.moments.gram[layer],
                                  kept_columns(head_counts(site, adapter)[0], d, hs))
        got_cols, got_bias, rows, errors = refit_values(site.o.weight.detach(), v.weight.detach(), v.bias.detach(),
                                                        vm.gram[layer], vm.cross[layer], kept, d, sweeps=0)
        assert len(errors) == 1
        wv, bv = v.weight.detach().double(), v.bias.detach().double()
        for j, h in enumerate(kept):
            want = cols[:, j * d:(j + 1) * d].double() @ wv[h * d:(h + 1) * d]
            have = got_cols[:, j * d:(j + 1) * d] @ rows[j * d:(j + 1) * d]
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        bv_k = torch.cat([bv[h * d:(h + 1) * d] for h in kept])
        want_bias = bias.double() + cols.double() @ bv_k
        torch.testing.assert_close(got_bias + got_cols @ bv_k, want_bias, rtol=1e-4, atol=1e-4)


def _site_errors(model, batches, heads, **removal):
    """Squared error of each pruned site's output projection against the unpruned model's,
    on the calibration batches (the removal masked, then restored)."""
    sites = resolve_sites(model)
    cap = {}
    hooks = [sites[i].o.register_forward_hook(lambda m, a, o, i=i: cap.setdefault(i, []).append(o.double()))
             for i in heads]
    with torch.no_grad():
        for b in batches:
            model(**b)
        base, cap = cap, {}
        with mask_heads(model, heads, **removal):
            for b in batches:
                model(**b)
    for h in hooks:
        h.remove()
    return {i: sum(((x - y) ** 2).sum().item() for x, y in zip(base[i], cap[i])) for i in heads}


@pytest.mark.parametrize("family", FAMILIES)
def test_value_refit_fits_the_calibration_better_than_the_output_refit(family):
    model, batches, scores = _setup(family, n=6)
    heads = _heads(family)
    vm = collect_values(model, batches, heads)
    refit = _site_errors(model, batches, heads, reconstruct=scores, damping=1e-4)
    joint = _site_errors(model, batches, heads, reconstruct=scores, damping=1e-4, values=vm)
    first = min(heads)  # its input is the unpruned model's: the fit is exactly what is measured
    assert joint[first] < refit[first]
    assert sum(joint.values()) < sum(refit.values())


def test_damped_error_never_rises():
    model, batches, _ = _setup("bert", n=6)
    vm = collect_values(model, batches, {0: [0, 3]})
    site = resolve_sites(model)[0]
    v = site.sub(site.block.v)
    errors = refit_values(site.o.weight.detach(), v.weight.detach(), v.bias.detach(), vm.gram[0], vm.cross[0],
                          vm.kept[0], head_dim(site, get_adapter(model)), sweeps=6)[3]
    assert errors[-1] < errors[0]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("family", FAMILIES)
def test_value_refit_mask_equals_prune_and_restores_exactly(family, tmp_path):
    model, batches, scores = _setup(family)
    heads = _heads(family)
    vm = collect_values(model, batches, heads)
    batch = tiny_batch(family, seed=7)
    snap = ModelSnapshot(model)
    with torch.no_grad():
        original = _first(model(**batch))
        with mask_heads(model, heads, reconstruct=scores, values=vm):
            masked = _first(model(**batch))
        assert torch.equal(_first(model(**batch)), original)
    assert snap.differences() == []
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads, reconstruct=scores, values=vm)
    with torch.no_grad():
        out = _first(pruned(**batch))
    assert_same_function({"masked": masked, "pruned": out}, float64_output(pruned, batch, lambda m, b: _first(m(**b))))
    save_pruned(pruned, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(_first(back(**batch)), out)


def test_value_refit_errors_are_named():
    model, batches, scores = _setup("bert")
    vm = collect_values(model, batches, {0: [1]})
    snap = ModelSnapshot(model)
    with pytest.raises(ValueError, match="values: the value refit extends the least-squares refit"):
        mask_heads(model, {0: [1]}, values=vm)
    with pytest.raises(ValueError, match=r"values: collected for heads \{0: \[1\]\}"):
        prune_heads(model, {0: [2]}, reconstruct=scores, values=vm)
    with pytest.raises(TypeError, match="values: expected the ValueMoments of collect_values or None, got dict"):
        prune_heads(model, {0: [1]}, reconstruct=scores, values={0: [1]})
    with pytest.raises(ValueError, match=r"values: the value refit's moments need [0-9,]+ bytes \([0-9.]+ MiB; "
                                         r"max_bytes=1,000\)"):  # a small limit read as 0.0 GiB
        collect_values(model, batches, {0: [1]}, max_bytes=1000)
    with mask_heads(model, {1: [0]}), pytest.raises(ValueError, match="model: a mask_heads handle is active"):
        collect_values(model, batches, {0: [1]})  # the moments were the masked model's
    assert snap.differences() == []
    for family, why in (("llama", "shares 2 value heads among 4 query heads"), ("gpt2", "fused q/k/v")):
        other = tiny_model(family)
        with pytest.raises(ValueError, match=f"values: the value refit needs .*{why}"):
            collect_values(other, [tiny_batch(family)], {0: [1]})
    with pytest.raises(ValueError, match="sweeps: expected a non-negative int"):
        site = resolve_sites(model)[0]
        v = site.sub(site.block.v)
        refit_values(site.o.weight, v.weight, v.bias, vm.gram[0], vm.cross[0], vm.kept[0], 8, sweeps=-1)


def test_weights_on_another_device_than_the_moments_are_refit_where_the_moments_are():
    """A CUDA model's value moments are kept on the CPU: the refit mixed the two (CUDA refuses
    that) on the default removal of encoders on a GPU. The weights now go to the moments' device,
    under an emulation of the device rule (no GPU here), and the result is the same."""
    from device_rule import DeviceRule

    torch.manual_seed(0)
    heads, d, hid, out, kept = 4, 2, 8, 8, [0, 2, 3]
    wo, wv, bv = torch.randn(out, heads * d), torch.randn(heads * d, hid), torch.randn(heads * d)
    z = torch.cat([torch.randn(50, len(kept) * hid, dtype=torch.float64), torch.ones(50, 1, dtype=torch.float64)], 1)
    gram, cross = z.t() @ z, torch.randn(out, 50, dtype=torch.float64) @ z
    want = refit_values(wo, wv, bv, gram, cross, kept, d)
    with DeviceRule() as rule:
        rule.tag(wo, wv, bv)
        with pytest.raises(RuntimeError, match="same device"):  # the emulation refuses what CUDA does
            torch.zeros(hid, hid).add_(wv.t() @ wv)
        got = refit_values(wo, wv, bv, gram, cross, kept, d)
        assert [rule.device(t) for t in got[:3]] == ["cpu"] * 3
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)


def test_exported_where_users_look():
    import headprune

    assert headprune.collect_values is collect_values and "collect_values" in headprune.__all__


def test_the_value_refit_without_damping_takes_the_least_squares_solution():
    """With damping 0 a head's value-input moments can be singular (tiny BERT's LayerNorm bias
    is 0, so its value inputs lie in a hyperplane): the sweeps' solve and Cholesky raised,
    while the output refit takes the minimum-norm least-squares solution as documented."""
    model = tiny_model("bert")
    batches = [tiny_batch("bert", seed=s, seq=16) for s in range(12)]
    scores = collect(model, batches, progress=False, moments=True)
    vm = collect_values(model, batches, {1: [1]})
    site = resolve_sites(model)[1]
    g, hid = vm.gram[1].double(), model.config.hidden_size
    blocks = [g[j * hid:(j + 1) * hid, j * hid:(j + 1) * hid] for j in range(len(vm.kept[1]))]
    assert any(int(torch.linalg.cholesky_ex(b)[1]) != 0 for b in blocks)  # the case Cholesky refuses
    with mask_heads(model, {1: [1]}, reconstruct=scores, values=vm, damping=0.0):
        assert torch.isfinite(site.o.weight).all() and torch.isfinite(site.sub(site.block.v).weight).all()
        out = _first(model(**batches[0]))
    full = _first(model(**batches[0]))
    assert float((out - full).square().mean()) < 1e-5  # a refit, not a blow-up of the near-singular solve


def test_the_value_refit_without_damping_stays_a_descent():
    """Fewer calibration tokens than the kept heads' dimensions, damping 0: the moments' float32
    rounding made them indefinite, and the descent ran off (errors up to 7.5e5, an output
    1e6 times the output refit's error). A least ridge and uphill steps refused keep it a
    descent, no worse than the output refit on the tokens it was fitted to."""
    model = tiny_model("distilbert")
    batches = [tiny_batch("distilbert", seed=s) for s in range(4)]
    heads = {0: [1], 1: [0, 2]}
    scores = collect(model, batches, progress=False, moments=True)
    vm = collect_values(model, batches, heads)
    site = resolve_sites(model)[1]
    v = site.sub(site.block.v)
    errors = refit_values(site.o.weight.detach(), v.weight.detach(), v.bias.detach(), vm.gram[1], vm.cross[1],
                          vm.kept[1], head_dim(site, get_adapter(model)), damping=0.0)[3]
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(errors, errors[1:])), errors
    with torch.no_grad():
        full = [model(**b).last_hidden_state for b in batches]
        err = {}
        for name, values in (("output", None), ("values", vm)):
            with mask_heads(model, heads, reconstruct=scores, values=values, damping=0.0):
                err[name] = sum(float((model(**b).last_hidden_state - f).square().sum()) for b, f in zip(batches, full))
    assert err["values"] <= 1.1 * err["output"], err
