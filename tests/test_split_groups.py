"""Grouped-query models whose KV rows repeat an original KV head: a ``gqa="query"`` pruning that
split a group gives each query head of it its own copy of the KV head. The statistics of such a
model name each row's original KV head (``HeadScores.kv_ids``), so whole-group pruning, which
would take the rows for groups, is refused; a transformers 4 directory of a grouped-query family
loads with its KV rows."""

import json

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model
from test_cli import run, tiny_dir  # noqa: F401  (fixtures)
from test_cli_gqa import _tiny_llama

import headprune
from headprune.hf import collect, load_pruned, prune_heads
from headprune.stats import HeadScores


def _llama():
    """4 layers of 8 query heads in 2 KV groups."""
    return tiny_model("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)


def _split():
    """Layers 1 and 3 lose one head of a group (7 rows: each repeats); layer 2 one of each (2 rows)."""
    model = _llama()
    prune_heads(model, {1: [1], 2: [1, 6], 3: [5]})
    return model


def test_statistics_name_each_rows_kv_head_and_group_pruning_is_refused():
    model = _split()
    scores = collect(model, [tiny_batch("llama")])
    assert scores.num_kv_heads[1] == 7 and scores.kv_ids[1] == [0, 0, 0, 1, 1, 1, 1]
    assert scores.kv_ids[0] == [0, 1] and scores.kv_ids[2] == [0, 1] and scores.repeated_kv_sites() == [1, 3]
    again = HeadScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert again.kv_ids == scores.kv_ids and scores.block("self").kv_ids == scores.kv_ids
    old = HeadScores.from_dict({k: v for k, v in scores.to_dict().items() if k != "kv_ids"})  # saved before kv_ids
    assert old.kv_ids is None and old.merge(scores).kv_ids == scores.kv_ids == scores.merge(old).kv_ids
    with pytest.raises(ValueError, match=r"gqa='group': layers \[1, 3\] repeat KV heads .*gqa='query' pruning"):
        headprune.select_heads(scores, ratio=0.3, gqa="group", score="entropy")
    for gqa in ("even", "query"):  # rows act as the units they physically are: the cache does not grow
        assert headprune.select_heads(scores, ratio=0.3, gqa=gqa, score="entropy")


def test_whole_groups_of_an_unsplit_pruned_model_stay_allowed():
    model = _llama()
    prune_heads(model, {1: [4, 5, 6, 7]})  # a whole group: no row repeats
    scores = collect(model, [tiny_batch("llama")])
    assert scores.repeated_kv_sites() == [] and scores.kv_ids[1] == [0]
    assert headprune.select_heads(scores, count=1, gqa="group", protect_layers=[], score="entropy")


def test_the_command_line_refuses_group_pruning_of_split_groups_before_collecting(run, tmp_path, tiny_dir):  # noqa: F811
    """A second prune with --gqa group said it removed whole KV groups while it removed single
    rows of the repeated ones."""
    import transformers

    path = _tiny_llama(tmp_path, tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    prune_heads(model, {0: [0], 1: [3]})
    headprune.save_pruned(model, tmp_path / "p", tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_dir))
    code, err = run(["prune", tmp_path / "p", "--ratio", "0.3", "--gqa", "group", "--quiet", "--out", tmp_path / "o"])
    assert code == 2 and "--gqa group: layers [0, 1] repeat KV heads (an earlier --gqa query pruning" in err[-1]
    assert not (tmp_path / "o").exists()


def test_a_transformers4_directory_of_a_grouped_query_family_loads_its_kv_rows(tmp_path):
    """Its KV rows were taken as one per kept query head, which refused the directory."""
    from safetensors.torch import save_file

    model = _llama()
    pruned = {1: [0, 1, 2, 3], 2: [5, 6]}  # a whole group; half of one
    config = {**model.config.to_dict(), "architectures": ["LlamaModel"], "pruned_heads": pruned}
    prune_heads(model, pruned)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = load_pruned(tmp_path)
    batch = tiny_batch("llama")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
