"""Numerical edge cases of collection at model level (the op-level ones are in test_ops.py).

Tolerances, in nats of mean entropy per head:
- half precision: the flash-attention rule. headprune's error against the float32 model is
  at most twice that of a naive same-dtype computation (the eager method: the family's own
  softmax in that dtype, probabilities rounded to it) plus 1e-6, and at most 1e-4 (fp16) /
  1e-3 (bf16). Statistics are float64 whatever the model dtype.
- everything else is float32 against a float64 reference: 1e-6 or tighter.
"""

import importlib

import pytest
import torch
import transformers

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect

ops_mod = importlib.import_module("headprune.core.ops")

HALF_BOUND = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["llama", "bert"])  # Gemma 2 in fp16: test_gemma2_soft_capping_is_applied
def test_half_precision_models_match_float32(family, dtype):
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    ref = collect(tiny_model(family), batches, progress=False).entropy
    model = tiny_model(family).to(dtype)
    scores = collect(model, batches, progress=False)
    naive = collect(model, batches, method="eager", progress=False).entropy
    assert scores.stats.dtype == torch.float64 and torch.isfinite(scores.entropy).all()
    err, naive_err = (scores.entropy - ref).abs().max().item(), (naive - ref).abs().max().item()
    assert err <= 2 * naive_err + 1e-6, (err, naive_err)
    assert err <= HALF_BOUND[dtype], err


def _additive_inf(mask_fn):
    """The model's own mask function, returning ``0 / -inf`` floats instead of booleans."""

    def fn(*args, **kwargs):
        mask = mask_fn(*args, **kwargs)
        if mask is None or mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    return fn


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_neg_inf_additive_masks_and_fully_masked_rows(monkeypatch, family, padding):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    batch = tiny_batch(family)
    if padding == "left":  # padded queries first: in a causal model their rows see no key at all
        batch = {k: v.flip(-1) for k, v in batch.items()}
    model = tiny_model(family)
    ref = collect(model, [batch], progress=False)
    # The collection registers its wrapper's mask factory only where none is set: this one
    # (sdpa's, made additive with -inf) is used and left for the monkeypatch to remove.
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "headprune_sdpa",
                        _additive_inf(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]))
    seen = []
    real, real_fused = ops_mod.entropy_stats_from_qk_accumulate_, ops_mod.attention_stats_accumulate_
    monkeypatch.setattr(ops_mod, "entropy_stats_from_qk_accumulate_",
                        lambda st, q, k, s, m, *a: (seen.append(m), real(st, q, k, s, m, *a)))
    monkeypatch.setattr(ops_mod, "attention_stats_accumulate_",
                        lambda st, q, k, v, s, m, *a: (seen.append(m), real_fused(st, q, k, v, s, m, *a))[1])
    scores = collect(model, [batch], progress=False)
    assert any(m is not None and m.dtype == torch.float32 and torch.isneginf(m).any() for m in seen)
    assert torch.equal(scores.count, ref.count) and scores.count[0, 0] == batch["attention_mask"].sum()
    torch.testing.assert_close(scores.stats, ref.stats, atol=1e-9, rtol=1e-12)


def test_32k_keys_match_float64():
    """2 new queries over a 32k-entry KV cache: the model's own q/k, scored in float32 with
    no loss against a float64 softmax of the same logits."""
    model, K = tiny_model("llama"), 32 * 1024
    g = torch.Generator().manual_seed(0)
    cache = transformers.DynamicCache(config=model.config)
    for layer in range(2):
        cache.update(torch.randn(1, 2, K, 8, generator=g) * 3, torch.randn(1, 2, K, 8, generator=g), layer)
    seen = []
    real = ops_mod.attention_stats_accumulate_

    def spy(stats, q, k, v, scale, mask, causal, qm):  # the fused op serves this sdpa model
        seen.append((q.double(), k.double(), scale, mask, causal))
        return real(stats, q, k, v, scale, mask, causal, qm)

    ops_mod.attention_stats_accumulate_, saved = spy, real
    try:
        ids = torch.randint(3, 99, (1, 2), generator=g)
        scores = collect(model, [{"input_ids": ids, "past_key_values": cache, "use_cache": True}], progress=False)
    finally:
        ops_mod.attention_stats_accumulate_ = saved
    assert len(seen) == 2
    for layer, (q, k, scale, mask, causal) in enumerate(seen):
        assert k.shape[2] == K + 2 and not causal
        z = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * scale
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.double()
        p = z.softmax(-1)
        ref = -(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1)[0]
        assert (ref > 9).all()  # near log(32k): a diffuse row, where float32 sums lose the most
        torch.testing.assert_close(scores.entropy[layer], ref, atol=1e-6, rtol=0)


