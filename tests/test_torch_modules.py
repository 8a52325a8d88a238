"""Plain PyTorch attention: nn.MultiheadAttention and nn.TransformerEncoder."""

import pytest
import torch
from torch import nn

from headprune.core import reference
from headprune.stats import HeadScores
from headprune.plain import attention_modules, collect_modules, mask_modules


def encoder(norm_first=False, layers=2, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def _reference(model, x, pad):
    """Per-head probabilities from the modules themselves (need_weights, slow path)."""
    stats, h = [], x
    for layer in model.layers:
        inp = layer.norm1(h) if layer.norm_first else h
        _, w = layer.self_attn(inp, inp, inp, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
        stats.append(reference.entropy_stats_from_probs(w, ~pad))
        h = layer(h, src_key_padding_mask=pad)
    return torch.stack(stats)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_matches_probabilities(norm_first):
    model = encoder(norm_first)
    x = torch.randn(3, 7, 32) * 3
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    with torch.no_grad():
        ref_out = model(x, src_key_padding_mask=pad)
        scores = collect_modules(model, [(x, None, pad)])
        assert torch.equal(model(x, src_key_padding_mask=pad), ref_out)  # the collection left the model as it was
        ref = _reference(model, x, pad)
    assert isinstance(scores, HeadScores) and scores.entropy.shape == (2, 4)
    assert scores.count[0, 0] == 7 + 5 + 3
    torch.testing.assert_close(scores.entropy, ref[..., 1] / ref[..., 0], atol=1e-4, rtol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_standalone_mha_with_causal_mask():
    mha = nn.MultiheadAttention(16, 2, batch_first=False).eval()
    x = torch.randn(5, 2, 16)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, attn_mask=causal)[0]

    scores = collect_modules(M(), [x])
    _, w = mha(x, x, x, attn_mask=causal, average_attn_weights=False)
    ref = reference.entropy_stats_from_probs(w)
    torch.testing.assert_close(scores.entropy[0], ref[:, 1] / ref[:, 0], atol=1e-4, rtol=0)


def test_masking_is_exact_and_reversible():
    model = encoder()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = model(x)
        with mask_modules(model, {0: [1, 2]}):
            masked = model(x)
            assert model.layers[0].self_attn.out_proj.weight[:, 8:24].abs().sum() == 0
        assert torch.equal(model(x), before)
    assert not torch.equal(masked, before)


class _Lone(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def test_errors_are_named():
    with pytest.raises(ValueError, match="model: Linear has no nn.MultiheadAttention"):
        attention_modules(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="batches: expected tensors"):
        collect_modules(encoder(), ["text"])
    with pytest.raises(ValueError, match="heads: layer 0 has 4 heads"):
        mask_modules(encoder(), {0: [4]})
    with pytest.raises(ValueError, match="batches: every query position is padding"):  # gave NaN entropies
        collect_modules(_Lone(), [(torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool))])
    from headprune import mask_heads

    model = encoder()
    before = [p.clone() for p in model.parameters()]
    for kw in ({"compensate": object()}, {"reconstruct": object()}, {"values": object()}):  # refused, not ignored
        with pytest.raises(ValueError, match="compensate, reconstruct, values: supported for transformers models"):
            mask_heads(model, {0: [1]}, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    from headprune import collect, gradient_importance, kept_heads, prune_heads, save_pruned

    with pytest.raises(ValueError, match="moments: output statistics and second moments need a transformers model"):
        collect(model, [torch.randn(2, 5, 32)], progress=False, moments=True)  # was dropped without a word
    plain = "model: TransformerEncoder has no transformers config; plain torch models are collected and masked"
    for call in (lambda: prune_heads(model, {0: [1]}), lambda: kept_heads(model), lambda: save_pruned(model, "x"),
                 lambda: gradient_importance(model, [{"input_ids": torch.ones(1, 3, dtype=torch.long)}])):
        with pytest.raises(ValueError, match=plain):  # was "unsupported model_type None" (gradient importance:
            call()  # an AttributeError on the model's config)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()

    def forward(self, tgt, memory, memory_key_padding_mask):
        return self.dec(tgt, memory, memory_key_padding_mask=memory_key_padding_mask)


def test_cross_attention_keeps_every_query_when_the_memory_is_as_long():
    """The memory's padding masks keys only: with a memory as long as the queries it also
    removed the query rows at the padded positions from the statistics."""
    model = _Decoder()
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 2:] = True
    with torch.no_grad():
        scores = collect_modules(model, [(tgt, memory, pad)])
        x = model.dec.norm1(tgt) if model.dec.norm_first else tgt
        x = model.dec.norm1(x + model.dec.self_attn(x, x, x, need_weights=False)[0])
        _, w = model.dec.multihead_attn(x, memory, memory, key_padding_mask=pad, average_attn_weights=False)
    ref = reference.entropy_stats_from_probs(w)
    assert scores.count[1].tolist() == [10.0] * 4
    torch.testing.assert_close(scores.entropy[1], ref[:, 1] / ref[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_input(batch_first):
    """nn.MultiheadAttention takes an unbatched [L, E] query; collection failed on it."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x)[0]

    x = torch.randn(5, 16)
    with torch.no_grad():
        scores = collect_modules(M(), [x])
        _, w = mha(x[None] if batch_first else x[:, None], *([x[None] if batch_first else x[:, None]] * 2),
                   average_attn_weights=False)
    ref = reference.entropy_stats_from_probs(w)
    torch.testing.assert_close(scores.entropy[0], ref[:, 1] / ref[:, 0], atol=1e-4, rtol=0)


def test_a_masking_that_fails_leaves_the_model_as_it_was():
    """The op refused the second layer's weights (inference tensors): the first layer's head
    stayed zeroed and its mask registered, behind the error of a restore that failed too."""
    from headprune.prune.mask import active_masks

    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    with torch.inference_mode():
        model.append(nn.MultiheadAttention(8, 2, batch_first=True))
    before = [m.out_proj.weight.clone() for m in model]
    with pytest.raises(ValueError, match="an inference tensor"):
        mask_modules(model, {0: [1], 1: [1]})
    assert all(torch.equal(m.out_proj.weight, w) for m, w in zip(model, before)) and not active_masks(model)
    mask_modules(model, {0: [1]}).restore()


def test_a_compiled_attention_is_refused_by_name():
    """Its compiled graph, run before, never calls the hooks: the site recorded nothing, silently."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    model[0] = torch.compile(model[0])
    with pytest.raises(ValueError, match=r"^model: 0 is a torch.compile'd module, .* \(its _orig_mod\)"):
        collect_modules(model, [(torch.randn(1, 3, 8),) * 3])
    with pytest.raises(ValueError, match=r"^model: model is a torch.compile'd module"):
        collect_modules(torch.compile(model[0]._orig_mod), [(torch.randn(1, 3, 8),) * 3])
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    model[0].compile()
    with pytest.raises(ValueError, match=r"^model: 0 is a torch.compile'd module, .* collect before compiling it in"):
        collect_modules(model, [(torch.randn(1, 3, 8),) * 3])
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    layer.linear1.compile()  # no attention inside: its graph is no matter
    assert collect_modules(layer, [torch.randn(1, 3, 8)]).count.sum() > 0


def test_a_mask_restores_after_the_model_was_cast():
    model = encoder()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    handle = mask_modules(model, {0: [1]})
    model.double()
    handle.restore()
    with torch.no_grad():
        assert torch.equal(model(x), encoder().double()(x))


def test_a_layer_subclass_with_its_own_forward_is_measured_at_its_attention():
    """A TransformerEncoderLayer subclass that adds a position embedding to the queries and
    keys only (DETR-style) was hooked at the layer, which recomputed them from the layer's
    input: other entropies than its attention's."""

    class WithPositions(nn.TransformerEncoderLayer):
        def forward(self, src, pos):
            q = src + pos
            src = self.norm1(src + self.self_attn(q, q, src, need_weights=False)[0])
            return self.norm2(src + self._ff_block(src))

    torch.manual_seed(0)
    layer = WithPositions(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x, pos = torch.randn(2, 6, 32), torch.randn(2, 6, 32) * 3
    scores = collect_modules(layer, [(x, pos)])
    with torch.no_grad():
        _, w = layer.self_attn(x + pos, x + pos, x, need_weights=True, average_attn_weights=False)
    want = reference.entropy_stats_from_probs(w.double())
    torch.testing.assert_close(scores.entropy[0], want[:, 1] / want[:, 0], atol=1e-4, rtol=0)


def test_a_layer_subclass_calling_torchs_forward_is_measured():
    """A subclass whose forward hands other inputs to torch's own forward is hooked at its
    attention module. torch's fast path would bypass that module, but it is not taken while a
    hook sits on any submodule, so every call is recorded (eval mode, no grad, even heads: the
    fast path's other conditions hold here)."""

    class ShiftedInput(nn.TransformerEncoderLayer):
        def forward(self, src, pos):
            return super().forward(src + pos)

    torch.manual_seed(0)
    layer = ShiftedInput(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x, pos = torch.randn(2, 6, 32), torch.randn(2, 6, 32) * 3
    scores = collect_modules(layer, [(x, pos), (x, -pos)])
    assert scores.stats[0, :, 0].tolist() == [24.0] * 4  # 2 batches x 2 sequences x 6 rows per head
    with torch.no_grad():
        y = torch.cat([x + pos, x - pos])
        _, w = layer.self_attn(y, y, y, need_weights=True, average_attn_weights=False)
    want = reference.entropy_stats_from_probs(w.double())
    torch.testing.assert_close(scores.entropy[0], want[:, 1] / want[:, 0], atol=1e-4, rtol=0)


def test_collection_runs_in_eval_mode_and_gives_back_each_flag():
    """In training mode dropout made two collections of the same batches differ."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.5, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    model.layers[1].dropout.eval()  # one flag set apart: kept as it was
    x = torch.randn(2, 6, 32)
    first, second = collect_modules(model, [x]), collect_modules(model, [x])
    assert torch.equal(first.stats, second.stats)
    assert model.training and model.layers[0].dropout.training and not model.layers[1].dropout.training


def test_retype_keeps_a_shared_buffer_one_tensor():
    """A buffer two modules share was cast once per owner, into two tensors; tied parameters stay tied."""
    from headprune.core.modules import retype

    shared = torch.arange(4.0)
    a, b = nn.Module(), nn.Module()
    a.register_buffer("f", shared)
    b.register_buffer("f", shared)
    lin = nn.Linear(2, 2)
    model = nn.Sequential(a, b, lin, nn.Linear(2, 2))
    model[3].weight = lin.weight
    retype(model, lambda m, module, n, t: torch.float16)
    assert model[0].f is model[1].f and model[0].f.dtype == torch.float16
    assert torch.equal(model[0].f, torch.arange(4.0, dtype=torch.float16))
    assert model[2].weight is model[3].weight and lin.weight.dtype == torch.float16
    # every owner is asked: one that keeps float32 keeps the original, whichever comes first
    for keep in (0, 1):
        shared = torch.arange(4.0)
        a, b = nn.Module(), nn.Module()
        a.register_buffer("f", shared)
        b.register_buffer("f", shared)
        model = nn.Sequential(a, b)
        retype(model, lambda m, module, n, t, keep=keep: None if m == str(keep) else torch.float16)
        assert model[keep].f is shared and model[1 - keep].f.dtype == torch.float16
    one = nn.Module()  # one tensor under two names of one module: both cast, still one tensor
    one.register_buffer("a", torch.arange(4.0))
    one.register_buffer("b", one.a)
    retype(one, lambda m, module, n, t: torch.float16)
    assert one.a is one.b and one.b.dtype == torch.float16


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_decoders_cross_attention_leaves_out_the_padded_target_rows(batch_first):
    """The cross-attention's own key padding is the memory's; its padded query rows (the
    target's) were counted, while the self-attention of the same layer left them out."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerDecoder(layer, 2).eval()
    tgt, mem = torch.randn(3, 6, 16) * 3, torch.randn(3, 5, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[2, 4:] = True  # the last sample's target is 4 long
    causal = nn.Transformer.generate_square_subsequent_mask

    def call(t, m, **kw):
        return {"tgt": t if batch_first else t.transpose(0, 1), "memory": m if batch_first else m.transpose(0, 1),
                "tgt_mask": causal(t.shape[1]), **kw}

    with torch.no_grad():
        got = collect_modules(model, [call(tgt, mem, tgt_key_padding_mask=pad)])
        want = collect_modules(model, [call(tgt[:2], mem[:2]), call(tgt[2:, :4], mem[2:])])  # no padding at all
    assert got.count[:, 0].tolist() == want.count[:, 0].tolist() == [2 * 6 + 4] * 4
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=0)
    assert got.kinds == ["self", "cross"] * 2  # the cross-attention sites were labelled self-attention
    assert got.block("cross").names == ["layers.0.multihead_attn", "layers.1.multihead_attn"]


def test_a_decoder_only_subclass_without_cross_attention_is_collected():
    """A GPT-style layer that subclasses nn.TransformerDecoderLayer and deletes its cross-attention
    failed in the decoder hook (AttributeError: no multihead_attn)."""

    class DecoderOnly(nn.TransformerDecoderLayer):
        def __init__(self):
            super().__init__(16, 2, 32, dropout=0.0, batch_first=True)
            del self.multihead_attn, self.norm2, self.dropout2

        def forward(self, x, mask=None):
            x = self.norm1(x + self._sa_block(x, mask, None))
            return self.norm3(x + self._ff_block(x))

    torch.manual_seed(0)
    model = nn.Sequential(DecoderOnly(), DecoderOnly()).eval()
    scores = collect_modules(model, [torch.randn(2, 5, 16)])
    assert scores.entropy.shape == (2, 2) and scores.count[:, 0].tolist() == [10, 10]
