"""``headprune eval``: an encoder's quality is its fidelity to the unpruned model, which eval
takes from ``--teacher`` or from the report of the directory it evaluates (it printed no
fidelity at all), and a causal LM's perplexity is set beside the teacher's when one is given."""

import json
import re
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)

COMMON = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--data", "text.txt"]
SENTENCES = ["She had not been to the sea.", "It was her own and he had it.", "The sea was not a place to be.",
             "He had to be in the house."]


@pytest.fixture(autouse=True)
def _text(tmp_path):  # run() works in tmp_path: a short text there, for prune and eval alike
    paragraphs = [" ".join(SENTENCES[(i + k) % 4] for k in range(3)) + f" {i}" for i in range(60)]  # 18 held out
    (tmp_path / "text.txt").write_text("\n\n".join(paragraphs))


def _llama(tmp_path, tiny_dir):
    """A tiny random Llama saved with the tiny BERT's tokenizer; its path."""
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


def _eval(run, argv):  # noqa: F811
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", *argv, "--json", "--eval-windows", "2", "--quiet", "--data", "text.txt"])
    return code, err, (json.loads(out.getvalue()) if code == 0 else None)


def test_eval_of_a_pruned_encoder_gives_the_fidelity_its_report_gave(run, tmp_path, tiny_dir):  # noqa: F811
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *COMMON, "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for model in (tmp_path / "o", tmp_path / "o" / "model"):
        code, err, result = _eval(run, [model])
        assert code == 0 and not err, err
        assert result["teacher"] == str(tiny_dir) and result["fidelity"] == pytest.approx(report["after"]["fidelity"],
                                                                                          abs=1e-6)
        assert result["fidelity"] < 1
        assert result["tokens_per_s_low"] <= result["tokens_per_s"] <= result["tokens_per_s_high"]  # a spread
    code, err, result = _eval(run, [tmp_path / "o", "--teacher", tmp_path / "o" / "model"])  # the model itself
    assert code == 0 and result["fidelity"] == pytest.approx(1.0, abs=1e-6)
    code, err, result = _eval(run, [tiny_dir])  # no teacher anywhere: said, and no made-up 1.0
    assert code == 0 and "fidelity" not in result
    assert err == ["headprune: warning: no fidelity: an encoder's is measured against the unpruned model; pass "
                   "--teacher MODEL"]


def test_eval_says_when_the_named_teacher_is_gone(run, tmp_path, tiny_dir):  # noqa: F811
    shutil.copytree(tiny_dir, tmp_path / "orig")
    code, err = run(["prune", tmp_path / "orig", "--ratio", "0.3", *COMMON, "--out", tmp_path / "o"])
    assert code == 0, err
    shutil.rmtree(tmp_path / "orig")
    code, err, result = _eval(run, [tmp_path / "o"])
    assert code == 0 and "fidelity" not in result and "retrieval_top1" in result
    assert err == [f"headprune: warning: no fidelity: {tmp_path / 'orig'}, the unpruned model that its report.json "
                   "names, is not found here; pass --teacher"]
    code, err, _ = _eval(run, [tmp_path / "o", "--teacher", tmp_path / "orig"])  # named: a failure
    assert code == 2 and err[-1].startswith(f"headprune eval: error: --teacher: '{tmp_path / 'orig'}' is not a bundled name")


