"""Output statistics gathered by collect, and mean compensation of removed heads
(``compensate=`` of mask_heads / prune_heads), against direct float64 computations."""

import copy
import json

import pytest
import torch
import transformers

from hf_tiny import FAMILIES, tiny_batch, tiny_model
from model_snapshot import ModelSnapshot
from numerics import assert_same_function, errors, float64_output

from headprune import HeadScores
from headprune.hf import collect, load_pruned, mask_heads, prune_heads, resolve_sites, save_pruned
from headprune.hf.adapters import get_adapter, head_counts, head_dim

FAMS = [f for f in FAMILIES if f != "vit"] + ["vit"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _o_inputs(model, batches):
    """Per site, the o projection inputs of every valid token, by direct hooks (float64)."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    seen = [[] for _ in sites]
    current = {}

    def hook(i):
        def f(module, args):
            x = args[0].detach().double()
            key = sites[i].block.padding_key
            m = current.get(key)
            if m is not None and x.dim() == 3:
                x = x[m[:, m.shape[1] - x.shape[1]:].bool()]
            seen[i].append(x.reshape(-1, x.shape[-1]))
        return f

    hs = [s.o.register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)]
    try:
        with torch.no_grad():
            for b in batches:
                current.clear()
                current.update({k: b.get(k) for k in ("attention_mask", "decoder_attention_mask")})
                model(**b)
    finally:
        for h in hs:
            h.remove()
    return [torch.cat(x) for x in seen]


@pytest.mark.parametrize("family", FAMS)
def test_output_statistics_match_direct_hooks(family):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    # fused=False: the model's own attention, so its o-proj inputs are those of the hooks
    scores = collect(model, batches, progress=False, fused=False)
    ref = _o_inputs(model, batches)
    adapter = get_adapter(model)
    mean = scores.output_mean()
    for i, s in enumerate(resolve_sites(model, adapter)):
        hq, d = head_counts(s, adapter)[0], head_dim(s, adapter)
        x = ref[i].view(-1, hq, d)
        assert torch.equal(scores.outputs[i, :hq, :d, 0], torch.full((hq, d), float(x.shape[0]), dtype=torch.float64))
        torch.testing.assert_close(mean[i, :hq, :d], x.mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(scores.outputs[i, :hq, :d, 2], (x * x).sum(0), rtol=1e-5, atol=1e-8)


def _mean_replaced(model, heads, scores, batch):
    """Reference: the removed heads' o-input columns overwritten by their mean."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    mean = scores.output_mean()
    hs = []
    for layer, remove in heads.items():
        d = head_dim(sites[layer], adapter)

        def f(module, args, layer=layer, remove=remove, d=d):
            x = args[0].clone()
            for h in remove:
                x[..., h * d:(h + 1) * d] = mean[layer, h, :d].to(x.dtype)
            return (x, *args[1:])
        hs.append(sites[layer].o.register_forward_pre_hook(f))
    try:
        with torch.no_grad():
            return _first(model(**batch))
    finally:
        for h in hs:
            h.remove()


def _heads(family):
    return {0: [1, 3], 1: [0]} if family != "t5" else {0: [1, 3], 3: [0], 5: [2]}


@pytest.mark.parametrize("family", FAMS)
def test_compensated_mask_and_prune_equal_mean_replacement(family):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    scores = collect(model, batches, progress=False)
    heads = _heads(family)
    batch = tiny_batch(family, seed=5)
    want = float64_output(model, batch, lambda m, b: _mean_replaced(m, heads, scores, b))
    snap = ModelSnapshot(model)
    with torch.no_grad():
        with mask_heads(model, heads, compensate=scores):
            masked = _first(model(**batch))
        zeroed = None
        with mask_heads(model, heads):
            zeroed = _first(model(**batch))
    assert snap.differences() == []
    assert errors({"zeroed": zeroed}, want)["zeroed"] > 1e-4  # compensation changes something
    pruned = copy.deepcopy(model)
    prune_heads(pruned, heads, compensate=scores)
    with torch.no_grad():
        out = _first(pruned(**batch))
    assert_same_function({"masked": masked, "pruned": out}, want)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_compensated_prune_saves_and_reloads_exactly(family, tmp_path):
    model = tiny_model(family)
    scores = collect(model, [tiny_batch(family)], progress=False)
    heads = {0: [1], 1: [1]}  # uniform: plain-loadable unless a bias had to be added
    prune_heads(model, heads, compensate=scores)
    save_pruned(model, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    batch = tiny_batch(family, seed=3)
    with torch.no_grad():
        assert torch.equal(_first(back(**batch)), _first(model(**batch)))
    added = get_adapter(model).model_type == "llama"
    meta = json.loads((tmp_path / "m" / "headprune.json").read_text())
    assert meta["o_bias"] == ([0, 1] if added else [])
    if added:  # the llama layout is uniform, yet plain loading must fail loudly, not drop the biases
        assert meta["plain_loadable"] is False
        with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin"):
            transformers.AutoModel.from_pretrained(tmp_path / "m")


def test_compensate_errors_are_named():
    model = tiny_model("llama")
    scores = collect(model, [tiny_batch("llama")], progress=False)
    no_out = HeadScores(scores.stats, scores.num_heads, scores.num_kv_heads, scores.head_dim, scores.names, scores.kinds)
    snap = ModelSnapshot(model)
    with pytest.raises(ValueError, match="compensate: these scores have no output statistics"):
        mask_heads(model, {0: [1]}, compensate=no_out)
    with pytest.raises(TypeError, match="compensate: expected HeadScores"):
        prune_heads(model, {0: [1]}, compensate={"a": 1})
    other = collect(tiny_model("llama", num_attention_heads=8, num_key_value_heads=2), [tiny_batch("llama")], progress=False)
    with pytest.raises(ValueError, match="compensate: the scores were collected on another head layout"):
        prune_heads(model, {0: [1]}, compensate=other)
    empty = copy.deepcopy(scores)
    empty.outputs[0, 1] = 0
    with pytest.raises(ValueError, match="compensate: site .* heads \\[1\\] have no output statistics"):
        prune_heads(model, {0: [1]}, compensate=empty)
    assert snap.differences() == []


def test_output_statistics_serialise_merge_and_subset():
    model = tiny_model("t5")
    a = collect(model, [tiny_batch("t5", seed=0)], progress=False)
    b = collect(model, [tiny_batch("t5", seed=1)], progress=False)
    both = collect(model, [tiny_batch("t5", seed=0), tiny_batch("t5", seed=1)], progress=False)
    torch.testing.assert_close(a.merge(b).outputs, both.outputs, rtol=1e-12, atol=1e-12)
    back = HeadScores.from_dict(a.to_dict())
    assert torch.equal(back.outputs, a.outputs)
    sub = a.block("cross")
    idx = [i for i, k in enumerate(a.kinds) if k == "cross"]
    assert torch.equal(sub.outputs, a.outputs[idx])
    with pytest.raises(ValueError, match="outputs: expected a"):
        HeadScores(a.stats, a.num_heads, a.num_kv_heads, a.head_dim, a.names, a.kinds, outputs=torch.zeros(2))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_compensated_mask_saves_and_reloads_plainly_where_the_config_declares_the_bias(tmp_path, family):
    """A mask keeps the shapes the config describes; the output biases compensation creates are
    declared where the config can (llama's attention_bias, with zero q/k/v biases), so plain
    from_pretrained loads the directory; where it cannot (mistral), plain loading stops and
    load_pruned reads it."""
    model = tiny_model(family)
    scores = collect(model, [tiny_batch(family)], progress=False)
    batch = tiny_batch(family, seed=3)
    with mask_heads(model, {0: [1]}, compensate=scores):
        with torch.no_grad():
            want = _first(model(**batch))
        save_pruned(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "headprune.json").read_text())
    back = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(_first(back(**batch)), want)
    if family == "llama":
        assert meta["o_bias"] == [] and meta["plain_loadable"] is True
        plain = transformers.AutoModel.from_pretrained(tmp_path / "m").eval()
        assert plain.config.attention_bias is True
        with torch.no_grad():
            assert torch.equal(_first(plain(**batch)), want)
    else:
        assert meta["o_bias"] == [0] and meta["plain_loadable"] is False
        with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin"):
            transformers.AutoModel.from_pretrained(tmp_path / "m")


def test_a_dropped_compensated_mask_is_still_saved_with_its_biases(tmp_path):
    """The record of what a mask changed lives on the model, not in the handle the caller may
    drop: what was evaluated is what is saved and reloaded."""
    import gc

    model = tiny_model("llama")
    scores = collect(model, [tiny_batch("llama")], progress=False)
    batch = tiny_batch("llama", seed=3)
    mask_heads(model, {0: [1], 1: [0]}, compensate=scores)  # the handle is dropped at once
    gc.collect()
    with torch.no_grad():
        want = _first(model(**batch))
    with pytest.raises(ValueError, match="already masked"):
        mask_heads(model, {0: [1]})
    save_pruned(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "headprune.json").read_text())
    assert meta["plain_loadable"] is True and meta["original_config"]["attention_bias"] is True  # declared
    with torch.no_grad():
        assert torch.equal(_first(load_pruned(tmp_path / "m")(**batch)), want)
        assert torch.equal(_first(transformers.AutoModel.from_pretrained(tmp_path / "m").eval()(**batch)), want)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_variance_score_is_the_variance_each_head_adds(family):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    scores = collect(model, batches, progress=False)
    got = scores.score("variance")
    adapter = get_adapter(model)
    for i, (s, x) in enumerate(zip(resolve_sites(model, adapter), _o_inputs(model, batches))):
        hq, d = head_counts(s, adapter)[0], head_dim(s, adapter)
        w = s.o.weight.detach().double()
        w = w if adapter.conv1d else w.T  # [in, out]
        for h in range(hq):
            xs = x[:, h * d:(h + 1) * d]
            want = (xs.var(0, unbiased=False) * (w[h * d:(h + 1) * d] ** 2).sum(1)).sum()
            torch.testing.assert_close(got[i, h], want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_masks_on_the_same_weights_restore_newest_first(family):
    """Each mask keeps what the masks before it had written, so two compensated masks of one
    layer restore newest first: the older one first is refused and changes nothing; in order,
    the model is back bit for bit (on llama the first mask created the bias)."""
    model = tiny_model(family)
    scores = collect(model, [tiny_batch(family)], progress=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    older = mask_heads(model, {0: [1]}, compensate=scores)
    other_layer = mask_heads(model, {1: [0]})
    newer = mask_heads(model, {0: [2]}, compensate=scores)
    masked = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"restore: 1 mask\(s\) applied after this one changed the same weights"):
        older.restore()
    assert masked.keys() == model.state_dict().keys()
    assert all(torch.equal(v, masked[k]) for k, v in model.state_dict().items())
    other_layer.restore()  # another layer's weights: any order
    newer.restore()
    older.restore()
    assert original.keys() == model.state_dict().keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_refit_bias_keeps_its_trainable_flag(family):
    """prune_heads gave an existing output-projection bias the weight's requires_grad: a bias
    trained alone stopped training, a frozen one started. A bias the refit creates follows the
    weight, masked and pruned alike."""
    model = tiny_model(family)
    scores = collect(model, [tiny_batch(family)], moments=True, progress=False)
    o = resolve_sites(model)[0].o
    for p in model.parameters():
        p.requires_grad_(False)
    had_bias = o.bias is not None
    if had_bias:
        o.bias.requires_grad_(True)
    for how in ("mask", "prune"):
        m = copy.deepcopy(model)
        (mask_heads if how == "mask" else prune_heads)(m, {0: [1]}, compensate=scores)
        o2 = resolve_sites(m)[0].o
        assert (o2.bias.requires_grad, o2.weight.requires_grad) == (had_bias, False), how


def test_an_infinite_mean_output_is_refused_by_the_compensation():
    """An overflowing value row wrote infinite weights into the output bias (the refit refused
    the same statistics)."""
    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.bias[0] = float("inf")  # head 0 of layer 1: +inf in one dimension
    scores = collect(model, [tiny_batch("bert", pad=False)], moments=True, progress=False)
    before = ModelSnapshot(model)
    with pytest.raises(ValueError, match=r"^compensate: site .*1.* heads \[0\]: their mean output is infinite"):
        mask_heads(model, {1: [0]}, compensate=scores)
    before.assert_same()
