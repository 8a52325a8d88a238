"""``headprune recover`` and ``headprune prune --recover-steps`` end to end on a tiny random BERT
(the fixtures of test_cli.py: an in-process ``main`` and a model directory with a tokenizer)."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)
from test_recover_validation import _fewer_steps_than_held  # noqa: E402


def test_recover_reads_a_pruned_directory_and_writes_a_recovered_one(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    import torch

    from headprune.hf import kept_heads, load_pruned

    calib = ["--samples", "4", "--seq-len", "16", "--quiet"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--out", tmp_path / "p"])
    assert code == 0, err
    code, err = run(["recover", tmp_path / "p", "--steps", "2", "--lr", "1e-3", "--validation", "0", "--samples", "4",
                     "--quiet", "--out", tmp_path / "r"])
    assert code == 0, err
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"model", "report.json", "report.md"}
    # what each step took (it read as if every step had seen the whole calibration set)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    real = report["settings"]["calibration_tokens"]  # an encoder's paragraphs, cut at 16 tokens: not 4 x 16
    assert real < 4 * 16 and (f"on batches of 2 sequences drawn from 4 sequences of up to 16 tokens ({real} tokens) "
                              "of") in (tmp_path / "r" / "report.md").read_text()
    assert report["model"] == str(tiny_dir) and report["recover"]["steps"] == 2
    assert report["settings"]["samples"] == 4 and report["settings"]["recover_lr"] == 1e-3
    for text in ("held_out", "calibration"):
        row = report["quality"][text]
        assert row["unpruned"] == 1.0 and row["pruned"] < 1.0 and row["recovered"] != row["pruned"]
    pruned, recovered = load_pruned(tmp_path / "p" / "model"), load_pruned(tmp_path / "r" / "model")
    assert kept_heads(recovered) == kept_heads(pruned)
    changed = [n for n, p in recovered.state_dict().items() if not torch.equal(p, pruned.state_dict()[n])]
    assert changed and all(".attention." in n for n in changed)
    assert report["recover"]["validation_batches"] == 0 and report["recover"]["best_step"] is None


def test_recover_keeps_the_best_step_on_batches_kept_out_of_training(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    import torch

    from headprune.hf import load_pruned

    calib = ["--samples", "8", "--seq-len", "16", "--quiet"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--out", tmp_path / "p"])
    assert code == 0, err
    code, err = run(["recover", tmp_path / "p", "--steps", "6", "--samples", "8", "--quiet", "--out", tmp_path / "r"])
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    r = report["recover"]
    assert r["validation_batches"] == 1 and r["steps"] == 6 and 0 <= r["best_step"] <= 6  # 4 batches of 2
    assert r["validation_loss_best"] <= r["validation_loss_first"]
    assert report["settings"]["recover_validation"] == 0.1 and report["settings"]["recover_lr"] == 3e-5
    assert "kept out of training" in (tmp_path / "r" / "report.md").read_text()
    pruned, recovered = load_pruned(tmp_path / "p" / "model"), load_pruned(tmp_path / "r" / "model")
    same = all(torch.equal(p, pruned.state_dict()[n]) for n, p in recovered.state_dict().items())
    assert same == (r["best_step"] == 0)
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--validation", "0.9", "--samples", "8", "--quiet",
                     "--out", tmp_path / "r2"])
    assert code == 2 and "--validation: 0.9 of 4 calibration batches leaves none to train on" in err[-1]
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--validation", "1"])
    assert code == 2 and err[-1].endswith("argument --validation: expected a fraction in [0, 1), got '1'")
    assert not (tmp_path / "r2").exists()
    # without --samples an encoder trains on every calibration paragraph, not the 8 it was pruned with
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--quiet", "--out", tmp_path / "r3"])
    assert code == 0, err
    settings = json.loads((tmp_path / "r3" / "report.json").read_text())["settings"]
    assert settings["samples"] == settings["calibration_paragraphs"] > 8


def test_prune_recover_steps_and_recover_errors(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--recover-steps", "2", "--out", tmp_path / "p"])
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["recover"]["steps"] == 2 and report["settings"]["recover_steps"] == 2
    assert report["settings"]["recover_lr"] == 3e-5 and report["settings"]["recover_validation"] == 0.1
    r = report["recover"]
    assert r["samples"] == report["settings"]["calibration_paragraphs"] > 4  # every paragraph, in steps of 2
    assert r["validation_batches"] == round(0.1 * r["samples"] / 2) and r["best_step"] in (0, 1, 2)
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--mask", "--recover-steps", "2",
                     "--out", tmp_path / "m"])
    assert code == 2 and err == ["headprune prune: error: --recover-steps: needs --physical (training would revive "
                                 "the masked heads)"]
    for option, value in (("--recover-lr", "1e-4"), ("--recover-validation", "0.2")):  # not used without recovery
        code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, option, value, "--out", tmp_path / "m"])
        assert code == 2 and err == ["headprune prune: error: --recover-lr/--recover-validation: only --recover-steps "
                                     "or --recover-seconds recovers"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib[:-2], "--recover-steps", "1", "--recover-validation",
                     "0.9999", "--out", tmp_path / "m"])  # refused by its own name, before the collection
    assert code == 2 and err[-1].startswith("headprune prune: error: --recover-validation: 0.9999 of ") and err[-1].endswith(
        " calibration batches leaves none to train on; pass 0 or a longer --data text") and not any(
        "collecting" in line for line in err), err
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--validation", "0.9999", "--out", tmp_path / "r"])
    assert code == 2 and "--validation: 0.9999 of " in err[-1] and not any("evaluating" in line for line in err), err
    code, err = run(["recover", tiny_dir, "--steps", "1", "--quiet", "--out", tmp_path / "r"])
    assert code == 2 and len(err) == 1 and "is not a directory written by headprune prune" in err[0]
    code, err = run(["recover", tmp_path / "p", "--steps", "0"])
    assert code == 2 and err[-1].endswith("argument --steps: expected a positive integer, got 0")
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--lr", "0"])
    assert code == 2 and err[-1].endswith("argument --lr: expected a positive finite number, got 0")
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", "--recover-steps", "1", "--recover-lr", "1e300"])  # after the work
    assert code == 2 and err[-1].endswith("argument --recover-lr: expected at most float32's largest number, 3.4e+38, "
                                          "got 1e300") and len(err) == 1, err
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", "--device", "meta"])  # a load for nothing, then a traceback
    assert code == 2 and err[-1].endswith("argument --device: expected a torch device that holds weights, such as cpu "
                                          "or cuda:0, got 'meta'"), err
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


def test_the_command_line_default_learning_rate_is_the_library_s():
    from headprune.app.arguments import RECOVER_LR
    from headprune.hf.recover import DEFAULT_LR

    assert RECOVER_LR == DEFAULT_LR


def test_recover_finds_the_model_and_text_from_another_directory(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    """report.json keeps the unpruned model and a calibration file as absolute paths beside the
    names as given, so recover runs from elsewhere without --teacher or --data."""
    import json
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "work" / "tiny")
    text = "\n\n".join(f"Paragraph {i} says something about the weather and the sea, twice over." for i in range(40))
    (tmp_path / "work" / "notes.txt").write_text(text)
    monkeypatch.chdir(tmp_path / "work")
    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", "tiny", "--ratio", "0.3", "--data", "notes.txt", *calib, "--out", "p"])
    assert code == 0, err
    report = json.loads((tmp_path / "work" / "p" / "report.json").read_text())
    assert report["model"] == "tiny" and report["model_path"] == str(tmp_path / "work" / "tiny")
    assert report["settings"]["data"] == "notes.txt"
    assert report["settings"]["data_path"] == str(tmp_path / "work" / "notes.txt")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (tmp_path / "work").rglob("*"))
    code, err = run(["recover", "work/p", "--steps", "1", "--quiet", "--out", "work/tiny", "--force"])
    assert code == 2 and f"--out: work/tiny is the teacher ({tmp_path / 'work' / 'tiny'}) or a folder" in err[-1]
    code, err = run(["recover", "work/p", "--steps", "1", "--quiet", "--out", "work/notes.txt", "--force"])
    assert code == 2 and "is the calibration text" in err[-1]
    assert sorted(p.name for p in (tmp_path / "work").rglob("*")) == before
    code, err = run(["recover", "work/p", "--steps", "1", "--quiet", "--out", "r"])
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "work")  # a recover folder, its teacher given relative, recovered again from elsewhere
    code, err = run(["recover", "p", "--steps", "1", "--teacher", "tiny", "--quiet", "--out", "r2"])
    assert code == 0, err
    assert json.loads((tmp_path / "work" / "r2" / "report.json").read_text())["model_path"] == str(tmp_path / "work" / "tiny")
    monkeypatch.chdir(tmp_path)
    code, err = run(["recover", "work/r2", "--steps", "1", "--quiet", "--out", "r3"])
    assert code == 0, err


def test_a_missing_unpruned_model_points_to_teacher(run, tmp_path, tiny_dir):  # noqa: F811
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "tiny")
    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", tmp_path / "tiny", "--ratio", "0.3", *calib, "--out", tmp_path / "p"])
    assert code == 0, err
    shutil.move(tmp_path / "tiny", tmp_path / "moved")
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--quiet", "--out", tmp_path / "r"])
    assert code != 0 and any("DIR/report.json names it as the unpruned model; pass --teacher" in e for e in err), err
    assert not (tmp_path / "r").exists()
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--quiet", "--teacher", tmp_path / "moved",
                     "--out", tmp_path / "r"])
    assert code == 0, err


def test_recover_takes_one_sequence_per_step_for_causal_lms(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    from test_cli_gqa import _tiny_llama
    from transformers import AutoTokenizer

    from headprune.app import texts

    path = _tiny_llama(tmp_path, tiny_dir)
    calib = ["--samples", "4", "--seq-len", "16", "--quiet"]
    code, err = run(["prune", path, "--count", "2", *calib, "--no-speed", "--out", tmp_path / "p"])
    assert code == 0, err
    # without --samples: every window of --seq-len tokens of the text's calibration part, not the 4
    tok = AutoTokenizer.from_pretrained(path)
    windows = sum(len(texts.token_windows(tok, part, 16)) for part in texts.load_split(None)[0])
    for extra, size in (([], 1), (["--batch-size", "2"], 2)):
        out = tmp_path / f"r{size}"
        code, err = run(["recover", tmp_path / "p", "--steps", "2", "--quiet", "--out", out, *extra])
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["batch_size"] == size and report["recover"]["steps"] == 2
        assert report["settings"]["samples"] == windows > 4


def test_recovery_batches_interleave_the_texts_so_an_early_stop_trains_on_each(tiny_dir):  # noqa: F811
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from headprune.app import texts
    from headprune.app.recover_command import recovery_batches

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    parts = [["the a of and to in the a"] * 6, ["she had not be he it was her"] * 2]  # the tokenizer's words
    for kind, seq_len in (("encoder", 32), ("causal", 4)):
        loaded = SimpleNamespace(kind=kind, tokenizer=tok)
        batches = recovery_batches(loaded, parts, None, seq_len, 1, "cpu")
        alone = [{tuple(b["input_ids"][0].tolist()) for b in texts.calibration_batches(
            tok, part, causal=kind == "causal", samples=10**6, seq_len=seq_len, batch_size=1)} for part in parts]
        source = [0 if tuple(b["input_ids"][0].tolist()) in alone[0] else 1 for b in batches]
        n1 = len(parts[1]) if kind == "encoder" else len(texts.token_windows(tok, parts[1], seq_len))
        assert n1 >= 2 and source[: 2 * n1] == [0, 1] * n1, (kind, source)  # alternating while both last
        assert len(batches) == sum(len(texts.calibration_batches(  # every sequence of both texts
            tok, part, causal=kind == "causal", samples=10**6, seq_len=seq_len, batch_size=1)) for part in parts)


def test_recover_for_seconds_and_from_a_checkpoint(run, tmp_path, tiny_dir):  # noqa: F811
    """``--seconds`` alone ends the run by its budget; ``--checkpoint`` resumes where a run
    stopped, to the same weights as a run that never stopped; other settings are refused."""
    import json
    import torch
    from headprune.hf import load_pruned

    calib = ["--samples", "4", "--seq-len", "16", "--quiet"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--out", tmp_path / "p"])
    assert code == 0, err
    rec = ["recover", tmp_path / "p", "--validation", "0", "--samples", "4", "--lr", "1e-3", "--quiet"]
    code, err = run([*rec, "--seconds", "0.001", "--out", tmp_path / "s"])
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["recover"]["steps"] == 1 and report["recover"]["stopped"] == "time_budget"
    assert report["settings"]["recover_seconds"] == 0.001 and report["settings"]["recover_steps"] is None
    assert "stopped by the budget of 0.001 s" in (tmp_path / "s" / "report.md").read_text()
    ckpt = tmp_path / "state.pt"
    code, err = run([*rec, "--steps", "2", "--checkpoint", ckpt, "--out", tmp_path / "a"])
    assert code == 0 and ckpt.is_file(), err
    code, err = run([*rec, "--steps", "4", "--checkpoint", ckpt, "--out", tmp_path / "b"])
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["recover"]["resumed_from"] == 2 and report["recover"]["steps"] == 4
    assert "Distillation loss " in (tmp_path / "b" / "report.md").read_text()
    code, err = run([*rec, "--steps", "4", "--checkpoint", ckpt, "--out", tmp_path / "b2"])  # nothing left to do
    assert code == 0, err
    assert json.loads((tmp_path / "b2" / "report.json").read_text())["recover"]["loss_first"] is None
    meta = json.loads((tmp_path / "b2" / "model" / "headprune.json").read_text())
    assert meta["settings"]["recover"]["loss_first"] is None  # was NaN, which is not JSON
    assert ("No distillation step ran in this call: the checkpoint held every step asked for."
            in (tmp_path / "b2" / "report.md").read_text())
    assert "resumed from step 2 of a checkpoint" in (tmp_path / "b" / "report.md").read_text()
    _fewer_steps_than_held(run, rec, ckpt, tmp_path / "b3")
    code, err = run([*rec, "--steps", "4", "--out", tmp_path / "c"])
    assert code == 0, err
    resumed, straight = load_pruned(tmp_path / "b" / "model"), load_pruned(tmp_path / "c" / "model")
    assert all(torch.equal(p, straight.state_dict()[n]) for n, p in resumed.state_dict().items())
    with pytest.MonkeyPatch.context() as mp:  # refused before both models are evaluated (it was after), by its flag
        mp.setattr("headprune.app.recover_command._quality", lambda *a, **k: pytest.fail("evaluated first"))
        code, err = run([*rec[:-3], "--lr", "1e-4", "--quiet", "--steps", "4", "--checkpoint", ckpt, "--out", tmp_path / "d"])
    assert code == 2 and "error: --checkpoint: " in err[-1] and "other lr" in err[-1] and not (tmp_path / "d").exists()
    code, err = run(["recover", tmp_path / "p", "--quiet", "--out", tmp_path / "e"])
    assert code == 2 and err[-1].endswith("--steps/--seconds: say how long to recover (either or both)")
    code, err = run(["recover", tmp_path / "nope", "--quiet", "--out", tmp_path / "e"])  # DIR named first
    assert code == 2 and "DIR: " in err[-1] and "is not a directory written by headprune prune" in err[-1]
    code, err = run([*rec, "--steps", "1", "--checkpoint", tmp_path / "f" / "state.pt", "--out", tmp_path / "f"])
    assert code == 2 and "--checkpoint: at or inside the output directory" in err[-1] and not (tmp_path / "f").exists()
    code, err = run([*rec, "--steps", "1", "--checkpoint", tmp_path / "f", "--out", tmp_path / "f"])  # the same path
    assert code == 2 and "--checkpoint: at or inside the output directory" in err[-1] and not (tmp_path / "f").exists()
    # no file path: refused before the models load (it was refused after their evaluation, with advice
    # to delete the directory it named)
    (tmp_path / "dir").mkdir()
    (tmp_path / "notes.txt").write_text("")
    for path, said in [("", "--checkpoint: expected the path of a file, got ''"),
                       (tmp_path / "notes.txt" / "r.pt", f"--checkpoint: {tmp_path / 'notes.txt'} is not a directory, "
                                                         f"so {tmp_path / 'notes.txt' / 'r.pt'} cannot be made"),
                       (tmp_path / "dir", f"--checkpoint: expected the path of a file, got a directory, '{tmp_path / 'dir'}'")]:
        code, err = run([*rec, "--steps", "1", "--checkpoint", path, "--out", tmp_path / "g"])
        assert code == 2 and err[-1].endswith(said) and not (tmp_path / "g").exists(), err
        assert not any("loading" in line for line in err), err


def test_recover_refuses_another_tokenizer_and_guards_a_named_teachers_model(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811,E501
    """recover distilled toward a --teacher of another tokenizer (eval refused it); and a teacher
    that DIR's report names as a prune folder (iterative pruning) had its model/ replaceable by --out."""
    import json

    import transformers

    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    assert run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--out", tmp_path / "p1"])[0] == 0
    assert run(["prune", tmp_path / "p1", "--ratio", "0.3", *calib, "--out", tmp_path / "p2"])[0] == 0
    other = tmp_path / "other"
    transformers.AutoModel.from_pretrained(tiny_dir).save_pretrained(other)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_tokens(["zzqx"])
    tok.save_pretrained(other)
    code, err = run(["recover", tmp_path / "p2", "--steps", "1", "--teacher", other, "--out", tmp_path / "r"])
    assert code == 2 and f"--teacher: {other} has another tokenizer than DIR" in err[-1] and not (tmp_path / "r").exists()
    assert json.loads((tmp_path / "p2" / "report.json").read_text())["model_path"] == str(tmp_path / "p1")
    import headprune.app.recover_command as R

    monkeypatch.setattr(R, "load_model", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    code, err = run(["recover", tmp_path / "p2", "--steps", "1", "--out", tmp_path / "p1" / "model", "--force"])
    assert code == 2 and f"--out: {tmp_path / 'p1' / 'model'} is the teacher" in err[-1], err
    monkeypatch.undo()
    # the teacher DIR's report names: the message says so, and that --teacher chooses another
    report = json.loads((tmp_path / "p2" / "report.json").read_text())
    (tmp_path / "p2" / "report.json").write_text(json.dumps({**report, "model_path": str(other)}))
    code, err = run(["recover", tmp_path / "p2", "--steps", "1", "--out", tmp_path / "r"])
    assert code == 2 and err[-1].endswith(f"DIR/report.json names {other} as the unpruned model, which has another "
                                          "tokenizer than DIR (17 tokens against 16), so it does not compare; pass "
                                          "--teacher, the unpruned model DIR was pruned from"), err


def test_prune_recover_seconds(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--recover-seconds", "0.001", "--out", tmp_path / "p"])
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["recover"]["steps"] == 1 and report["recover"]["stopped"] == "time_budget"
    assert report["settings"]["recover_seconds"] == 0.001 and report["settings"]["recover_steps"] == 0
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--mask", "--recover-seconds", "1",
                     "--out", tmp_path / "m"])
    assert code == 2 and err == ["headprune prune: error: --recover-seconds: needs --physical (training would revive "
                                 "the masked heads)"]
    assert not (tmp_path / "m").exists()


