"""What the sweep refuses before it evaluates anything, and what its table says of each
recipe's refit."""

import pytest

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect


def _llama():
    model = tiny_model("llama", num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    return model, batches, collect(model, batches, progress=False, moments=True)


@pytest.mark.parametrize("recipes, who", [({"default": {}}, "the random baseline"),
                                          ({"entropy": {"score": "entropy", "scope": "per_layer"}},
                                           "the recipe 'entropy'")])
def test_a_fraction_out_of_reach_is_refused_before_the_first_evaluation(monkeypatch, recipes, who):
    """A fraction that a recipe cannot reach (the protected first layer and a head kept in every
    layer) was found after the fractions before it had been evaluated, and the finished ones
    were lost; the error named options the sweep does not have."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    model, batches, scores = _llama()
    evaluated = []
    monkeypatch.setattr(S, "quality", lambda *a, **k: evaluated.append(1) or {"perplexity": 1.0})
    seeds = 1 if who == "the random baseline" else 0
    config = S.SweepConfig(model="tiny", ratios=[0.3, 0.9], seeds=seeds, quiet=True, eval_windows=1, gqa="query")
    with pytest.raises(ValueError, match=rf"ratios: 0.9 is out of reach of {who} \(.*\); every recipe keeps its "
                                         "protected layers and a head in every layer: ask for smaller fractions"):
        S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, recipes, batches=batches)
    assert evaluated == []
    config.ratios = [0.3, 0.5]  # reachable by both: the sweep runs
    S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, recipes, batches=batches)
    assert evaluated


def test_the_table_names_recipes_whose_refit_leaves_the_value_rows_alone():
    """With the value refit on, the heading said every column refits value rows; the sequential
    and iterative recipes refit the output columns only."""
    from headprune.app.sweep import RECIPES, refits_values
    from headprune.app.sweep_table import sweep_markdown

    assert refits_values({}, True) and not refits_values({}, False) and not refits_values({"values": False}, True)
    assert not refits_values(RECIPES["default, sequential"], True) and not refits_values({"iterative": True}, True)
    result = {"lower_is_better": False, "metric": "fidelity", "model": "m", "data": "d", "baseline": 1.0,
              "removal": "refit", "values": True, "ratios": [0.3], "random": [],
              "recipes": {"default": [0.9], "default, sequential": [0.8]}, "output_refit_only": ["default, sequential"]}
    text = sweep_markdown(result)
    assert "kept heads' value rows and output columns refit by least squares" in text.splitlines()[0]
    assert "`default, sequential`: output columns refit only" in text
    assert "output columns refit only" not in sweep_markdown({**result, "values": False})


def test_a_cell_that_reads_as_the_random_mean_is_not_starred():
    from headprune.app.sweep_table import sweep_markdown

    result = {"lower_is_better": False, "metric": "fidelity", "model": "m", "data": "d", "baseline": 1.0,
              "removal": "refit", "ratios": [0.3], "recipes": {"a": [0.999991], "b": [0.99996]},
              "random": [[0.999989, 0.99999]]}
    row = [line for line in sweep_markdown(result).splitlines() if line.startswith("| 0.30")][0]
    assert row.startswith("| 0.30 | 0.99999 | 0.99996 | 0.99999 |")


def test_the_table_says_where_prune_would_round_what_the_sweep_evaluates():
    """prune rounds the pruned model to the type it saves (bfloat16 for a GGUF); the sweep
    evaluates the masked float32 refit, and its table did not say so."""
    from headprune.app.sweep_table import sweep_markdown

    result = {"lower_is_better": True, "metric": "perplexity", "model": "m", "data": "d", "baseline": 10.0,
              "removal": "refit", "ratios": [0.3], "random": [], "recipes": {"default": [11.0]},
              "settings": {"data": "d", "samples": 4, "seq_len": 8, "dtype": "float32", "checkpoint_dtype": "gguf"}}
    head = sweep_markdown(result).splitlines()[0]
    assert head.endswith("Evaluated in float32 with the refit unrounded; `headprune prune` of this gguf checkpoint "
                         "rounds the pruned model to bfloat16, the type it saves.")
    result["settings"]["dtype"] = "bfloat16"  # computed in the saved type: the refit is rounded there already
    assert "unrounded" not in sweep_markdown(result)
    for stored in ("float32", None):
        result["settings"].update(checkpoint_dtype=stored, dtype="float32")
        assert "unrounded" not in sweep_markdown(result)


def test_a_cell_whose_layout_removes_another_number_of_heads_says_so():
    """A uniform or whole-group layout that rounds to more or fewer heads than the random draws
    remove was starred against them as if the budgets were equal."""
    from headprune.app.sweep_table import sweep_markdown

    result = {"lower_is_better": True, "metric": "perplexity", "model": "m", "data": "d", "baseline": 10.0,
              "removal": "refit", "ratios": [0.4], "random": [[12.0, 13.0]], "random_heads": [[3, 3]], "heads_total": 8,
              "recipes": {"default": [11.0], "uniform": [11.5], "groups": [11.2]},
              "heads": {"default": [{"0": [1], "1": [0, 2]}], "uniform": [{"0": [1, 2], "1": [0, 2]}],
                        "groups": [{"1": [0, 1]}]}}
    text = sweep_markdown(result)
    row = [line for line in text.splitlines() if line.startswith("| 0.40")][0]
    assert row == "| 0.40 | 11 * | 11.5 (50% of heads) * | 11.2 (25% of heads) | 12.49 (38% of heads) | 12-13 |"
    assert ("`(x% of heads)`: the share of the heads removed, where the recipe's layout removes another number of "
            "heads than the random draws") in text
    result["random_heads"] = [[3, 2]]  # even layouts drawn over the whole model can differ: no cell matches both
    row = [line for line in sweep_markdown(result).splitlines() if line.startswith("| 0.40")][0]
    assert row == "| 0.40 | 11 (38% of heads) * | 11.5 (50% of heads) * | 11.2 (25% of heads) | 12.49 (25%-38% of heads) | 12-13 |"
    del result["random_heads"]  # earlier results files: as before
    assert "of heads)" not in sweep_markdown(result)


@pytest.fixture
def llama_dir(tmp_path, monkeypatch):
    """A tiny llama directory (3 layers of 4 query / 2 KV heads) in the working directory; the
    collection fails the test if it runs."""
    import torch
    import transformers
    from hf_tiny import save_tiny_bert, tiny_config

    import headprune.app.commands as C

    save_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama", num_hidden_layers=3)).save_pretrained(tmp_path / "llama")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "bert").save_pretrained(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(C, "_collect", lambda *a, **k: pytest.fail("collected before the ratios were checked"))
    return tmp_path / "llama"


def _sweep(capsys, path, *argv):
    from headprune.app.cli import main

    try:
        code = main(["sweep", str(path), "--samples", "4", "--seq-len", "16", "--quiet", "--seeds", "1", "--out", "s",
                     *argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("ratios, message", [
    (",", "argument --ratios: expected at least one ratio, got ','"),
    ("0.05", "--ratios: 0.05 of the model's 12 query heads is less than one; give at least 0.0834"),  # accepted
    ("0.3,0.9 --gqa query", "--ratios: 0.9 is out of reach of the random baseline ("),
])
def test_ratios_the_model_rules_out_are_refused_before_the_collection(llama_dir, capsys, ratios, message):
    """An empty --ratios ran the whole sweep to an empty table, a fraction below one head gave
    a table of unpruned cells, and fractions out of reach were refused after the collection."""
    ratios, *more = ratios.split()
    code, err = _sweep(capsys, llama_dir, "--ratios", ratios, *more)
    assert code == 2 and message in err and not (llama_dir.parent / "s").exists(), err


def _recipes_run(monkeypatch) -> dict:
    """The recipes a sweep goes on to run (filled when it would start them; it then stops, 130)."""
    import headprune.app.sweep_command as SC

    ran = {}

    def stop(config, loaded, scores, held, settings, recipes, batches=None, **kw):
        ran.update(recipes)
        raise KeyboardInterrupt

    monkeypatch.setattr(SC.C, "_collect", lambda *a, **k: None)
    monkeypatch.setattr(SC, "run_sweep", stop)
    return ran


def test_a_recipe_that_cannot_reach_a_ratio_is_left_out_with_a_warning(llama_dir, capsys, monkeypatch):
    """One recipe the user cannot leave out (whole KV groups: 3 of the 6 groups, the first layer
    kept whole) made every sweep of 0.5 impossible; it is left out, and the others run."""
    import headprune.app.sweep as S
    ran = _recipes_run(monkeypatch)
    code, err = _sweep(capsys, llama_dir, "--ratios", "0.5")
    assert code == 130 and "'default, whole KV groups' cannot reach 0.5 (" in err and "left out" in err
    assert "default, whole KV groups" not in ran and "default" in ran and "entropy, global (as written)" in ran
    assert set(ran) == set(S.RECIPES) - {"default, whole KV groups"}  # the uniform layout too: it protects none


def test_the_uniform_layout_under_gqa_query_is_run_and_said_as_even_layouts(llama_dir, capsys, monkeypatch):
    """It took even layouts (a config declares one) and was recorded under --gqa query, silently."""
    ran = _recipes_run(monkeypatch)
    code, err = _sweep(capsys, llama_dir, "--ratios", "0.25", "--gqa", "query")
    assert code == 130 and ran["default, uniform layout"] == {"uniform": True, "gqa": "even"}
    assert "under --gqa query the uniform layout keeps every KV group even (--gqa even)" in err, err
    import transformers

    from headprune.hf import prune_heads, save_pruned

    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    prune_heads(model, {1: [0, 1]})  # one whole KV group of layer 1: no uniform layout is left
    save_pruned(model, "pruned", tokenizer=transformers.AutoTokenizer.from_pretrained(llama_dir))
    code, err = _sweep(capsys, "pruned", "--ratios", "0.25", "--gqa", "query")
    assert code == 130 and "no uniform layout exists" in err and "under --gqa query" not in err, err  # no such row


def test_the_least_fraction_the_refusal_suggests_is_accepted(llama_dir, capsys, monkeypatch):
    import headprune.app.sweep_command as SC

    monkeypatch.setattr(SC.C, "_collect", lambda *a, **k: None)
    monkeypatch.setattr(SC, "run_sweep", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _sweep(capsys, llama_dir, "--ratios", "0.0834", "--gqa", "query")[0] == 130  # planned, then stopped
    # one head is no even layout of 4 query heads in 2 KV groups: the random draws would remove none, and their
    # column show the unpruned model (prune refuses such a ratio too)
    code, err = _sweep(capsys, llama_dir, "--ratios", "0.0834")
    assert code == 2 and ("--ratios: 0.0834 is out of reach of the random baseline (it rounds to no head in the "
                          "layouts the selection allows): ask for larger fractions") in err, err


@pytest.mark.parametrize("recipe", [{"removal": "mean"}, {"iterative": True}])
def test_a_recipe_s_own_removal_decides_its_default_scope_in_the_reach_check(monkeypatch, recipe):
    """An encoder's default scope is measured only with the refit in one round, and a measured
    allocation is left out of the reach check. The check resolved each recipe's default scope
    from the sweep-wide removal, so a recipe removing heads its own way was not checked, and its
    fraction failed after others had been evaluated."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    model = tiny_model("bert")
    batches = [tiny_batch("bert", seed=s) for s in range(2)]
    scores = collect(model, batches, progress=False, moments=True)
    evaluated = []
    monkeypatch.setattr(S, "quality", lambda *a, **k: evaluated.append(1) or {"fidelity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.3, 0.95], seeds=0, quiet=True, eval_windows=1, removal="refit")
    with pytest.raises(ValueError, match=r"ratios: 0.95 is out of reach of the recipe 'own'"):
        S.run_sweep(config, Loaded(model, None, "encoder", "tiny"), scores, [], {"data": "x"}, {"own": recipe},
                    batches=batches)
    assert evaluated == []


def test_kv_layout_recipes_run_only_where_queries_are_grouped(llama_dir, capsys, monkeypatch):
    """On a model without grouped queries the even and whole-KV-group recipes are the default
    again: two more columns of its figures (and two more sweeps of the model)."""
    import headprune.app.sweep as S
    ran = _recipes_run(monkeypatch)
    code, err = _sweep(capsys, llama_dir.parent / "bert", "--ratios", "0.25")
    kv = {k for k, kw in S.RECIPES.items() if "gqa" in kw}
    assert code == 130 and kv and not kv & set(ran) and "default" in ran, (err, sorted(ran))
    ran.clear()
    code, err = _sweep(capsys, llama_dir, "--ratios", "0.25")
    assert code == 130 and kv <= set(ran), (err, sorted(ran))


def test_random_draws_can_keep_the_default_s_protected_layers(monkeypatch):
    """``random_protect``: the draws keep a causal LM's first layer whole, as the default does, and
    the table's heading says so; without it (the default) they may take heads there."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded
    from headprune.app.sweep_table import sweep_markdown

    model, batches, scores = _llama()
    taken = {}
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    for protect in (False, True):
        monkeypatch.setattr(S._Evaluator, "__call__", lambda self, heads, *a, **k: taken.setdefault(protect, []).append(
            heads) or 1.0)
        config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=8, quiet=True, eval_windows=1, gqa="query",
                               random_protect=protect)
        result = S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"}, {},
                             batches=batches)
        assert result["random_protect"] is protect
        assert result["settings"]["damping"] == config.damping and result["settings"]["eval_windows"] == 1
        assert ("the default's protected layers kept whole" in sweep_markdown(result)) is protect
    assert any(0 in heads for heads in taken[False]) and not any(0 in heads for heads in taken[True])


def test_damping_zero_on_singular_moments_is_named_not_read_as_out_of_reach():
    """The reconstruction score's refusal of damping 0 on singular moments was reported as a
    fraction out of reach, advising smaller fractions; a random baseline reads no cost."""
    import torch

    import headprune.app.sweep as S
    from headprune.app.sweep_reach import out_of_reach

    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # KV head 1 of layer 1 gives nothing: singular moments
        model.layers[1].self_attn.v_proj.weight[8:16] = 0
    scores = collect(model, [tiny_batch("llama", seed=s) for s in range(2)], progress=False, moments=True)
    config = S.SweepConfig(model="tiny", ratios=[0.3], seeds=1, quiet=True, eval_windows=1, gqa="query", damping=0.0)
    assert out_of_reach(config, scores, {}) == {}  # the random baseline alone
    with pytest.raises(ValueError, match="^damping: 0 leaves these second moments singular"):
        out_of_reach(config, scores, {"default": {}})


def test_the_uniform_row_measures_its_first_layer_with_the_bias_its_removal_refits(monkeypatch):
    """With the value refit, prune --uniform measures the first layer's heads refitting the output
    bias (the value refit adds it); the sweep's uniform row measured them without it, so on a
    family whose config declares no attention bias it chose other heads than prune."""
    import headprune.app.sweep as S
    import headprune.hf.uniform as U
    from headprune.app.load import Loaded

    model = tiny_model("qwen2", num_key_value_heads=4)  # no grouped queries: its value rows can be refit
    batches = [tiny_batch("qwen2", seed=s, pad=False) for s in range(2)]
    scores = collect(model, batches, progress=False, moments=True)
    seen = []
    monkeypatch.setattr(U, "measure_uniform", lambda *a, refit_bias, **k: seen.append(refit_bias) or (a[3], {}))
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    config = S.SweepConfig(model="tiny", ratios=[0.5], seeds=0, quiet=True, eval_windows=1, values=True)
    S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"},
                {"uniform": {"uniform": True}}, batches=batches)
    assert seen == [True]


def test_a_uniform_layout_refit_without_the_bias_is_not_starred_against_draws_refit_with_it(monkeypatch):
    """On mistral (qwen2, phi3) the uniform row is refit without the output bias its config
    cannot declare, the draws with it: the table starred one against the other without a word."""
    import headprune.app.sweep as S
    from hf_tiny import tiny_batch, tiny_model

    from headprune.app.load import Loaded
    from headprune.app.sweep_table import sweep_markdown
    from headprune.hf import collect

    model, batches = tiny_model("mistral"), [tiny_batch("mistral", seed=s) for s in range(2)]
    scores = collect(model, batches, moments=True, progress=False)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})  # every cell better than the draws
    config = S.SweepConfig(model="tiny", ratios=[0.25], seeds=1, quiet=True, eval_windows=1)
    result = S.run_sweep(config, Loaded(model, None, "causal", "tiny"), scores, [], {"data": "x"},
                         {"default": {}, "uniform": {"uniform": True}}, batches=batches)
    assert result["unbiased"] == ["uniform"]
    result["random"] = [[2.0]]
    text = sweep_markdown(result)
    row = [line for line in text.splitlines() if line.startswith("| 0.25")][0]
    assert row.split(" | ")[1].endswith("*") and not row.split(" | ")[2].endswith("*"), row
    assert "`uniform`: kept heads refit without the output bias" in text and "removed otherwise" not in text
