"""What the commands read is never what they write: ``--out`` that is or holds an input, empty
names, and lengths the model cannot take are refused before the slow work, and the default
output folder keeps the model's whole name."""

import argparse
import os
import shutil

import pytest

from headprune.app.cli import main

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from hf_tiny import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny") / "bert"
    save_tiny_bert(path)
    return path


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()[-1:]


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.mark.parametrize("command", ["prune", "scan", "sweep"])
@pytest.mark.parametrize("where", ["model", "parent", "data"])
def test_an_output_folder_that_is_or_holds_an_input_is_refused(tmp_path, tiny_dir, capsys, monkeypatch, command, where):
    """``--out MODEL --force`` replaced the user's model folder with the pruned output."""
    import headprune.app.commands as C

    model = tmp_path / "work" / "bert"
    shutil.copytree(tiny_dir, model)
    (tmp_path / "work" / "text.txt").write_text("the a of and to in\n\nwas her she it he\n")
    before = _tree(tmp_path)
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    out = {"model": model, "parent": tmp_path / "work", "data": tmp_path / "work"}[where]
    extra = {"prune": ["--ratio", "0.3"], "scan": [], "sweep": ["--ratios", "0.3"]}[command]
    code, err = _run([command, model, "--data", tmp_path / "work" / "text.txt", "--out", out, "--force", "--quiet",
                      *extra], capsys)
    assert code == 2 and err[0].startswith(f"headprune {command}: error: --out: {out} is MODEL ({model}) or a folder "
                                           "holding it")
    assert _tree(tmp_path) == before
    if where == "data":  # the text alone
        code, err = _run([command, tiny_dir, "--data", tmp_path / "work" / "text.txt", "--out", out, "--force",
                          "--quiet", *extra], capsys)
        assert code == 2 and f"--out: {out} is --data ({tmp_path / 'work' / 'text.txt'})" in err[0]
        assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["prune", "scan", "sweep", "recover"])
def test_a_prune_folders_model_and_each_text_of_a_list_are_inputs(tmp_path, tiny_dir, capsys, monkeypatch, command):
    """MODEL a folder prune wrote is read from its ``model/``, which ``--out MODEL/model --force``
    replaced; a ``--data a+b`` list was not split, so ``--out`` holding ``a`` replaced it."""
    import headprune.app.commands as C
    import headprune.app.recover_command as R

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "model")
    (run / "report.json").write_text('{"model": "bert", "settings": {"data": "persuasion"}}')
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.txt").write_text("the a of and to in\n\nwas her she it he\n")
    before = _tree(tmp_path)
    for module in (C, R):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    extra = {"prune": ["--ratio", "0.3"], "scan": [], "sweep": ["--ratios", "0.3"], "recover": ["--steps", "1"]}
    code, err = _run([command, run, "--out", run / "model", "--force", "--quiet", *extra[command]], capsys)
    flag = "DIR" if command == "recover" else "MODEL"
    assert code == 2 and f"--out: {run / 'model'} is {flag} ({run / 'model'}) or a folder holding it" in err[0]
    data = f"{tmp_path / 'd1' / 't.txt'}+{tmp_path / 'd2' / 't.txt'}"
    code, err = _run([command, run, "--data", data, "--out", tmp_path / "d2", "--force", "--quiet", *extra[command]],
                     capsys)
    assert code == 2 and f"--out: {tmp_path / 'd2'} is --data ({tmp_path / 'd2' / 't.txt'})" in err[0]
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("flag", ["--out", "--data"])
def test_an_empty_name_is_refused_not_read_as_not_given(tmp_path, tiny_dir, capsys, monkeypatch, flag):
    """``--out ""`` wrote to the default folder and ``--data ""`` calibrated on the bundled text."""
    monkeypatch.chdir(tmp_path)
    argv = ["prune", tiny_dir, "--ratio", "0.3", "--quiet", "--out", "o", "--data", "t.txt"]
    argv[argv.index(flag) + 1] = ""
    code, err = _run(argv, capsys)
    assert code == 2 and f"error: {flag}: expected" in err[0] and "empty name" in err[0]
    assert os.listdir(tmp_path) == []


