"""Calls made under ``torch.inference_mode()``: what they return or change stays usable outside it."""

import pytest
import torch
from transformers import BertConfig, BertModel

import headprune
from test_api_inputs import _batches, _llama


def test_inference_mode():
    """prune_heads in it made inference tensors of the new weights (nothing could train them
    after); recover in it failed with autograd's words."""
    batches = _batches()
    model = _llama()
    scores = headprune.collect(model, batches, moments=True)
    with torch.inference_mode():
        headprune.prune_heads(model, {1: [1, 2]}, reconstruct=scores)
    assert not [n for n, p in model.named_parameters() if p.is_inference()]
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"^recover: needs autograd"):
        headprune.recover(model, _llama(), batches, steps=1)



def test_statistics_collected_in_inference_mode_are_ordinary_tensors():
    """collect, the one-pass sequential calibration, collect_values and plain collection in it
    returned inference tensors, which no in-place update (a merge into them, a caller's own
    sums) could touch outside it."""
    from headprune.hf.sequential import calibrate_sequentially
    from headprune.plain.collect import collect_modules

    batches, model = _batches(), _llama(kv=4)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=32))
    plain = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    with torch.inference_mode():
        runs = {"collect": headprune.collect(model, batches, moments=True),
                "sequential": calibrate_sequentially(model, batches, ratio=0.3)[1],
                "values": headprune.collect_values(model, batches, {0: [1]}),
                "bert": headprune.collect(bert, batches, moments=True),
                "plain": collect_modules(plain, [torch.randn(2, 5, 16)])}
    for name, result in runs.items():
        found = _tensors(result)
        assert found and not [t for t in found if t.is_inference()], name
        found[0].add_(0)


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj if isinstance(obj, (list, tuple)) else obj.values() if isinstance(obj, dict) else vars(obj).values()
    return [t for o in items if isinstance(o, (torch.Tensor, list, tuple, dict)) or hasattr(o, "__dict__")
            for t in _tensors(o)]


def test_a_model_made_in_inference_mode_is_calibrated_layer_by_layer():
    """Its weights are inference tensors, which the pass's refit wrote outside inference mode
    (refused by autograd) once the pass returned ordinary statistics."""
    from headprune.hf.sequential import calibrate_sequentially

    with torch.inference_mode():
        model, batches = _llama(kv=4), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        heads, scores = calibrate_sequentially(model, batches, ratio=0.3)
    assert heads and not scores.stats.is_inference()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    calibrate_sequentially(model, batches, ratio=0.3)  # outside it too
    with headprune.gates(model), pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block, whose"):
        calibrate_sequentially(model, batches, ratio=0.3)
