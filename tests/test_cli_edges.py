"""Command-line edge cases: a scan of a layer left without heads, perplexity of a held-out
text too short to score or of a model whose loss overflows, a sweep of a pruned directory."""

import math

import pytest
import torch
import transformers

from hf_tiny import tiny_batch, tiny_model

from headprune.app import evaluate as E
from headprune.app.report import scores_markdown
from headprune.hf import collect, prune_heads

from test_speed import _tokenizer_dir


def test_scan_summary_of_a_layer_without_heads():
    model = tiny_model("llama")
    prune_heads(model, {0: [0, 1, 2, 3]})
    scores = collect(model, [tiny_batch("llama")], progress=False)
    text = scores_markdown("m", scores, {"samples": 1, "seq_len": 8, "data": "d"})
    assert f"| {scores.names[0]} | no head left |" in text and text.count("\n| ") == 3


def test_perplexity_of_too_short_a_text_and_of_an_overflowing_loss(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", tie_word_embeddings=False)).eval()
    with pytest.raises(ValueError, match=r"--data: the held-out text has 1 token\(s\); perplexity needs at least 2"):
        E.perplexity(model, tok, ["the"])
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # a mean loss far above exp's range
    result = E.perplexity(model, tok, ["the a of and to in was her she it he had not be " * 4], window=16, stride=16)
    assert result["nll"] > 709 and result["perplexity"] == math.inf
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)  # NaN is not an overflow: it was reported as inf
    assert math.isnan(E.perplexity(model, tok, ["the a of and to in was her she it he had not be " * 4], window=16,
                                   stride=16)["perplexity"])


def test_retrieval_counts_ties_against_the_true_document_and_nan_as_nan():
    """Constant or NaN embeddings used to score a perfect top-1 and MRR (strict '>' ranks)."""
    same = torch.ones(4, 8)
    assert E.retrieval_score(same, same)["top1"] == 0.0 and E.retrieval_score(same, same)["mrr"] == 0.25
    nan = torch.full((4, 8), math.nan)
    assert math.isnan(E.retrieval_score(nan, nan)["top1"]) and math.isnan(E.retrieval_score(nan, nan)["mrr"])
    eye = torch.eye(4)
    assert E.retrieval_score(eye, eye)["top1"] == 1.0


def test_a_sweep_of_a_pruned_directory_leaves_out_the_uniform_layout(tmp_path, monkeypatch, capsys):
    import json

    from test_cli_save_dtype import _checkpoint

    from headprune.app.cli import main

    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    common = ["--samples", "4", "--seq-len", "16", "--quiet"]
    assert main([str(a) for a in ["prune", path, "--count", "2", "--no-speed", "--out", "p", *common]]) == 0
    pruned = json.loads((tmp_path / "p" / "report.json").read_text())["pruned_heads"]
    assert pruned and "0" not in pruned  # the first layer kept whole: the layers differ
    capsys.readouterr()
    code = main(["sweep", "p/model", "--ratios", "0.2", "--seeds", "1", "--out", "s", "--eval-paragraphs", "2",
                 *common])
    err = capsys.readouterr().err
    # the table says the held-out text was cut short
    assert "`, its first 2 of " in (tmp_path / "s" / "sweep.md").read_text()
    assert code == 0, err
    assert "no uniform layout exists: default, uniform layout left out" in err
    assert "default, uniform layout" not in json.loads((tmp_path / "s" / "sweep.json").read_text())["recipes"]


def test_prune_refuses_a_gate_checkpoint_inside_its_output_and_compares_weights_with_weights(tmp_path, monkeypatch,
                                                                                              capsys):
    import json

    from test_cli_save_dtype import _checkpoint

    from headprune.app.cli import main

    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    common = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code = main([str(a) for a in ["prune", path, "--count", "2", "--score", "learned", "--learn-checkpoint",
                                  "o/gates.pt", "--out", "o", *common]])
    assert code == 2 and "--learn-checkpoint: at or inside the output directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main([str(a) for a in ["prune", path, "--count", "2", "--score", "learned", "--learn-checkpoint", "",
                                  "--out", "o", *common]])
    assert code == 2 and "--learn-checkpoint: expected the path of a file, got ''" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the tokenizer and the scores make the directory larger than the input's weights, not its weights
    assert main([str(a) for a in ["prune", path, "--count", "2", "--out", "p", *common]]) == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["saved_weight_bytes"] < report["input_bytes"] < report["saved_bytes"]
    assert "larger than" not in capsys.readouterr().err