def test_a_mistyped_teacher_is_refused_before_the_model_loads(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    def load_model(*a, **kw):
        raise AssertionError("MODEL loaded before --teacher was checked")

    monkeypatch.setattr("headprune.app.eval_command.load_model", load_model)
    for teacher, said in ((tmp_path / "nowhere", "is not a bundled name"), (tmp_path / "text.txt", "is a file but not "
                                                                                    "a .gguf file"), (tmp_path, "has no config.json")):
        code, err, _ = _eval(run, [tiny_dir, "--teacher", teacher])
        assert code == 2 and err[-1].startswith("headprune eval: error: --teacher: ") and said in err[-1], err


def test_eval_of_a_causal_lm_sets_the_teacher_perplexity_beside_it(run, tmp_path, tiny_dir):  # noqa: F811
    import transformers

    from hf_tiny import tiny_config

    path = _llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--count", "2", *COMMON, "--eval-windows", "2", "--out", tmp_path / "o"])
    assert code == 0, err
    code, err, alone = _eval(run, [tmp_path / "o"])  # a causal LM needs no teacher, and loads none by itself
    assert code == 0 and not err and "teacher" not in alone
    code, err, result = _eval(run, [tmp_path / "o", "--teacher", path])
    teacher = _eval(run, [path])[2]
    assert result["perplexity"] == alone["perplexity"] and result["teacher_perplexity"] == teacher["perplexity"]
    assert result["perplexity_vs_teacher"] == pytest.approx(result["perplexity"] / teacher["perplexity"], rel=1e-12)
    code, err, _ = _eval(run, [tmp_path / "o", "--teacher", tiny_dir])  # an encoder as a causal LM's teacher
    assert code == 2 and err[-1].endswith(f"--teacher: {tiny_dir} is an encoder model, MODEL a causal one")
    # a teacher of another tokenizer: its perplexity is over other tokens (the ratio was printed)
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(other)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_tokens(["zzqx"])
    tok.save_pretrained(other)
    code, err, _ = _eval(run, [tmp_path / "o", "--teacher", other])
    assert code == 2 and f"--teacher: {other} has another tokenizer than MODEL" in err[-1], err
    # the same weights and vocabulary, read otherwise (lowercased) or in shorter windows: its
    # perplexity was over other tokens and windows, and the pruned model was reported against it
    import tokenizers

    shutil.copytree(path, tmp_path / "plain")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tok.save_pretrained(tmp_path / "plain")
    code, err, _ = _eval(run, [tmp_path / "o", "--teacher", tmp_path / "plain"])
    assert code == 2 and err[-1].startswith(f"headprune eval: error: --teacher: {tmp_path / 'plain'} reads text as "
                                            "other tokens than MODEL (its tokenizer has the same vocabulary but other "
                                            "special tokens, case or normalisation"), err
    short = transformers.LlamaForCausalLM.from_pretrained(path)
    short.config.max_position_embeddings = 16
    short.save_pretrained(tmp_path / "short")
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "short")
    code, err, _ = _eval(run, [tmp_path / "o", "--teacher", tmp_path / "short"])
    assert code == 2 and "takes inputs of up to 16 tokens where MODEL is evaluated on " in err[-1], err
    # longer inputs than the windows evaluated (4,096 against 8,192 positions): the same windows
    from headprune.app.inputs import check_teacher
    from headprune.app.load import Loaded

    models = [transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=n)) for n in (4096, 8192)]
    check_teacher("T", *(Loaded(m, tok, "causal", "x") for m in models))


def test_a_report_that_cannot_be_read_costs_the_fidelity_only(run, tmp_path, tiny_dir):  # noqa: F811
    """eval read the folder's report.json before the model, for any kind: a damaged one failed
    the evaluation, a causal LM's included, which needs no teacher."""
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *COMMON, "--out", tmp_path / "o"])
    assert code == 0, err
    (tmp_path / "o" / "report.json").write_text("{")
    code, err, result = _eval(run, [tmp_path / "o"])
    assert code == 0 and "fidelity" not in result and len(err) == 1
    assert err[0].startswith("headprune: warning: no fidelity: MODEL: ") and "is not valid JSON" in err[0]


def test_eval_prints_its_spread_and_can_leave_out_the_timing(run, tmp_path, tiny_dir):  # noqa: F811
    """Its tokens/s figure came without a spread (another run read 4x another), could not be
    left out, and numbers were printed unlike the report (raw ints, None)."""
    code, err, result = _eval(run, [tiny_dir, "--no-speed"])
    assert code == 0 and "tokens_per_s" not in result and result["parameters"] > 0
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", tiny_dir, "--eval-windows", "2", "--quiet", "--data", "text.txt"])
    lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    assert code == 0 and "(quartiles of 5 repeats " in lines["tokens_per_s"] and "tokens_per_s_low" not in lines
    assert "," in lines["parameters"] and "None" not in "".join(lines.values()) and "e+" not in lines["tokens_per_s"]


