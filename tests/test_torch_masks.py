"""Plain PyTorch attention's masks and nested input: additive masks of finite values and nested
tensors measured as the bool masks and the padded batch they stand for."""

import pytest
import torch
from torch import nn

from headprune.plain import collect_modules
from test_torch_modules import encoder


@pytest.mark.parametrize("kind", ["-inf", "float32 min", "-1e9", "-1e4"])
@pytest.mark.parametrize("nested", [True, False])
def test_a_float_padding_mask_pads_as_the_bool_one(kind, nested):
    """An additive key-padding mask of float32's minimum (as transformers builds them), or of a
    finite value such as -1e9 or -1e4, pads as -inf and True do: the encoder's nested fast path
    drops those positions, and its other path and a lone MultiheadAttention leave their query rows
    out of the statistics (finite values counted them, 0.13 nats off per head)."""
    model = encoder()
    if not nested:
        model = nn.TransformerEncoder(model.layers[0], 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 32) * 3
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    fill = {"-inf": float("-inf"), "float32 min": torch.finfo(torch.float32).min, "-1e9": -1e9, "-1e4": -1e4}[kind]
    additive = torch.zeros(3, 7).masked_fill(pad, fill)
    with torch.no_grad():
        want = collect_modules(model, [(x, None, pad)])
        got = collect_modules(model, [(x, None, additive)])
    assert torch.equal(got.count, want.count) and got.count[0, 0] == 7 + 5 + 3
    # every statistic: a finite value left the keys in each row's key count and first visible key
    torch.testing.assert_close(got.stats, want.stats, atol=1e-5, rtol=1e-6)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model.layers[0].self_attn

        def forward(self, x, kpm):
            return self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    want, got = collect_modules(M(), [(x, pad)]), collect_modules(M(), [(x, additive)])
    assert torch.equal(got.count, want.count) and got.count[0, 0] == 7 + 5 + 3
    torch.testing.assert_close(got.stats, want.stats, atol=1e-5, rtol=1e-6)


class _Attn(nn.Module):
    """A lone attention module, self-attention called with a mask as its keyword ``name``."""

    def __init__(self, mha, name: str):
        super().__init__()
        self.attn, self.name = mha, name

    def forward(self, x, mask):
        return self.attn(x, x, x, need_weights=False, **{self.name: mask})[0]


@pytest.mark.parametrize("fill", [-1e4, -1e9, torch.finfo(torch.float32).min])
def test_an_additive_attention_mask_masks_as_the_bool_one(fill):
    """A causal mask of -1e9 (or -1e4) left the masked keys in each row's key count and first
    visible key: length-normalised entropy and sink mass differed from the bool mask's."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)

    additive = torch.zeros(6, 6).masked_fill(causal, fill)
    model = _Attn(mha, "attn_mask")
    with torch.no_grad():
        want, got = collect_modules(model, [(x, causal)]), collect_modules(model, [(x, additive)])
    torch.testing.assert_close(got.stats, want.stats, atol=1e-5, rtol=1e-6)
    soft = torch.zeros(6, 6).masked_fill(causal, -3.0)  # a bias, not a mask: every key stays in the count
    with torch.no_grad():
        biased = collect_modules(model, [(x, soft)])
    assert not torch.allclose(biased.stats, want.stats)


@pytest.mark.parametrize("what", ["layer", "encoder"])
def test_nested_input_is_measured_per_sequence(what):
    """A nested tensor given by the caller (torch's layer and encoder take one) was padded with
    zeros whose rows and keys were counted as tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    model = layer if what == "layer" else nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()
    seqs = [torch.randn(n, 16) for n in (6, 4, 2)]
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:], pad[2, 2:] = True, True
    dense = torch.nested.nested_tensor(seqs).to_padded_tensor(0.0)
    with torch.no_grad():
        got = collect_modules(model, [torch.nested.nested_tensor(seqs)])
        want = collect_modules(model, [(dense, None, pad)])
    assert got.count[0, 0] == 12
    torch.testing.assert_close(got.stats, want.stats, atol=1e-5, rtol=1e-6)


def test_a_layer_subclass_in_an_encoder_that_nests_its_input_is_measured():
    """A TransformerEncoderLayer subclass (hooked at its attention) in an encoder that nests a
    padded input failed inside with an internal error of nested tensors."""

    class Scaled(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return super().forward(src * 2, src_mask, src_key_padding_mask, is_causal)

    torch.manual_seed(0)
    nested = nn.TransformerEncoder(Scaled(16, 4, 32, dropout=0.0, batch_first=True), 2).eval()
    flat = nn.TransformerEncoder(Scaled(16, 4, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
    flat.load_state_dict(nested.state_dict())
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        got, want = collect_modules(nested, [(x, None, pad)]), collect_modules(flat.eval(), [(x, None, pad)])
    assert got.count[0, 0] == 6 + 4 + 6
    torch.testing.assert_close(got.stats, want.stats, atol=1e-5, rtol=1e-6)


def test_a_soft_float_key_padding_mask_is_a_bias_not_padding():
    """A float key-padding mask's small values are added to the logits, as torch adds them: a key
    biased by -2 was counted as padding, its query row left out."""
    from headprune.core import reference

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    bias = torch.zeros(2, 6)
    bias[:, 0] = -2.0
    bias[1, 4:] = float("-inf")  # and real padding

    with torch.no_grad():
        got = collect_modules(_Attn(mha, "key_padding_mask"), [(x, bias)])
        _, w = mha(x, x, x, key_padding_mask=bias, need_weights=True, average_attn_weights=False)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    want = reference.entropy_stats_from_probs(w.double(), valid)
    assert got.count[0, 0] == 6 + 4
    torch.testing.assert_close(got.entropy, (want[..., 1] / want[..., 0])[None].float().double(), atol=1e-5, rtol=0)