def test_a_sweep_plot_without_random_draws(tmp_path):
    from headprune.app.plots import sweep_plot

    result = {"model": "m", "data": "d", "metric": "perplexity", "lower_is_better": True, "baseline": 10.0,
              "ratios": [0.1, 0.2], "recipes": {"default": [11.0, 12.0]}, "random": [[], []], "default_recipe": "default"}
    sweep_plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_pruning_a_masked_directory_again(tmp_path, monkeypatch, capsys):
    """A masked model's heads are zero output columns, which masking again chose again (nothing
    new removed): refused; pruning removes them physically first and chooses among the rest."""
    import json

    from test_cli_save_dtype import _checkpoint

    from headprune.app.cli import main
    from headprune.hf import kept_heads, load_pruned

    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    common = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--gqa", "query"]
    assert main([str(a) for a in ["prune", path, "--count", "2", "--mask", "--out", "m", *common]]) == 0
    masked = {int(k): v for k, v in json.loads((tmp_path / "m" / "report.json").read_text())["pruned_heads"].items()}
    capsys.readouterr()
    assert main(["prune", "m/model", "--count", "2", "--mask", "--out", "m2", *common]) == 2
    assert "already holds 2 masked heads" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    assert main(["prune", "m/model", "--count", "1", "--out", "p", *common]) == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    new = {int(k): v for k, v in report["pruned_heads"].items()}
    assert report["settings"]["masked_in_input"] == 2 and sum(map(len, new.values())) == 1
    assert "Pruned 1 of 6 heads" in (tmp_path / "p" / "report.md").read_text() and "The 2 heads the model held " \
        "masked (zero output columns) were removed first and are not counted here" in (tmp_path / "p" / "report.md").read_text()
    kept = kept_heads(load_pruned(tmp_path / "p" / "model"))
    for layer, heads in kept.items():  # both rounds' heads are gone, by their original indices
        assert set(heads).isdisjoint({*masked.get(layer, []), *new.get(layer, [])})
    assert sum(map(len, kept.values())) == 4 * 2 - 3
    # a sweep of the masked directory removes them first as well, and chooses among the rest
    assert main(["sweep", "m/model", "--ratios", "0.25", "--seeds", "1", "--out", "s", *common[:4]]) == 0
    result = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert result["settings"]["masked_in_input"] == 2
    for chosen in result["heads"]["default"]:  # per ratio; no masked head chosen again
        for layer, heads in chosen.items():
            assert set(heads).isdisjoint(masked.get(int(layer), []))
    # and a scan: it reported masked heads among the live ones (the most diffuse head of a layer)
    assert main(["scan", "m/model", "--out", "sc", *common[:4]]) == 0
    scores = json.loads((tmp_path / "sc" / "scores.json").read_text())
    assert scores["settings"]["masked_in_input"] == 2 and sum(scores["num_heads"]) == 4 * 2 - 2
    assert "The 2 heads the model held masked (zero output columns) were removed first" in \
        (tmp_path / "sc" / "summary.md").read_text()