def test_the_default_output_keeps_the_models_whole_name():
    from headprune.app.commands import _out

    def out(model):
        return str(_out(argparse.Namespace(out=None, model=model), "prune"))

    assert out("models/qwen2.5-1.5b") == out("models/qwen2.5-1.5b/") == "headprune-out/prune-qwen2.5-1.5b"
    assert out("smollm2") == "headprune-out/prune-smollm2" and out("a/b.gguf") == "headprune-out/prune-b"


def test_eval_reads_its_text_before_the_model(tmp_path, capsys, monkeypatch):
    import headprune.app.commands as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("the model loaded before --data was read"))
    code, err = _run(["eval", tmp_path, "--data", tmp_path / "no-such.txt"], capsys)
    assert code == 2 and "error: --data:" in err[0]


def test_a_calibration_longer_than_the_models_positions_is_refused(tmp_path, tiny_dir, capsys):
    """It crashed with an IndexError (GPT-2) or a size mismatch (BERT) inside the collection."""
    code, err = _run(["scan", tiny_dir, "--seq-len", "65", "--samples", "2", "--quiet", "--out", tmp_path / "o"],
                     capsys)
    assert code == 2 and err[0].endswith(f"--seq-len: 65 tokens is more than the 64 positions {tiny_dir} takes")
    assert not (tmp_path / "o").exists()
    code, err = _run(["scan", tiny_dir, "--seq-len", "64", "--samples", "2", "--quiet", "--out", tmp_path / "o"],
                     capsys)
    assert code == 0, err


@pytest.mark.parametrize("flag, value, message", [
    ("--count", "9", "--count: 9 is more than the model's 8 query heads"),
    ("--ratio", "0.1", "--ratio: 0.1 of the model's 8 query heads is less than one; give at least 0.125"),
    ("--min-heads-per-layer", "4", "--min-heads-per-layer: 4 keeps all 4 query heads of every layer, so nothing "
                                   "could be pruned"),
    ("--gqa group --count", "9", "--count: 9 is more than the model's 8 query heads"),  # BERT has no KV groups
    ("--count", "7", "--ratio/--count: 7 units requested but --protect-layers and --min-heads-per-layer 1 allow at "
                "most 6"),  # an encoder's measured allocation: it measured for minutes, then took 6, warned
    ("--speed-decode", "1x64", "is an encoder, which has no decode; drop --speed-decode"),  # it was ignored
])
def test_a_selection_the_model_cannot_give_is_refused_before_the_collection(tmp_path, tiny_dir, capsys, monkeypatch,
                                                                             flag, value, message):
    """They were refused after the collection, in the library's argument names, or (a fraction
    below one head) wrote the unpruned model as the pruned one."""
    import headprune.app.commands as C

    monkeypatch.setattr(C, "_collect", lambda *a, **k: pytest.fail("collected before the options were checked"))
    size = ["--ratio", "0.3"] if flag in ("--min-heads-per-layer", "--speed-decode") else []
    code, err = _run(["prune", tiny_dir, *size, *flag.split(), value, "--quiet", "--out", tmp_path / "o", "--samples", "2",
                      "--seq-len", "8"], capsys)
    assert code == 2 and err[0].endswith(message)
    assert not (tmp_path / "o").exists()


