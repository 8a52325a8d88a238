"""What prune says when the layouts round a request: the cause it names."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)
from test_cli_gqa import _tiny_llama  # noqa: E402


def test_a_uniform_layout_of_no_head_and_a_measured_shortfall_name_their_cause(run, tmp_path, tiny_dir):  # noqa: F811
    """--uniform rounding to no head on a model without grouped queries was blamed on --gqa even
    (the option's default); a measured allocation short of the request on a grouped model too."""
    code, err = run(["prune", tiny_dir, "--count", "1", "--uniform", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--no-speed", "--out", tmp_path / "u"])
    assert code == 2 and err[-1].endswith("--count: 1 rounds to no head in the layouts the selection allows (--uniform: "
                                          "every layer loses the same number of heads, and the nearest such layout "
                                          "is none); ask for more"), err
    path = _tiny_llama(tmp_path, tiny_dir)  # 2 layers of 2 KV groups of 2 query heads; the first kept whole
    code, err = run(["prune", path, "--scope", "measured", "--ratio", "0.9", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--no-speed", "--out", tmp_path / "m"])  # beyond the most any allocation removes:
    assert code == 2 and "7 heads requested but --protect-layers and --min-heads-per-layer 1 allow at most 3" in \
        err[-1], err  # refused before the measuring (it measured, then took 3 with a warning)
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama8"  # 2 layers of 2 KV groups of 4 query heads: even layouts remove 2, 4, 5, 6 or 7
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama", num_attention_heads=8)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    code, err = run(["prune", path, "--scope", "measured", "--count", "3", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--no-speed", "--out", tmp_path / "m"])
    assert code == 0, err
    assert any("warning: the layers --protect-layers and --min-heads-per-layer leave open, in --gqa even layouts: "
               "the nearest allocation removes" in line for line in err), err


def test_the_recipe_text_names_the_heads_every_layer_keeps():
    """--min-heads-per-layer changed the heads chosen and the recipe sentence stayed word for word."""
    from headprune.app.recipe_text import describe_recipe

    plain = describe_recipe({"score": "entropy", "scope": "global"}, "refit")
    assert "kept in every layer" not in plain and "whole layers" not in plain
    assert "; at least 3 query heads kept in every layer;" in describe_recipe(
        {"score": "entropy", "scope": "global", "min_heads_per_layer": 3}, "refit")
    assert "; at least 2 KV groups kept in every layer;" in describe_recipe(
        {"score": "entropy", "gqa": "group", "min_heads_per_layer": 2}, "refit", grouped=True)
    assert "; whole layers may go;" in describe_recipe({"score": "entropy", "min_heads_per_layer": 0}, "refit")
    assert describe_recipe({"score": "entropy", "min_heads_per_layer": 1}, "refit") == describe_recipe(
        {"score": "entropy"}, "refit")


def test_warnings_name_what_changed_the_size(run, tmp_path, tiny_dir):  # noqa: F811
    """--uniform with --min-heads-per-layer 3 removed a quarter of a half asked for, the warning
    blaming --uniform alone; a masked save of a model without attention biases warned that its
    weights were larger than its input's and pointed to --save-dtype, though it was saved in the
    input's own type (the zero q/k/v/o biases the declared output bias brings are the difference)."""
    common = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.5", "--uniform", "--min-heads-per-layer", "3", *common,
                     "--out", tmp_path / "u"])
    assert code == 0 and any("warning: --uniform with --min-heads-per-layer 3: the nearest layout removes 2 heads "
                             "(25.0%), not the 4 requested (50.0%)" in line for line in err), err
    code, err = run(["prune", _tiny_llama(tmp_path, tiny_dir), "--ratio", "0.25", "--mask", *common,
                     "--out", tmp_path / "m"])
    assert code == 0 and not any("larger than its input" in line for line in err), err


def test_singular_moments_without_damping_name_the_flag(run, tmp_path, tiny_dir):  # noqa: F811
    """The refusal named the library's argument (damping:), not the command's flag."""
    code, err = run(["prune", _tiny_llama(tmp_path, tiny_dir), "--ratio", "0.3", "--damping", "0", "--samples", "2",
                     "--seq-len", "4", "--quiet", "--no-speed", "--out", tmp_path / "o"])
    assert code == 2 and err[-1].startswith("headprune prune: error: --damping: 0 leaves these second moments "
                                            "singular") and err[-1].endswith("pass a positive --damping"), err


def test_uniform_with_gqa_query_is_refused_on_grouped_models_only(run, tmp_path, tiny_dir):  # noqa: F811
    """On a grouped-query model --uniform took even layouts and recorded --gqa query (and at 25%
    refused the request as rounding to no head); a model without grouped queries has no other
    layout, so it prunes as before."""
    common = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", _tiny_llama(tmp_path, tiny_dir), "--ratio", "0.25", "--uniform", "--gqa", "query",
                     *common, "--out", tmp_path / "g"])
    assert code == 2 and err[-1].endswith("--gqa query: a --uniform layout keeps every KV group even (a config "
                                          "declares one layout); drop --gqa query"), err
    code, err = run(["prune", tiny_dir, "--ratio", "0.5", "--uniform", "--gqa", "query", *common, "--out", tmp_path / "b"])
    assert code == 0, err
