"""Directories pruned and saved by transformers 4 (``config.pruned_heads``) read by
``load_pruned`` (tests/data/transformers4)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from headprune.hf import kept_heads, load_pruned

DATA = Path(__file__).parent / "data" / "transformers4"


def _matches_transformers4(model, want) -> None:
    """The stored outputs are transformers 4's float32 forward on another machine: the model in
    float64 matches them to float32 rounding (the layout is transformers 4's), and its float32
    forward here matches its float64 one (no float32 comparison across machines' kernels)."""
    import copy

    with torch.no_grad():
        got = model(input_ids=want["input_ids"]).last_hidden_state
        exact = copy.deepcopy(model).double()(input_ids=want["input_ids"]).last_hidden_state
    torch.testing.assert_close(exact, want["out"].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_transformers4_pruned_directories_load_bit_exactly(family):
    """transformers 4 saved pruned models with config.pruned_heads; load_pruned rebuilds them
    and reproduces transformers 4's own outputs (tests/data/transformers4)."""
    path = DATA / family
    model = load_pruned(path)
    assert kept_heads(model)[0] == [0, 2] and kept_heads(model)[1] == [1, 2, 3]
    _matches_transformers4(model, load_file(path / "expected.safetensors"))


def test_transformers4_directories_with_sharded_weights_load(tmp_path):
    """save_pretrained shards large models (model.safetensors.index.json): every shard loads."""
    src = DATA / "bert"
    shutil.copy(src / "config.json", tmp_path)
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in shards.items():
        save_file({n: state[n] for n in ns}, tmp_path / f, metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    _matches_transformers4(load_pruned(tmp_path), load_file(src / "expected.safetensors"))


def test_transformers4_directories_without_architectures_and_with_weights_of_other_heads(tmp_path):
    """A config that names no class reads as the family's base model (it failed on a class
    named None); weights that disagree with pruned_heads are named against config.json."""
    src = DATA / "bert"
    shutil.copy(src / "model.safetensors", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.pop("architectures", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_pruned(tmp_path)
    assert type(model).__name__ == "BertModel"
    _matches_transformers4(model, load_file(src / "expected.safetensors"))
    config["pruned_heads"] = {"0": [1]}  # the weights lack two heads of layer 0, one of layer 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the model config.json describes \\(its pruned_heads removed\\)"):
        load_pruned(tmp_path)


def test_transformers4_directories_with_renamed_weights_are_refused_by_name():
    with pytest.raises(ValueError, match=r"path: .*vit.model\.safetensors lacks \[.layers\.0\.attention\.q_proj"):
        load_pruned(DATA / "vit")


@pytest.mark.parametrize("family, buffers", [
    ("gpt2", {"h.0.attn.bias": torch.ones(1, 1, 8, 8), "h.0.attn.masked_bias": torch.tensor(-1e4),
              "h.1.attn.bias": torch.ones(1, 1, 8, 8)}),
    ("bert", {"embeddings.position_ids": torch.arange(16)[None]}),
])
def test_transformers4_directories_with_buffers_transformers5_ignores_load(family, buffers, tmp_path):
    """Before transformers 4.31 GPT-2's causal-mask buffers and BERT's position ids were saved
    with the weights; transformers 5 ignores them, and so does the rebuild (it refused them)."""
    shutil.copy(DATA / family / "config.json", tmp_path)
    save_file({**load_file(DATA / family / "model.safetensors"), **buffers}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    _matches_transformers4(load_pruned(tmp_path), load_file(DATA / family / "expected.safetensors"))