def test_recover_saves_in_the_type_the_directory_was_saved_in(run, tmp_path, tiny_dir):  # noqa: F811
    import json

    from safetensors import safe_open

    calib = ["--samples", "4", "--seq-len", "16", "--quiet"]
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--save-dtype", "bfloat16",
                     "--out", tmp_path / "p"])
    assert code == 0, err
    code, err = run(["recover", tmp_path / "p", "--steps", "2", "--lr", "1e-3", "--validation", "0", "--samples", "4",
                     "--quiet", "--out", tmp_path / "r"])
    assert code == 0, err
    types = set()
    for f in (tmp_path / "r" / "model").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            types |= {st.get_slice(k).get_dtype() for k in st.keys()}
    assert types == {"BF16"}
    assert json.loads((tmp_path / "r" / "report.json").read_text())["settings"]["saved_dtype"] == "bfloat16"
    # computed in float16, it would evaluate other weights than it saves: refused before training
    code, err = run(["recover", tmp_path / "p", "--steps", "2", "--dtype", "float16", "--validation", "0",
                     "--samples", "4", "--quiet", "--out", tmp_path / "r16"])
    assert code != 0 and not (tmp_path / "r16").exists()
    assert any("--dtype: DIR's model is saved in bfloat16, and a model computed in float16" in line for line in err), err
    # a float32 directory loaded in bfloat16 had the weights recovery never trains rounded, saved as float32
    assert run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--out", tmp_path / "p32"])[0] == 0
    code, err = run(["recover", tmp_path / "p32", "--steps", "2", "--dtype", "bfloat16", "--validation", "0",
                     "--samples", "4", "--quiet", "--out", tmp_path / "rb"])
    assert code == 2 and not (tmp_path / "rb").exists() and err == [
        "headprune recover: error: --dtype: DIR's model is saved in float32; loaded in bfloat16, every weight recovery "
        "leaves alone (embeddings, feed-forward layers) would be rounded to bfloat16 and saved so; leave --dtype out or "
        "pass --dtype float32"], err


def test_recover_stage_gives_back_each_tensor_its_own_type():
    """A half-precision student trains in float32 and comes back as it was, float32 buffers
    (rotary frequencies, as ``from_pretrained(torch_dtype=float16)`` leaves them) included."""
    import argparse
    import copy

    import torch
    import transformers
    from hf_tiny import tiny_batch, tiny_config

    import headprune
    from headprune.app.recover_command import recover_stage

    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval().half()
    teacher.model.rotary_emb.inv_freq = teacher.model.rotary_emb.inv_freq.float()
    student = copy.deepcopy(teacher)
    headprune.prune_heads(student, {0: [0]})
    types = {n: t.dtype for n, t in [*student.named_parameters(), *student.named_buffers()]}
    batches = [tiny_batch("llama", seed=i) for i in range(2)]
    report = recover_stage(argparse.Namespace(quiet=True), student, teacher, (batches, None), steps=1, lr=1e-3)
    assert report["steps"] == 1
    assert {n: t.dtype for n, t in [*student.named_parameters(), *student.named_buffers()]} == types
    assert student.model.rotary_emb.inv_freq.dtype == torch.float32 and student.lm_head.weight.dtype == torch.float16