def test_the_saved_tokenizer_is_the_one_read(tmp_path, capsys):
    """A tokenizer without a padding token was saved with the end-of-text token as one (the
    command line pads its own batches with it)."""
    import tokenizers
    import transformers

    from hf_tiny import tiny_config

    words = "the a of and to in was her she it he had not be".split()
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("\n\n".join(" ".join(words[i:] + words[:i]) * 3 for i in range(12)))
    code, err = _run(["prune", tmp_path / "m", "--ratio", "0.3", "--data", tmp_path / "t.txt", "--samples", "4",
                      "--seq-len", "16", "--eval-windows", "2", "--no-speed", "--quiet", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "o" / "model")
    assert saved.pad_token is None and saved.eos_token == "</s>"


def test_export_of_an_encoder_is_refused_in_plain_words(tmp_path, tiny_dir, capsys):
    """It said "is a encoder model" and that the Python API handles encoders, which no GGUF
    export does."""
    (tmp_path / "src.gguf").write_bytes(b"GGUF")  # refused for the model before it is read
    code, err = _run(["export", tiny_dir, "--gguf", tmp_path / "m.gguf", "--source", tmp_path / "src.gguf"], capsys)
    assert code == 2 and err[0] == "headprune export: error: MODEL: GGUF export writes llama models, got bert"


def test_prune_names_its_flags_in_the_selections_messages_and_nothing_else():
    """The selection API's messages name its parameters; prune's errors name the flags. Other
    commands have no such flags (sweep's random baseline reports the API's words), and a path
    that holds a parameter's name is a path."""
    from headprune.app.cli import _message

    api = ("ratio/count: 4 heads requested but protect_layers and min_heads_per_layer=3 allow at most 1; the "
           "default recipe keeps the first layer of each causal stack whole (protect_layers=[] allows it)")
    assert _message(ValueError(api), "prune") == (
        "--ratio/--count: 4 heads requested but --protect-layers and --min-heads-per-layer 3 allow at most 1; the "
        "default recipe keeps the first layer of each causal stack whole (--protect-layers '' allows it)")
    assert _message(ValueError("kv_ratio: 9 KV heads requested; lower kv_ratio"), "prune") == \
        "--kv-ratio: 9 KV heads requested; lower --kv-ratio"
    assert _message(ValueError(api), "sweep") == api
    path = "MODEL: directory /tmp/x/kv_ratio has no tokenizer files (protect_layers)"
    assert _message(ValueError(path), "prune") == path


def test_a_learn_checkpoint_that_is_no_such_checkpoint_is_refused_first(tmp_path, tiny_dir, capsys, monkeypatch):
    """A file that is no learned-gates checkpoint (a copy of the model's weights) was refused after
    the model loaded and the collection ran."""
    import headprune.app.commands as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded before --learn-checkpoint was checked"))
    weights = tmp_path / "w.safetensors"
    shutil.copyfile(next(tiny_dir.glob("*.safetensors")), weights)
    before = weights.read_bytes()
    code, err = _run(["prune", tiny_dir, "--count", "2", "--score", "learned", "--learn-checkpoint", weights,
                      "--quiet", "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"--learn-checkpoint: {weights} exists and is not a learned-gates checkpoint" in err[0], err
    assert weights.read_bytes() == before and not (tmp_path / "o").exists()


def test_bundled_names_are_not_paths_here(tmp_path, monkeypatch):
    """A bundled text is read as the bundled text, a bundled model from its installed package,
    whatever is in the working directory: a folder of that name there is no input, and --out
    naming it was refused as one."""
    from headprune.app import commands as C
    from headprune.app.inputs import inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    args = argparse.Namespace(command="prune", model="minilm", teacher=None, data="persuasion+my.txt")
    got = inputs(args)
    assert ("--data", "my.txt") in got and all(p != "persuasion" and p != "minilm" for _, p in got), got
    from headprune.app.locate import bundled_path

    assert ("MODEL", bundled_path("minilm")[0]) in got  # where it is read from
    C.check_out(tmp_path / "minilm", True, got)  # not refused (the load refuses the ambiguous name)


def test_a_bundled_text_name_that_is_also_a_path_here_is_refused(tmp_path, tiny_dir, capsys, monkeypatch):
    """--data persuasion calibrated on the bundled text while ./persuasion held the user's, and
    --out persuasion --force then replaced that folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "persuasion").mkdir()
    (tmp_path / "persuasion" / "mine.txt").write_text("the a of\n\nand to in\n")
    code, err = _run(["prune", tiny_dir, "--ratio", "0.3", "--data", "persuasion", "--out", "persuasion", "--force",
                      "--quiet"], capsys)
    assert code == 2 and err[0].endswith("--data: 'persuasion' names both a bundled text and a path here; pass "
                                         "./persuasion for the path, or run from another directory for the bundled "
                                         "text"), err
    assert (tmp_path / "persuasion" / "mine.txt").is_file()


@pytest.mark.parametrize("command, picture", [("prune", "heatmap.png"), ("scan", "heatmap.png"), ("sweep", "sweep.png")])
def test_a_missing_plot_extra_is_named_before_the_model_loads(tmp_path, tiny_dir, capsys, monkeypatch, command, picture):
    """Without matplotlib (the optional ``plot`` extra) these commands did all their work, then
    failed drawing their picture with a traceback, and wrote nothing."""
    import headprune.app.commands as C

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    ratio = [] if command == "scan" else ["--ratios" if command == "sweep" else "--ratio", "0.3"]
    code, err = _run([command, tiny_dir, *ratio, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err[0].startswith(f"headprune {command}: error: {command} draws {picture} with matplotlib, "
                                           "which cannot be imported here") and "pip install 'headprune[plot]'" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, flags, said", [
    ("prune", ["--compensate"], "--compensate: applies with --no-reconstruct"),
    ("prune", ["--no-compensate"], "--no-compensate: applies with --no-reconstruct"),
    ("sweep", ["--no-compensate"], "--no-compensate: applies with --no-reconstruct"),
    ("prune", ["--no-speed", "--speed-decode", "1x8"], "--speed-prefill/--speed-decode: shapes --speed times"),
    ("prune", ["--no-speed", "--speed-prefill", "none"], "--speed-prefill/--speed-decode: shapes --speed times"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, tiny_dir, capsys, monkeypatch, command, flags, said):
    """--compensate with the refit, and speed shapes without --speed, were accepted and ignored."""
    import headprune.app.commands as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    ratio = ["--ratios" if command == "sweep" else "--ratio", "0.3"]
    code, err = _run([command, tiny_dir, *ratio, *flags, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err[0].startswith(f"headprune {command}: error: {said}"), err


def test_scan_into_a_long_output_name_checkpoints(tmp_path, tiny_dir, capsys, monkeypatch):
    """A valid --out name of 245 bytes: the scan's checkpoint beside it (``.<name>.checkpoint.json``)
    went past 255 bytes, and its first write failed after batches had run."""
    from headprune.app.commands import _checkpoint

    monkeypatch.chdir(tmp_path)
    name = "s" * 245
    code, err = _run(["scan", tiny_dir, "--samples", "16", "--seq-len", "32", "--batch-size", "4", "--out", name,
                      "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / name / "scores.json").is_file() and len(_checkpoint(tmp_path / name).name) < 40
    assert sorted(os.listdir(tmp_path)) == [name]  # the checkpoint, written and removed


def test_a_mistyped_option_is_named_before_a_missing_one(tmp_path, tiny_dir, capsys):
    """``prune MODEL --ratoi 0.3`` said only that --ratio or --count is required; the typo is named."""
    code, err = _run(["prune", tiny_dir, "--ratoi", "0.3"], capsys)
    assert code == 2 and err == ["headprune prune: error: unrecognized arguments: --ratoi (one of the arguments "
                                 "--ratio --count is required)"]
    code, err = _run(["prune", tiny_dir], capsys)  # nothing mistyped: as before
    assert code == 2 and err == ["headprune prune: error: one of the arguments --ratio --count is required"]
    code, err = _run(["prune", tiny_dir, "--rat", "0.3", "--samples", "0"], capsys)  # an abbreviation is known
    assert code == 2 and err == ["headprune prune: error: argument --samples: expected a positive integer, got 0"]


@pytest.mark.parametrize("command", ["prune", "scan"])
def test_an_image_model_is_refused_as_one(tmp_path, capsys, command):
    """A ViT directory was refused for having no tokenizer files, as if adding some would do."""
    from hf_tiny import tiny_model

    tiny_model("vit").save_pretrained(tmp_path / "vit")
    code, err = _run([command, tmp_path / "vit", *(["--ratio", "0.3"] if command == "prune" else []),
                      "--out", tmp_path / "o"], capsys)
    assert code == 2 and err[0].endswith(f"MODEL: {tmp_path / 'vit'} is an image model (vit); the command line "
                                         "handles text models (the Python API prunes image models, on batches of "
                                         "pixel_values)"), err


def test_speed_decode_none_on_an_encoder_is_what_it_asks_for(tmp_path, tiny_dir, capsys, monkeypatch):
    """--speed-decode none (no decode timing) was refused on an encoder with the shapes that are."""
    import headprune.app.commands as C

    monkeypatch.setattr(C, "_collect", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # checks passed
    code, err = _run(["prune", tiny_dir, "--ratio", "0.3", "--speed-decode", "none", "--quiet", "--out",
                      tmp_path / "o", "--samples", "2", "--seq-len", "8"], capsys)
    assert code == 130, err

