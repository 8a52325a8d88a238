"""``headprune prune`` on a grouped-query model: the KV cache's growth under ``--gqa query`` is
said (the fixtures of test_cli.py: an in-process ``main`` and a tokenizer directory)."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("gqa", ["query", "group"])
def test_prune_warns_when_the_kv_cache_grows(run, tmp_path, tiny_dir, gqa):  # noqa: F811
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    # 2 layers of 4 query / 2 KV heads, the first kept whole: one query head leaves a partly
    # pruned group (KV grows), one group shrinks it
    code, err = run(["prune", path, "--count", "1", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--gqa", gqa, "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    before, after = report["before"]["kv_heads"], report["after"]["kv_heads"]
    warned = [line for line in err if "KV heads grew" in line]
    if gqa == "query":
        assert after > before and warned == [f"headprune: warning: KV heads grew from {before} to {after}: --gqa "
                                             "query repeats the KV head of a partly pruned group, so the KV cache "
                                             "grows; --gqa even (the default) keeps every group even and never "
                                             "grows it, --gqa group prunes whole groups and shrinks it most "
                                             "(docs/quality.md)"]
    else:
        assert after < before and not warned


def _tiny_llama(tmp_path, tiny_dir):  # noqa: F811
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


def test_prune_gqa_even_never_grows_the_kv_cache(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    path = _tiny_llama(tmp_path, tiny_dir)
    for count in (1, 2, 3):
        out = tmp_path / f"o{count}"
        code, err = run(["prune", path, "--count", str(count), "--samples", "4", "--seq-len", "16", "--quiet",
                         "--no-speed", "--gqa", "even", "--scope", "global", "--out", out])
        if count == 1:  # one head of a group of two: no even layout, and the unpruned model is not written
            assert code == 2 and err[-1].endswith("--count: 1 rounds to no head in the layouts the selection allows "
                                                  "(--gqa even keeps the query heads of every KV group a layer keeps "
                                                  "equal); ask for more") and not out.exists()
            continue
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["after"]["kv_heads"] <= report["before"]["kv_heads"]
        assert not [line for line in err if "KV heads grew" in line]
        assert "every KV group kept keeps the same number of query heads" in report["recipe"]


def test_prune_kv_ratio_removes_whole_groups(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    path = _tiny_llama(tmp_path, tiny_dir)
    # 2 layers of 4 query / 2 KV heads, the first kept whole: 2 heads go from the second layer,
    # one of each group by the ranking or one whole group with --kv-ratio
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--kv-ratio", "0.25", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["heads_pruned"] == 2 and report["settings"]["kv_ratio"] == 0.25
    assert report["settings"]["scope"] == "per_layer"  # the allocation that ran, given or not
    assert (report["before"]["kv_heads"], report["after"]["kv_heads"]) == (4, 3)
    assert "at least 25% of the KV heads in whole groups" in report["recipe"]
    code, err = run(["prune", path, "--ratio", "0.3", "--kv-ratio", "1.5", "--out", tmp_path / "o2"])
    assert code != 0 and any("--kv-ratio: expected a fraction in [0, 1), got '1.5'" in line for line in err), err


def test_prune_uniform_saves_a_directory_plain_from_pretrained_loads(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    import torch
    import transformers

    from headprune.hf import load_pruned

    path = _tiny_llama(tmp_path, tiny_dir)
    # 2 layers of 4 query / 2 KV heads: 3 heads asked for, 2 per layer is the nearest layout
    code, err = run(["prune", path, "--count", "3", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--uniform", "--out", tmp_path / "o"])
    assert code == 0, err
    assert [line for line in err if "warning: --uniform" in line] == [
        "headprune: warning: --uniform: the nearest layout removes 4 heads (50.0%), not the 3 requested (37.5%)"]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["uniform"] is True and report["settings"]["removal"] == "refit"
    assert report["heads_pruned"] == 4 and report["after"]["kv_heads"] <= report["before"]["kv_heads"]
    meta = json.loads((tmp_path / "o" / "model" / "headprune.json").read_text())
    assert meta["plain_loadable"] and len({len(k) for k in meta["kept_heads"]}) == 1
    assert not (tmp_path / "o" / "model" / "README.md").exists()
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").eval()(input_ids=ids)
        ours = load_pruned(tmp_path / "o" / "model")(input_ids=ids)
    assert torch.equal(plain.logits, ours.logits)


@pytest.mark.parametrize("family,mask", [("gemma2", False), ("llama", True), ("gemma2", True)])
def test_prune_uniform_plain_for_gemma2_and_for_masks(run, tmp_path, tiny_dir, family, mask):  # noqa: F811
    """Gemma 2 has no SDPA path: the command line refused every Gemma 2 directory. A mask keeps
    the config's shapes, so its refit's output biases are declared as a uniform pruning's are
    (llama, gemma2: attention_bias), and the directory loads plainly; it did not."""
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    from headprune.hf import load_pruned

    path = tmp_path / family
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Gemma2ForCausalLM
    cls(tiny_config(family)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    code, err = run(["prune", path, "--count", "4", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--uniform", *(["--mask"] if mask else []), "--out", tmp_path / "o"])
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "model" / "headprune.json").read_text())
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert meta["plain_loadable"] and report["settings"]["removal"] == "refit" and report["heads_pruned"] == 4
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").eval()(input_ids=ids)
        ours = load_pruned(tmp_path / "o" / "model")(input_ids=ids)
    assert torch.equal(plain.logits, ours.logits)
    # the report counts the zero q/k/v biases the declaration adds, as the saved model holds them
    from headprune.hf.report import parameter_count

    assert report["after"]["parameters"] == parameter_count(load_pruned(tmp_path / "o" / "model"))


@pytest.mark.parametrize("extra,message", [
    (["--uniform", "--steps", "2"], "--steps: iterative pruning is not supported with --uniform"),
    (["--uniform", "--sequential"], "--sequential: re-chooses each layer's heads"),
    (["--uniform", "--protect-layers", "0"], "--protect-layers: a --uniform selection"),
    (["--kv-ratio", "0.25", "--gqa", "query"], "--kv-ratio: needs --gqa even without --uniform"),
    (["--kv-ratio", "0.25", "--uniform"], "--kv-ratio: needs --gqa even without --uniform"),
    (["--kv-ratio", "0.25", "--sequential"], "--sequential: re-chooses heads after the selection"),
    (["--kv-ratio", "0.25", "--steps", "2"], "--steps: --kv-ratio is a share of the KV heads one selection removes"),
])
def test_layout_options_that_conflict_are_refused_before_loading(run, tmp_path, extra, message):  # noqa: F811
    code, err = run(["prune", tmp_path / "missing", "--ratio", "0.3", "--out", tmp_path / "o", *extra])
    assert code != 0 and any(message in line for line in err), err


def test_kv_ratio_on_a_model_whose_pruning_repeated_its_kv_heads_says_so(run, tmp_path, tiny_dir):  # noqa: F811
    """It said "the model has no grouped queries" of a grouped-query model that a --gqa query
    pruning had given one KV head per query head."""
    import transformers

    import headprune

    path = _tiny_llama(tmp_path, tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    headprune.prune_heads(model, {0: [0], 1: [3]})  # one head of one group in each layer: the KV heads repeat
    headprune.save_pruned(model, tmp_path / "p", tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_dir))
    code, err = run(["prune", tmp_path / "p", "--ratio", "0.3", "--kv-ratio", "0.25", "--quiet", "--out",
                     tmp_path / "o"])
    assert code == 2 and err[-1].endswith("--kv-ratio: the model's pruning gave every query head its own KV head "
                                          "(--gqa query repeats them), so no group is left to remove")


def test_the_report_names_the_layers_that_lost_no_head(run, tmp_path, tiny_dir):  # noqa: F811
    """A new user saw layers 9 and 13 of SmolLM2 left whole besides the first, marked nowhere."""
    import json

    path = _tiny_llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["layers_whole"] == {"protected": [0], "none_chosen": []}
    assert "Layers that lost no head: 0 (the recipe keeps them whole)." in (tmp_path / "o" / "report.md").read_text()
    code, err = run(["prune", tiny_dir, "--count", "1", "--scope", "per_layer", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--no-speed", "--out", tmp_path / "b"])  # a two-layer encoder, one head
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    (layer,) = report["layers_whole"]["none_chosen"]
    assert report["layers_whole"]["protected"] == [] and str(layer) not in report["pruned_heads"]
    assert f"Layers that lost no head: {layer} (the selection placed none of the budget there)." in \
        (tmp_path / "b" / "report.md").read_text()


def test_a_uniform_layout_names_no_layer_kept_whole(run, tmp_path, tiny_dir):  # noqa: F811
    """--uniform prunes every layer alike, the first included; the report (and the heatmap's
    box) said the recipe kept the first layer whole."""
    import json

    path = _tiny_llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--ratio", "0.5", "--uniform", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--no-speed", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["pruned_heads"].get("0") and report["layers_whole"] == {"protected": [], "none_chosen": []}
    assert "Layers that lost no head" not in (tmp_path / "o" / "report.md").read_text()


def test_a_measured_allocation_beyond_reach_is_refused_without_blaming_gqa_even(run, tmp_path, tiny_dir):  # noqa: F811
    """An encoder's measured allocation took the nearest total the layers may give, after the
    measuring, and its warning blamed --gqa even on a model without grouped queries; a request
    beyond the most any allocation removes is refused before the collection, as the other
    scopes refuse it (a shortfall within reach is warned: test_cli_layout_messages.py)."""
    code, err = run(["prune", tiny_dir, "--ratio", "0.9", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--no-speed", "--out", tmp_path / "o"])
    assert code == 2 and err[-1].endswith("--ratio/--count: 7 units requested but --protect-layers and "
                                          "--min-heads-per-layer 1 allow at most 6"), err
    assert not any("--gqa even" in line for line in err), err


def test_a_measured_allocation_of_whole_groups_beyond_reach_is_refused(run, tmp_path, tiny_dir):  # noqa: F811
    """Under --gqa group the shortfall of a measured allocation went unsaid (4 heads of the 6
    that --count 3 groups asks for); then it was warned after the measuring; now it is refused
    before the collection, in groups."""
    path = _tiny_llama(tmp_path, tiny_dir)  # 2 layers of 2 KV groups of 2 query heads
    code, err = run(["prune", path, "--scope", "measured", "--gqa", "group", "--count", "3", "--protect-layers", "",
                     "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "o"])
    assert code == 2 and "3 units requested but --protect-layers and --min-heads-per-layer 1 allow at most 2" in \
        err[-1], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--count", "1"], "--count: 1 rounds to no head in the layouts the selection allows"),
    (["--count", "2", "--protect-layers", "0,1"], "--ratio/--count: 2 heads requested but --protect-layers"),
    (["--ratio", "0.5", "--min-heads-per-layer", "3"], "--ratio/--count: 4 heads requested but --protect-layers and "
                                                       "--min-heads-per-layer 3 allow at most 1"),
    (["--ratio", "0.5", "--gqa", "query"], "allow at most 3 spread evenly over the layers; the default recipe keeps "
                                           "the first layer of each causal stack whole (--protect-layers '' allows it)"),
])
def test_what_the_layout_alone_rules_out_is_refused_before_the_collection(run, tmp_path, tiny_dir, monkeypatch,  # noqa: F811
                                                                          flags, message):
    """Limits that depend on the head counts alone (no even layout small enough, every layer
    protected, the heads every layer keeps) were found after the collection."""
    import headprune.app.commands as C

    path = _tiny_llama(tmp_path, tiny_dir)
    monkeypatch.setattr(C, "_collect", lambda *a, **k: pytest.fail("collected before the selection was checked"))
    code, err = run(["prune", path, *flags, "--samples", "4", "--seq-len", "16", "--quiet", "--out", tmp_path / "o"])
    assert code == 2 and any(message in line for line in err), err
    assert not (tmp_path / "o").exists()


def test_the_layout_check_resolves_the_default_as_the_collection_will(run, tmp_path, tiny_dir):  # noqa: F811
    """With --no-reconstruct the default's second moments are still collected (its score is the
    refit's error); the check before the collection warned that the default fell back to
    output variance."""
    path = _tiny_llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--count", "2", "--no-reconstruct", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--no-speed", "--out", tmp_path / "o"])
    assert code == 0, err
    assert not any("second moments" in line for line in err), err


def test_prune_uniform_of_a_family_without_attention_biases_refits_without_one(run, tmp_path, tiny_dir):  # noqa: F811
    """Mistral's config declares no attention bias: --uniform refits the kept columns without the
    output bias, says so, and saves a directory plain from_pretrained rebuilds exactly (the refit
    with a bias made it one only load_pruned could read)."""
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    from headprune.hf import load_pruned

    path = tmp_path / "mistral"
    torch.manual_seed(0)
    transformers.MistralForCausalLM(tiny_config("mistral")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    code, err = run(["prune", path, "--count", "4", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--uniform", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["refit_bias"] is False and "without an output bias" in report["recipe"]
    assert json.loads((tmp_path / "o" / "model" / "headprune.json").read_text())["plain_loadable"]
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").eval()(input_ids=ids)
        ours = load_pruned(tmp_path / "o" / "model")(input_ids=ids)
    assert torch.equal(plain.logits, ours.logits)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "p"])  # not uniform: the refit keeps its bias
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "report.json").read_text())["settings"]["refit_bias"] is True
    # the sweep's uniform recipe is what prune --uniform saves: the same heads, the same number
    code, err = run(["sweep", path, "--ratios", "0.5", "--seeds", "1", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--out", tmp_path / "s"])
    assert code == 0, err
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["heads"]["default, uniform layout"] == [report["pruned_heads"]]
    assert sweep["recipes"]["default, uniform layout"][0] == pytest.approx(report["after"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert", "mistral", "qwen2"])
def test_a_uniform_layout_no_config_describes_is_said_before_the_work(run, tmp_path, tiny_dir, family):  # noqa: F811
    """--uniform promises plain from_pretrained; Llama's config refuses 6 heads in a hidden size
    of 64 even with head_dim given (8 query heads over 2 KV heads, a Llama-3 ratio), BERT's
    derives the head size, and Mistral's and Qwen2's declare no output bias, which mean
    compensation and the value refit add:
    the directory was written for load_pruned only, without a word."""
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / family
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(tiny_config("llama", num_attention_heads=8, num_key_value_heads=2,
                                                          hidden_size=64))
        why = "llama's config refuses 6 attention heads (transformers' validation: hidden_size 64 must be a multiple"
    elif family == "bert":
        model, why = transformers.BertModel(tiny_config("bert")), "bert's config derives the head size from hidden_size"
    else:  # mean compensation, and the value refit of a model without grouped queries, add an output bias
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, num_key_value_heads=4))
        why = f"{family}'s config declares no attention output bias, which mean compensation (--no-reconstruct) and"
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    bias = {"mistral": ["--no-reconstruct"], "qwen2": ["--refit-values"]}.get(family, [])
    code, err = run(["prune", path, "--ratio", "0.5" if bias else "0.25", "--uniform", "--samples", "4",
                     "--seq-len", "16", "--quiet", "--no-speed", *bias, "--out", tmp_path / "o"])
    assert code == 0, err
    warned = [line for line in err if "loads with headprune.load_pruned" in line]
    assert len(warned) == 1 and why in warned[0], err
    assert not json.loads((tmp_path / "o" / "model" / "headprune.json").read_text())["plain_loadable"]
    if not bias:  # masked, the shapes stay: plain, and nothing to warn of
        code, err = run(["prune", path, "--ratio", "0.25", "--uniform", "--mask", "--samples", "4", "--seq-len", "16",
                         "--quiet", "--no-speed", "--out", tmp_path / "m"])
        assert code == 0 and not [line for line in err if "load_pruned" in line], err
        assert json.loads((tmp_path / "m" / "model" / "headprune.json").read_text())["plain_loadable"]


def test_steps_auto_of_one_round_is_steps_1_and_rounds_are_in_the_recipe(run, tmp_path, tiny_dir):  # noqa: F811
    """--steps auto that works out to one round ran as iterative all the same (another scope, no
    value refit, other heads), and the recipe text never said the heads were chosen in rounds."""
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert", num_hidden_layers=3, num_attention_heads=8)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    reports = {}
    for steps in ("1", "auto"):  # 2 of 24 heads: at most a tenth per round, one round
        code, err = run(["prune", path, "--count", "2", "--steps", steps, "--samples", "8", "--seq-len", "16",
                         "--quiet", "--no-speed", "--out", tmp_path / steps])
        assert code == 0, err
        reports[steps] = json.loads((tmp_path / steps / "report.json").read_text())
    one, auto = reports["1"], reports["auto"]
    assert auto["settings"]["steps"] == 1 and auto["recipe"] == one["recipe"]
    assert auto["pruned_heads"] == one["pruned_heads"] and auto["after"] == one["after"]
    code, err = run(["prune", _tiny_llama(tmp_path, tiny_dir), "--ratio", "0.25", "--steps", "2", "--samples", "4",
                     "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "two"])
    assert code == 0, err
    assert "chosen in 2 rounds, the statistics collected again after each" in json.loads(
        (tmp_path / "two" / "report.json").read_text())["recipe"]