def test_length_one_sequences_have_zero_entropy_in_half_precision():
    model = tiny_model("llama").to(torch.bfloat16)
    scores = collect(model, [{"input_ids": torch.tensor([[5], [7]])}], progress=False)
    assert (scores.count == 2).all() and (scores.entropy == 0).all()


def test_gemma2_soft_capping_is_applied():
    """Queries scaled up so that a cap of 1 changes the attention."""

    def model(cap):
        m = tiny_model("gemma2", attn_logit_softcapping=cap)
        with torch.no_grad():
            for layer in m.layers:
                layer.self_attn.q_proj.weight.mul_(10)
        return m

    batches = [tiny_batch("gemma2", seed=s) for s in range(2)]
    capped = model(1.0)
    scores = collect(capped, batches, progress=False)
    eager = collect(capped, batches, method="eager", progress=False)
    uncapped = collect(model(None), batches, progress=False)
    torch.testing.assert_close(scores.entropy, eager.entropy, atol=1e-5, rtol=0)
    assert (scores.entropy - uncapped.entropy).abs().max() > 0.01  # 1000x the tolerance above
    half = collect(capped.to(torch.float16), batches, progress=False)
    torch.testing.assert_close(half.entropy, scores.entropy, atol=HALF_BOUND[torch.float16], rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_moments_that_are_not_finite_are_refused_by_the_ranking_and_the_refit(value):
    """A NaN in a site's second moments ranked its heads first (a NaN cost compared as none), an
    infinite one reached torch.linalg's errors, and the refit took an infinite one silently."""
    from headprune import mask_heads, select_heads

    model = tiny_model("llama")
    scores = collect(model, [tiny_batch("llama")], moments=True, progress=False)
    scores.moments.gram[0][0, 0] = value
    with pytest.raises(ValueError, match=rf"^scores: the second moments of site {scores.names[0]} hold NaN or inf"):
        select_heads(scores, count=2, protect_layers=[])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^reconstruct: the second moments of site {scores.names[0]} hold NaN"):
        mask_heads(model, {0: [1], 1: [0]}, reconstruct=scores)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_value_moments_of_activations_that_are_not_finite_are_refused():
    """An overflowing value projection left NaN in the value refit's moments, which solved to NaN
    weights."""
    from headprune import collect_values

    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^batches: the second moments of site .*1.* hold NaN or inf"):
        collect_values(model, [tiny_batch("bert")], {1: [0]}, progress=False)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_position_bias_mask_under_half_autocast_masks(impl):
    """T5 under float16 autocast builds a float32 mask filled at float16's minimum (-65504),
    which the op read as a visible key: padded and future keys were counted, so the
    length-normalised entropy and the first key's mass were those of a longer row."""
    batch = tiny_batch("t5", seq=11)
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding: the first key a pad
    model = tiny_model("t5", attn_implementation=impl)
    ref = collect(model, [batch], progress=False)
    with torch.autocast("cpu", dtype=torch.float16):
        half = collect(model, [batch], progress=False)
    assert torch.equal(half.count, ref.count)
    for score in ("normalized", "sink"):
        assert (half.score(score) - ref.score(score)).abs().max().item() < 1e-2, score  # 6e-4 measured; 0.13 masked wrong