def test_a_learned_score_budget_out_of_reach_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from test_cli_save_dtype import _checkpoint

    from headprune.app.cli import main
    from headprune.hf import learned

    def train(*args, **kwargs):
        raise AssertionError("the gates trained")

    monkeypatch.setattr(learned, "learn_gates", train)
    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    # the first layer is kept whole: 3 of the second layer's 4 heads at most
    code = main([str(a) for a in ["prune", path, "--count", "4", "--score", "learned", "--gqa", "query", "--out", "o",
                                  "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]])
    assert code == 2 and "4 units requested but --protect-layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_sweep_refuses_refit_values_it_cannot_run_before_collecting(tmp_path, monkeypatch, capsys):
    """``sweep --refit-values`` on a grouped-query model was refused only after the collection,
    and with ``--no-reconstruct`` it was ignored; both are refused first, as ``prune`` does."""
    from headprune.app.cli import main

    path = _never_collecting(tmp_path, monkeypatch)
    common = ["--ratios", "0.2", "--samples", "4", "--seq-len", "16", "--quiet", "--refit-values"]
    assert main([str(a) for a in ["sweep", path, "--out", "s", *common]]) == 2
    assert "--refit-values: needs a value projection of its own" in capsys.readouterr().err
    assert main([str(a) for a in ["sweep", path, "--out", "s", "--no-reconstruct", *common]]) == 2
    assert "drop --no-reconstruct" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_the_heatmap_says_when_measurement_chose_the_heads():
    """The encoders' default removes heads by measured cost; the heatmap's panel of the ranking's
    values called that ranking the score that chose them."""
    from hf_tiny import tiny_batch, tiny_model

    from headprune.app.selection_panel import selection_label as _selection_label

    scores = collect(tiny_model("bert"), [tiny_batch("bert")], progress=False, moments=True)
    assert _selection_label(scores, {"scope": "measured"}).endswith("(for reference: the heads went by measured "
                                                                    "removal cost)")
    assert _selection_label(scores, {"scope": "per_layer"}).endswith("(the score that chose the heads)")


@pytest.mark.parametrize("selection", [False, True])
def test_every_text_of_the_heatmap_is_inside_the_image(tmp_path, monkeypatch, selection):
    """The second panel's description was its colour bar's label, which ran off the image's right
    edge; and the panel had no title."""
    import matplotlib
    from hf_tiny import tiny_batch, tiny_model
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from headprune.app import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    scores = collect(tiny_model("bert"), [tiny_batch("bert")], progress=False)
    label = "reconstruction (for reference: the heads went by measured removal cost)"
    plots.heatmap(scores, tmp_path / "h.png", pruned={1: [0, 2]}, title="minilm: pruned heads", protected=(0,),
                  selection=torch.randn(2, 4) if selection else None, selection_label=label)
    (fig,) = figures
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # laid out at the figure's own dpi, as its box is
    renderer = canvas.get_renderer()
    box = fig.bbox
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    assert any(label.split()[0] in t.get_text() for t in texts) == selection
    for t in texts:
        e = t.get_window_extent(renderer)
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, t.get_text()
    # each panel says what it shows, unless the figure's title already does
    want = ["mean attention entropy", label] if selection else ["mean attention entropy"]
    assert [ax.get_title().replace("\n", " ") for ax in fig.axes[: len(want)]] == want


def test_layer_and_kv_options_the_model_cannot_take_are_refused_before_collecting(tmp_path, monkeypatch, capsys):
    """``--protect-layers 99`` and ``--kv-ratio`` on a model without grouped queries were refused
    only after the collection; both are refused against the model's sites first."""
    from hf_tiny import tiny_config

    from headprune.app.cli import main

    path = _never_collecting(tmp_path, monkeypatch)
    common = ["--ratio", "0.3", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    assert main([str(a) for a in ["prune", path, "--out", "o", "--protect-layers", "0,99", *common]]) == 2
    assert "--protect-layers: indices [99] out of range for 2 layers" in capsys.readouterr().err
    plain = tmp_path / "mha"
    config = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(plain)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(plain)
    assert main([str(a) for a in ["prune", plain, "--out", "o", "--kv-ratio", "0.25", *common]]) == 2
    assert f"--kv-ratio: {plain} has no grouped queries" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_command_line_mistakes_are_reported_by_their_command(capsys, monkeypatch):
    """An unknown option is named by the command it was given to, a repeated sweep ratio is
    refused, and only prune's --dtype help points at --save-dtype."""
    from headprune.app.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["prune", "minilm", "--ratio", "0.3", "--Ratio", "0.3"])
    assert e.value.code == 2 and "headprune prune: error: unrecognized arguments: --Ratio 0.3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "minilm", "--ratios", "0.1,0.3,0.3"])
    assert "--ratios: expected each ratio once, got 0.3 more than once" in capsys.readouterr().err
    monkeypatch.setenv("COLUMNS", "1000")  # help on one line per option
    parser = build_parser()
    commands = next(a.choices for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    assert "see --save-dtype" in commands["prune"].format_help()
    for name in ("scan", "eval", "sweep"):
        assert "--save-dtype" not in commands[name].format_help(), name


def test_reports_are_strict_json_and_scores_keep_what_was_collected(tmp_path):
    """report.json and sweep.json held NaN / Infinity (Python's json), which strict parsers
    reject; a value that is not finite is written as null. scores.json keeps its numbers."""
    import json

    import numpy as np

    from headprune.app.commands import _write_json

    report = {"after": {"perplexity": math.nan, "tokens": 3, "ok": True, "bytes": np.float32(math.inf)},
              "rows": [1.5, -math.inf, (torch.tensor(2.0), None)], "model": "m"}
    _write_json(tmp_path / "report.json", report)
    text = (tmp_path / "report.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert strict == {"after": {"perplexity": None, "tokens": 3, "ok": True, "bytes": None},
                      "rows": [1.5, None, [2.0, None]], "model": "m"}
    assert report["after"]["perplexity"] != report["after"]["perplexity"]  # the caller's dict is not changed
    _write_json(tmp_path / "scores.json", {"v": [math.inf]}, strict=False)
    assert json.loads((tmp_path / "scores.json").read_text()) == {"v": [math.inf]}


@pytest.mark.parametrize("extra, message", [
    (["--no-reconstruct"], "--sequential: calibrates the least-squares refit; drop --no-reconstruct"),
    (["--steps", "2"], "--steps: --sequential calibrates the unpruned model layer by layer"),
    (["--order", "random", "--seed", "3"], "--order: --sequential re-chooses each layer's heads"),
    (["--score", "variance"], "--score: with --sequential each layer's heads are re-chosen"),
    (["--score", "learned"], "--score learned: --sequential re-chooses"),
], ids=["no-reconstruct", "steps", "order", "score", "learned"])
def test_what_sequential_would_ignore_is_refused_before_collecting(tmp_path, monkeypatch, capsys, extra, message):
    """--sequential keeps only each layer's count and re-chooses the heads by the refit: options
    that changed nothing (--score per layer, --order, --steps, learned gates) were accepted and
    named in the report, and --no-reconstruct was refused only after the collection."""
    from headprune.app.cli import main

    path = _never_collecting(tmp_path, monkeypatch)
    argv = ["prune", path, "--ratio", "0.3", "--sequential", "--out", "o", "--samples", "4", "--seq-len", "16",
            "--quiet", "--no-speed", *extra]
    assert main([str(a) for a in argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_sweep_without_the_refit_leaves_out_what_calibrates_or_measures_it(capsys):
    """sweep --no-reconstruct calibrated the refit layer by layer (or measured it) and then
    evaluated the heads without it; such recipes are refused by run_sweep and left out by the
    command with a warning."""
    from headprune.app.sweep import RECIPES, refit_only, run_sweep

    assert refit_only(RECIPES, "refit") == []
    off = refit_only(RECIPES, "mean")
    assert "default, sequential" in off and "default, measured allocation" in off and "default" not in off
    assert refit_only({"x": {"sequential": True, "removal": "refit"}}, "zero") == []

    class Config:
        removal = "zero"

    with pytest.raises(ValueError, match="recipes: 'default, sequential' calibrate or measure the least-squares refit"):
        run_sweep(Config(), None, None, [], {}, {"default, sequential": {"sequential": True}})


def test_the_folder_prune_writes_is_read_as_its_model(tmp_path, monkeypatch):
    """``eval p30`` (the folder prune wrote) was refused for having no config.json, and
    ``export p30/model`` did not find the GGUF its prune had read; both read what prune wrote."""
    import json

    from test_cli_save_dtype import _checkpoint

    from headprune.app.export_command import _report
    from headprune.app.load import load_model

    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    out = tmp_path / "p30"
    out.mkdir()
    path.rename(out / "model")
    (out / "report.json").write_text(json.dumps({"model": "smollm2"}))
    loaded = load_model(str(out))
    assert str(loaded.source).endswith("p30/model") and loaded.kind == "causal"
    assert _report(out) == _report(out / "model") == {"model": "smollm2"}
    assert _report(tmp_path) is None


def test_the_report_says_how_much_of_the_held_out_text_was_scored():
    from headprune.app.report import report_markdown

    report = {"model": "m", "heads_pruned": 1, "heads_total": 8, "recipe": "r", "settings": {
        "mode": "physical", "samples": 4, "seq_len": 16, "data": "d", "held_out_paragraphs": 346},
        "after": {"perplexity": 9.0, "windows": 48, "window": 256, "tokens": 12240}}
    assert "quality on 48 windows of 256 tokens (12,240 tokens scored) of its held-out part (346 paragraphs)" in \
        report_markdown(report, "")
    del report["after"]["windows"]
    assert "quality on its held-out part (346 paragraphs)" in report_markdown(report, "")


def _never_collecting(tmp_path, monkeypatch):
    """A tiny Llama checkpoint to run the command line on, in ``tmp_path`` as the working
    directory, with the collection replaced by a failure: what is refused before it."""
    from test_cli_save_dtype import _checkpoint

    from headprune.app import commands

    def collect(*args, **kwargs):
        raise AssertionError("collected")

    monkeypatch.setattr(commands, "_collect", collect)
    monkeypatch.chdir(tmp_path)
    return _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)


def test_pictures_and_summaries_of_a_pruned_model_name_heads_by_original_index():
    """A model pruned before keeps fewer heads: the heatmap's columns and the scan summary's
    rows are positions among the heads kept, while reports name heads by original index."""

    model = tiny_model("llama")
    prune_heads(model, {1: [1]})  # layer 1 keeps heads 0, 2, 3
    scores = collect(model, [tiny_batch("llama")], progress=False)
    # the heatmap's columns
    assert {i: scores.positions(i, hs) for i, hs in {1: [2, 3], 0: [1]}.items()} == {1: [1, 2], 0: [1]}
    from headprune.core.schema import Stat

    count = scores.stats[1, :3, Stat.COUNT]
    scores.stats[1, :3, Stat.SUM] = count * torch.tensor([0.1, 5.0, 0.2], dtype=count.dtype)  # position 1 most diffuse
    row = next(line for line in scores_markdown("m", scores, {"samples": 1, "seq_len": 8, "data": "d"}).splitlines()
               if line.startswith(f"| {scores.names[1]} |"))
    assert row.split("|")[5].strip() == "2"  # original head 2, at position 1
