"""Gradient-based head importance (Michel et al. 2019), the comparison baseline."""

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model

from headprune import collect, select_heads
from headprune.hf.importance import gradient_importance


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
    from headprune.hf.importance import _gate_hook, _loss
    from headprune.hf.adapters import get_adapter, head_counts, head_dim, resolve_sites

    adapter = get_adapter(model)
    site = resolve_sites(model, adapter)[1]
    hq, d = head_counts(site, adapter)[0], head_dim(site, adapter)
    eps = 1e-4  # float32 buffers (rotary tables) put ~1e-8 noise on the loss
    losses = []
    for delta in (eps, -eps):
        gate = torch.ones(hq, dtype=torch.float64)
        gate[1] += delta
        h = site.o.register_forward_pre_hook(_gate_hook(gate, d))
        with torch.no_grad():
            losses.append(_loss(model, batch, False).item())  # a base model: the contrastive loss
        h.remove()
    fd = abs(losses[0] - losses[1]) / (2 * eps)
    assert imp[1, 1].item() == pytest.approx(fd, rel=1e-3)


def test_gradient_importance_needs_batches():
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        gradient_importance(tiny_model("llama"), [])
