"""--refit-values through the command line: on by default for an encoder, said in the report and
the settings, off with --no-refit-values, refused with what it cannot extend, and the sweep's
default and random rows removing with it too."""

import json

import pytest

from test_cli import run, tiny_dir  # noqa: F401 - fixtures
from test_cli_gqa import _tiny_llama

pytest.importorskip("transformers")

FAST = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]


def _prune(run, path, out, *extra):  # noqa: F811
    code, err = run(["prune", path, "--ratio", "0.3", *FAST, "--out", out, *extra])
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


def test_encoder_default_refits_values_and_says_so(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import headprune.hf.values as V

    calls = []
    real = V.collect_values
    monkeypatch.setattr(V, "collect_values", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    report = _prune(run, tiny_dir, tmp_path / "on")
    assert report["settings"]["refit_values"] is True
    assert "value rows and output projection refit together" in report["recipe"]
    assert calls and {int(k): v for k, v in report["pruned_heads"].items()} == calls[0]
    assert "values" in report["seconds"]
    off = _prune(run, tiny_dir, tmp_path / "off", "--no-refit-values")
    assert off["settings"]["refit_values"] is False and "value rows" not in off["recipe"]
    assert len(calls) == 1
    # the two refits differ: the value rows were written
    assert off["after"]["fidelity"] != report["after"]["fidelity"]


def test_refit_values_refusals_name_the_option(run, tmp_path, tiny_dir):  # noqa: F811
    for extra, words in ((["--no-reconstruct"], "drop --no-reconstruct"), (["--sequential"], "drop --sequential"),
                         (["--steps", "2"], "drop --steps")):
        code, err = run(["prune", tiny_dir, "--ratio", "0.3", *FAST, "--out", tmp_path / "x", "--refit-values", *extra])
        assert code != 0 and any("--refit-values" in line and words in line for line in err), err
    llama = _tiny_llama(tmp_path, tiny_dir)
    code, err = run(["prune", llama, "--ratio", "0.3", *FAST, "--out", tmp_path / "y", "--refit-values"])
    assert code != 0 and any("--refit-values: needs a value projection of its own" in line for line in err), err
    assert not (tmp_path / "y").exists()
    # a causal LM does not refit values unless asked
    report = _prune(run, llama, tmp_path / "z")
    assert report["settings"]["refit_values"] is False


def test_sweep_removes_with_the_value_refit_on_an_encoder(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import headprune.hf.values as V

    calls = []
    real = V.collect_values
    monkeypatch.setattr(V, "collect_values", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    code, err = run(["sweep", tiny_dir, "--ratios", "0.3", "--seeds", "1", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--out", tmp_path / "s"])
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert result["values"] is True
    assert "value rows and output columns refit" in (tmp_path / "s" / "sweep.md").read_text()
    # the one-shot recipes and the random draw collect value moments; sequential and iterative ones do not
    assert len(calls) >= 2


def test_refit_values_with_what_rules_it_out_is_refused_before_the_model_loads(run, tmp_path):  # noqa: F811
    """--refit-values --no-reconstruct contradict each other whatever the model, but were refused
    only after it loaded: with an unreadable MODEL its error came first."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    (broken / "model.safetensors").write_text("garbage")
    for command in (["prune", broken, "--ratio", "0.3"], ["sweep", broken]):
        for extra, words in ((["--no-reconstruct"], "drop --no-reconstruct"), (["--sequential"], "drop --sequential"),
                             (["--steps", "2"], "drop --steps")):
            if command[0] == "sweep" and extra[0] != "--no-reconstruct":
                continue  # the sweep has neither option
            code, err = run([*command, "--quiet", "--out", tmp_path / "o", "--refit-values", *extra])
            assert code == 2 and err[-1].endswith(f"--refit-values: extends the one-shot least-squares refit; "
                                                  f"{words}"), err


@pytest.mark.parametrize("command", [["sweep", "m"], ["prune", "m", "--ratio", "0.3"]])
def test_refit_values_is_taken_with_distributed(command):
    """The writing rank chooses and removes on every calibration batch (--distributed spreads the
    collection only), and refits values on an encoder by default: asked for, it was refused with
    'drop --distributed', and prune --distributed dropped it (and the measured allocation) from
    its default without a word."""
    from headprune.app.cli import build_parser
    from headprune.app.sweep import check_removal_options

    check_removal_options(build_parser().parse_args([*command, "--distributed", "--refit-values"]))
    with pytest.raises(ValueError, match="drop --no-reconstruct$"):
        check_removal_options(build_parser().parse_args([*command, "--distributed", "--refit-values",
                                                         "--no-reconstruct"]))