def test_eval_sizes_the_kv_cache_in_the_type_prune_reported(run, tmp_path, tiny_dir):  # noqa: F811
    """eval sized it in the compute type (float32) and the report in the saved type (bfloat16):
    the same model's cache read twice as large."""
    from test_cli_save_dtype import _checkpoint

    path = _checkpoint(tmp_path, tiny_dir, "bfloat16", config_names_it=True)
    code, err = run(["prune", path, "--count", "2", *COMMON, "--eval-windows", "2", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    code, err, result = _eval(run, [tmp_path / "o", "--no-speed"])
    assert code == 0 and result["kv_cache_dtype"] == report["after"]["kv_cache_dtype"] == "bfloat16"
    assert result["kv_cache_bytes_per_token"] == report["after"]["kv_cache_bytes_per_token"]
    code, err, result = _eval(run, [path, "--no-speed"])
    assert result["kv_cache_bytes_per_token"] == report["before"]["kv_cache_bytes_per_token"]


def test_a_held_out_text_too_short_for_its_figure_is_said_before_the_work(run, tmp_path, tiny_dir):  # noqa: F811
    """eval printed a perplexity over 2 tokens (less than one window) and a fidelity over one
    paragraph as it prints any other, with nothing to say they were noise. The window is the
    model's (this llama takes 64 positions); scan, which gives no quality figure, says nothing,
    and sweep counts the paragraphs it evaluates (--eval-paragraphs)."""
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    (tmp_path / "short.txt").write_text("She had not been to the sea.\n\nIt was her own.\n\nHe had it.")
    warning = ("headprune: warning: --data: {}: its held-out part {}: the quality figures will be mostly noise; a "
               "longer text gives figures worth comparing")
    for model, why in ((path, r"has \d token\(s\), fewer than one window of 64 for the perplexity"),
                       (tiny_dir, r"has 1 paragraph\(s\), fewer than 16 for the fidelity")):
        code, err = run(["eval", model, "--teacher", model, "--quiet", "--no-speed", "--data", "short.txt"])
        assert code == 0 and len(err) == 1 and re.fullmatch(warning.format("short.txt", why), err[0]), err
    code, err, result = _eval(run, [path, "--no-speed"])  # the fixture's text: 18 paragraphs held out, no warning
    assert code == 0 and not err and result["windows"] >= 2, err
    code, err = run(["scan", tiny_dir, "--samples", "2", "--seq-len", "16", "--quiet", "--data", "short.txt",
                     "--out", tmp_path / "s"])
    assert code == 0 and err == [], err
    code, err = run(["sweep", tiny_dir, "--ratios", "0.3", "--seeds", "1", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--data", "text.txt", "--eval-paragraphs", "3", "--out", tmp_path / "w"])
    assert code == 0 and err[:1] == [warning.format("text.txt", "has 3 paragraph(s), fewer than 16 for the fidelity")]
    code, err = run(["sweep", tiny_dir, "--ratios", "0.3", "--seeds", "1", "--samples", "4", "--seq-len", "16",
                     "--quiet", "--data", "text.txt", "--eval-paragraphs", "500", "--out", tmp_path / "w2"])
    said = [e for e in err if e.startswith("headprune: warning: --eval-paragraphs: 500 asked")]  # all, fewer than asked
    assert code == 0 and len(said) == 1 and said[0].endswith("text.txt has 18; all 18 are evaluated"), err


def test_eval_says_when_it_computes_in_another_type_than_the_report(run, tmp_path, tiny_dir):  # noqa: F811
    """A prune with --dtype bfloat16 reported its figures in bfloat16; eval of the directory
    computed in float32 and printed another perplexity, with nothing to say why. (float16 here:
    torch's bfloat16 SDPA fails under ATEN_CPU_CAPABILITY=avx2 on CPUs with AMX.)"""
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    code, err = run(["prune", path, "--count", "2", *COMMON, "--dtype", "float16", "--eval-windows", "2",
                     "--out", tmp_path / "o"])  # the windows eval takes (_eval)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    code, err, result = _eval(run, [tmp_path / "o", "--no-speed"])
    assert code == 0 and err == ["headprune: warning: MODEL was evaluated in float16 when it was pruned or recovered "
                                 "(its report.json); this evaluation computes in float32, so its figures can differ "
                                 "from the report's: pass --dtype float16 to reproduce them"], err
    code, err, result = _eval(run, [tmp_path / "o", "--no-speed", "--dtype", "float16"])
    assert code == 0 and not err and result["perplexity"] == report["after"]["perplexity"], err
    # a recovery in a 16-bit type records it too (its report named none, and the pruning's in its settings)
    code, err = run(["prune", path, "--count", "2", *COMMON, "--save-dtype", "float16", "--eval-windows", "2",
                     "--out", tmp_path / "b"])
    assert code == 0, err
    code, err = run(["recover", tmp_path / "b", "--steps", "1", "--dtype", "float16", "--validation", "0",
                     "--samples", "4", "--quiet", "--data", "text.txt", "--eval-windows", "2", "--out", tmp_path / "r"])
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["compute_dtype"] == report["settings"]["dtype"] == "float16"
    code, err, result = _eval(run, [tmp_path / "r", "--no-speed"])
    assert code == 0 and err == ["headprune: warning: MODEL was evaluated in float16 when it was pruned or recovered "
                                 "(its report.json); this evaluation computes in float32, so its figures can differ "
                                 "from the report's: pass --dtype float16 to reproduce them"], err
    code, err, result = _eval(run, [tmp_path / "r", "--no-speed", "--dtype", "float16"])
    assert code == 0 and not err and result["perplexity"] == report["quality"]["held_out"]["recovered"], err


def test_eval_says_when_the_report_took_another_number_of_windows(run, tmp_path, tiny_dir):  # noqa: F811
    """prune --eval-windows 4 reported one perplexity and eval (48 windows by default) another,
    without a word: the number of windows was not recorded."""
    import io
    from contextlib import redirect_stdout

    path = _llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--count", "2", *COMMON, "--eval-windows", "1", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["eval_windows"] == 1
    code, err, result = _eval(run, [tmp_path / "o", "--no-speed"])  # 2 windows
    assert code == 0 and err == ["headprune: warning: MODEL's report.json measured perplexity over 1 windows; this "
                                 "evaluation takes up to 2, so its figures can differ from the report's: pass "
                                 "--eval-windows 1 to reproduce them"], err
    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", tmp_path / "o", "--json", "--eval-windows", "1", "--quiet", "--data", "text.txt",
                         "--no-speed"])
    assert code == 0 and not err and json.loads(out.getvalue())["perplexity"] == report["after"]["perplexity"], err
    # a limit above the windows the text gives: any limit that reads them all reproduces the figure, unsaid
    code, err = run(["prune", path, "--count", "2", *COMMON, "--eval-windows", "500", "--out", tmp_path / "all"])
    assert code == 0, err
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert 2 < report["after"]["windows"] < 48
    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", tmp_path / "all", "--json", "--quiet", "--data", "text.txt", "--no-speed"])
    assert code == 0 and not err and json.loads(out.getvalue())["perplexity"] == report["after"]["perplexity"], err
    code, err, result = _eval(run, [tmp_path / "all", "--no-speed"])  # 2 windows: fewer than the report read
    assert code == 0 and err == [f"headprune: warning: MODEL's report.json measured perplexity over "
                                 f"{report['after']['windows']} windows (all its text gives); this evaluation takes up "
                                 "to 2, so its figures can differ from the report's: pass --eval-windows 500 to "
                                 "reproduce them"], err
    code, err = run(["recover", tmp_path / "all", "--steps", "1", "--validation", "0", "--samples", "4", "--quiet",
                     "--data", "text.txt", "--eval-windows", "500", "--out", tmp_path / "r"])  # a recovery's alike
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", tmp_path / "r", "--json", "--quiet", "--data", "text.txt", "--no-speed"])
    assert code == 0 and not err and json.loads(out.getvalue())["perplexity"] == \
        report["quality"]["held_out"]["recovered"], err


def test_eval_refuses_a_text_named_twice_a_bundled_name_that_is_a_path_and_a_teacher_of_another_width(
        run, tmp_path, tiny_dir):  # noqa: F811
    """eval read the bundled text where --data named a file here too (the other commands refuse
    it); a text named twice counted its held-out paragraphs twice; a teacher whose embeddings
    have another width failed inside the cosine with a traceback."""
    import transformers

    from hf_tiny import tiny_config

    (tmp_path / "persuasion").write_text((tmp_path / "text.txt").read_text())
    code, err = run(["eval", tiny_dir, "--data", "persuasion", "--quiet"])
    assert code == 2 and "--data: 'persuasion' names both a bundled text and a path here" in err[-1], err
    for spec, said in (("text.txt+text.txt", "names 'text.txt' twice"),
                       ("text.txt+./text.txt", "names 'text.txt' twice (as './text.txt', which holds the same paragraphs)")):
        code, err = run(["eval", tiny_dir, "--data", spec, "--quiet"])
        assert code == 2 and err[-1].endswith(f"--data: {spec!r} {said}"), err
    wide = tmp_path / "wide"
    transformers.BertModel(tiny_config("bert", hidden_size=64, intermediate_size=64)).save_pretrained(wide)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(wide)
    code, err = run(["eval", tiny_dir, "--teacher", wide, "--quiet", "--data", "text.txt"])
    assert code == 2 and err[-1].endswith(f"--teacher: {wide} gives embeddings of 64 values, MODEL of 32, so they "
                                          "do not compare; pass the unpruned model MODEL was pruned from"), err
    other = tmp_path / "distil"  # the same tokenizer and width, another family: its fidelity was printed
    transformers.DistilBertModel(tiny_config("distilbert")).save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    code, err = run(["eval", tiny_dir, "--teacher", other, "--quiet", "--data", "text.txt"])
    assert code == 2 and err[-1].endswith(f"--teacher: {other}: a distilbert model cannot teach a bert student; pass "
                                          "the unpruned model MODEL was pruned from"), err
    code, err = run(["eval", tiny_dir, "--teacher", "typo", "--quiet", "--data", "text.txt"])  # it said MODEL
    assert code == 2 and "eval: error: --teacher: 'typo' is not a bundled name" in err[-1], err


def test_embeddings_do_not_move_with_the_batch_under_a_left_padding_tokenizer(tmp_path):
    """An absolute-position encoder saw a left-padded text at other positions than alone: its
    fidelity depended on the batch size."""
    import torch
    import transformers

    from hf_tiny import save_tiny_bert

    from headprune.app import evaluate as E

    save_tiny_bert(tmp_path / "b")
    model = transformers.AutoModel.from_pretrained(tmp_path / "b").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    texts = ["the cat sat", "the cat sat on the mat and the dog too", "a"]
    tok.padding_side = "left"
    with torch.no_grad():
        alone = torch.cat([E.embed(model, tok, [t], batch_size=1) for t in texts])
        torch.testing.assert_close(E.embed(model, tok, texts, batch_size=3), alone, rtol=0, atol=1e-6)
    assert tok.padding_side == "left"


def test_an_encoder_is_evaluated_with_its_pipelines_pooling(run, tmp_path, tiny_dir):  # noqa: F811
    """A first-token pipeline beside the weights: prune measured, and eval measures, its first
    token's state; a teacher pooled otherwise than the report is said."""
    shutil.copytree(tiny_dir, tmp_path / "cls")
    (tmp_path / "cls" / "1_Pooling").mkdir()
    (tmp_path / "cls" / "1_Pooling" / "config.json").write_text('{"pooling_mode": "cls"}')
    (tmp_path / "cls" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    code, err = run(["prune", tmp_path / "cls", "--ratio", "0.3", *COMMON, "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["before"]["pooling"] == report["after"]["pooling"] == "cls_token"
    assert (tmp_path / "o" / "model" / "1_Pooling" / "config.json").exists()
    code, err, result = _eval(run, [tmp_path / "o"])
    assert code == 0 and not err and result["fidelity"] == pytest.approx(report["after"]["fidelity"], abs=1e-6)
    code, err, result = _eval(run, [tmp_path / "o", "--teacher", tiny_dir])  # pooled by the mean
    said = ["headprune: warning: MODEL's report.json pooled its embeddings by cls_token; the teacher pools them by "
            "mean_tokens (as its sentence-transformers pipeline names, the mean without one), which this evaluation "
            "follows, so its figures can differ from the report's"]
    assert code == 0 and result["pooling"] == "mean_tokens" and err == said
    # a recovery's folder records the pooling of its figures too, and eval says so alike
    code, err = run(["recover", tmp_path / "o", "--steps", "1", "--validation", "0", "--samples", "4", "--quiet",
                     "--data", "text.txt", "--out", tmp_path / "r"])
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["pooling"] == "cls_token"
    code, err, result = _eval(run, [tmp_path / "r", "--teacher", tiny_dir])
    assert code == 0 and result["pooling"] == "mean_tokens" and err == said
    code, err, result = _eval(run, [tmp_path / "r"])  # the teacher its report names: pooled alike
    assert code == 0 and not err and result["pooling"] == "cls_token"
