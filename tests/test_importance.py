"""Gradient-based head importance (Michel et al. 2019), the comparison baseline."""

import pytest
import torch

from hf_tiny import tiny_batch, tiny_config, tiny_model

from headprune import collect, select_heads
from headprune.hf.importance import gradient_importance


def _reference_importance(model, batches, causal):
    """The former implementation, one gate tensor and hook per site, kept as the reference the
    gate-based one must reproduce bit for bit."""
    from contextlib import ExitStack

    from headprune.hf.adapters import get_adapter, head_counts, head_dim, resolve_sites
    from headprune.hf.importance import _loss

    def hook(gate, d):
        def pre(module, args):
            x = args[0]
            return ((x.unflatten(-1, (gate.shape[0], d)) * gate.to(x.dtype)[:, None]).flatten(-2), *args[1:])

        return pre

    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    counts = [head_counts(s, adapter)[0] for s in sites]
    gates = [torch.ones(h, requires_grad=True) for h in counts]
    total = torch.zeros(len(sites), max(counts), dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    with ExitStack() as stack:
        for site, gate in zip(sites, gates):
            stack.callback(site.o.register_forward_pre_hook(hook(gate, head_dim(site, adapter))).remove)
        for batch in batches:
            for g in gates:
                g.grad = None
            _loss(model, batch, causal).backward()
            for i, g in enumerate(gates):
                total[i, : counts[i]] += g.grad.abs().double()
    out = total / len(batches)
    for i, c in enumerate(counts):
        out[i, c:] = float("nan")
    return out


@pytest.mark.parametrize("family, causal", [("llama", False), ("bert", False), ("gpt2", True), ("llama", True)])
def test_gradient_importance_is_unchanged(family, causal):
    """Uneven head counts (a pruned model) included, so the NaN padding is checked too."""
    import transformers

    from headprune.hf import prune_heads

    if causal:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    else:
        model = tiny_model(family)
    prune_heads(model, {1: [0, 2]})
    batches = [tiny_batch(family, batch=4, seq=12, seed=s) for s in (0, 1)]
    imp = gradient_importance(model, batches, causal=causal)
    ref = _reference_importance(model, batches, causal)
    assert torch.equal(imp.isnan(), ref.isnan()) and imp.isnan().sum() == 2
    assert torch.equal(imp.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_gradient_importance_shape_finite_and_restores(family):
    model = tiny_model(family)
    batch = tiny_batch(family, batch=4, seq=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    imp = gradient_importance(model, [batch, batch])
    scores = collect(model, [batch], progress=False)
    assert imp.shape == scores.entropy.shape
    assert torch.isfinite(imp).all() and (imp >= 0).all() and imp.sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())
    heads = select_heads(scores, ratio=0.25, score=imp, order="low")
    assert sum(len(h) for h in heads.values()) == int(0.25 * sum(scores.num_heads))


def test_gradient_importance_matches_finite_difference():
    model = tiny_model("llama").double()
    batch = tiny_batch("llama", batch=2, seq=10)
    imp = gradient_importance(model, [batch])
    from headprune.hf import gates
    from headprune.hf.importance import _loss

    eps = 1e-4  # the RMS norms and rotary tables round to float32 inside: noise on the loss
    losses = []
    for delta in (eps, -eps):
        with gates(model) as g, torch.no_grad():
            g.gate[1, 1] += delta
            losses.append(_loss(model, batch, False).item())  # a base model: the contrastive loss
    fd = abs(losses[0] - losses[1]) / (2 * eps)
    assert imp[1, 1].item() == pytest.approx(fd, rel=1e-3)


def test_gradient_importance_needs_batches():
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        gradient_importance(tiny_model("llama"), [])


def test_the_contrastive_halves_follow_each_sequence_padded_left_or_right():
    """Each sequence is split at half its own tokens: a left-padded batch gave empty first
    halves (zero embeddings) and a loss on nothing."""
    from types import SimpleNamespace

    from headprune.hf.importance import _contrastive_loss

    torch.manual_seed(0)
    table = torch.randn(100, 8, dtype=torch.float64)  # padding moves the sums' order: float64 keeps that below 1e-12

    def model(input_ids, attention_mask):  # token embeddings alone: no position, so padding side is moot
        return SimpleNamespace(last_hidden_state=table[input_ids])

    tokens = torch.randint(3, 100, (3, 16))
    batches = {side: {"input_ids": torch.zeros(3, 16, dtype=torch.long),
                      "attention_mask": torch.zeros(3, 16, dtype=torch.long)} for side in ("right", "left")}
    for i, n in enumerate([16, 10, 8]):
        batches["right"]["input_ids"][i, :n], batches["right"]["attention_mask"][i, :n] = tokens[i, :n], 1
        batches["left"]["input_ids"][i, 16 - n:], batches["left"]["attention_mask"][i, 16 - n:] = tokens[i, :n], 1
    right, left = (_contrastive_loss(model, batches[side]) for side in ("right", "left"))
    torch.testing.assert_close(left, right, rtol=1e-12, atol=0)


def test_gradient_importance_under_no_grad_and_on_models_it_cannot_take():
    import transformers

    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=4, seq=12)
    with torch.no_grad():  # gradients for the gates all the same
        assert torch.equal(gradient_importance(model, [batch]), gradient_importance(model, [batch]))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        gradient_importance(model, [batch])
    head = transformers.BertForMaskedLM(tiny_config("bert")).eval()
    with pytest.raises(ValueError, match="model: the contrastive loss pools .* BertForMaskedLM returns none"):
        gradient_importance(head, [batch], causal=False)
    roberta = transformers.RobertaForMaskedLM(tiny_config("roberta")).eval()  # an lm_head, and no causal LM
    with pytest.raises(ValueError, match="model: the contrastive loss pools .* RobertaForMaskedLM returns none"):
        gradient_importance(roberta, [tiny_batch("roberta", batch=4, seq=12)])
    with pytest.raises(ValueError, match="not T5Model \\(encoder-decoder\\)"):
        gradient_importance(tiny_model("t5"), [tiny_batch("t5")])
    with pytest.raises(ValueError, match="batches: gradient importance takes text batches"):
        gradient_importance(model, [{"pixel_values": torch.zeros(1, 3, 8, 8)}])


def test_a_causal_batch_with_no_token_to_predict_is_refused():
    """Sequences of one token give the next-token loss no target: its NaN had gradients of 0,
    averaged in as importance 0 (every head scored 0 on such batches alone)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    short = {"input_ids": torch.tensor([[5, 0, 0], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 0, 0], [1, 0, 0]])}
    left = {"input_ids": torch.tensor([[0, 0, 5], [0, 0, 8]]), "attention_mask": torch.tensor([[0, 0, 1], [0, 0, 1]])}
    for batches in ([short, short], [tiny_batch("llama"), short], [left]):  # left: predicted from padding
        with pytest.raises(ValueError, match="batches: a batch has no token to predict"):
            gradient_importance(model, batches)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
