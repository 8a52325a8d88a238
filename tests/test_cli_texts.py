"""What the command line reads and says about its text: ``eval`` of a pruned directory reads
the text it was pruned with, ``recover --data`` records its own text, JSON files of records are
read as records, a tokenizer without a padding token borrows one, and ``--quiet`` quiets
transformers' loading bars."""

import json
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)
from test_cli_eval import SENTENCES, _eval  # noqa: E402
from test_reliability_outputs import SMALL, _scan_interrupted  # noqa: E402

from headprune.app import texts  # noqa: E402

COMMON = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
OTHER = ["He had to be in the house.", "It was her own and he had it."]


def _write(tmp_path, name, sentences, blocks=16):
    paragraphs = [" ".join(sentences[(i + k) % len(sentences)] for k in range(3)) + f" {i}" for i in range(blocks)]
    (tmp_path / name).write_text("\n\n".join(paragraphs))


def test_eval_of_a_pruned_directory_reads_the_text_it_was_pruned_with(run, tmp_path, tiny_dir):  # noqa: F811
    """eval read the default text, so it printed other figures than the report without a word."""
    import io
    from contextlib import redirect_stdout

    _write(tmp_path, "mine.txt", SENTENCES)
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *COMMON, "--data", "mine.txt", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    out = io.StringIO()
    with redirect_stdout(out):
        code, err = run(["eval", tmp_path / "o", "--json", "--no-speed"])  # no --quiet: the note says which text
    assert code == 0 and any("evaluating on the held-out part of `" in line and "mine.txt" in line for line in err)
    assert json.loads(out.getvalue())["fidelity"] == report["after"]["fidelity"]


def test_recover_with_other_text_records_that_text_alone(run, tmp_path, tiny_dir):  # noqa: F811
    """The recovered report kept the pruning's file path and paragraph counts beside the new
    --data, and a second recover trained on the pruning's text."""
    _write(tmp_path, "mine.txt", SENTENCES)
    _write(tmp_path, "other.txt", OTHER, blocks=10)
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *COMMON, "--data", "mine.txt", "--out", tmp_path / "p"])
    assert code == 0, err
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--data", "other.txt", "--quiet", "--out", tmp_path / "r"])
    assert code == 0, err
    s = json.loads((tmp_path / "r" / "report.json").read_text())["settings"]
    assert s["data"] == "other.txt" and s["data_path"] == str(tmp_path / "other.txt") and "reference" not in s
    assert (s["calibration_paragraphs"], s["held_out_paragraphs"]) == (7, 3)  # other.txt's 70% / 30%
    code, err = run(["recover", tmp_path / "r", "--steps", "1", "--quiet", "--out", tmp_path / "r2"])
    assert code == 0, err
    again = json.loads((tmp_path / "r2" / "report.json").read_text())["settings"]
    assert again.get("data_path", again["data"]) == s["data_path"]  # other.txt, not the pruning's mine.txt


@pytest.mark.parametrize("name, body", [
    ("train.json", "".join(json.dumps({"text": f"paragraph {i}"}) + "\n" for i in range(6))),  # datasets' to_json
    ("upper.JSONL", "".join(json.dumps({"text": f"paragraph {i}"}) + "\n" for i in range(6))),
    ("array.json", json.dumps([{"text": f"paragraph {i}"} for i in range(6)], indent=1)),
])
def test_json_records_are_read_as_records(tmp_path, name, body):
    """A JSON Lines file named .json or .JSONL was read as plain text: one paragraph of raw JSON."""
    (tmp_path / name).write_text(body)
    assert texts.load_paragraphs(str(tmp_path / name)) == [f"paragraph {i}" for i in range(6)]


def test_a_json_array_without_text_fields_or_one_object_is_named(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(ValueError, match=r"a.json record 2 has no string field 'text'"):
        texts.load_paragraphs(str(tmp_path / "a.json"))
    (tmp_path / "o.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}, indent=2))
    with pytest.raises(ValueError, match=r"o.json holds one JSON object; expected an array of records"):
        texts.load_paragraphs(str(tmp_path / "o.json"))


def test_an_encoder_tokenizer_without_a_padding_token_borrows_one(run, tmp_path, tiny_dir):  # noqa: F811
    """It failed with transformers' advice to set tokenizer.pad_token, which a command-line user
    cannot act on; the saved tokenizer stays without one."""
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "nopad")
    config = json.loads((tmp_path / "nopad" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "nopad" / "tokenizer_config.json").write_text(json.dumps(config))
    _write(tmp_path, "mine.txt", SENTENCES)
    code, err = run(["prune", tmp_path / "nopad", "--ratio", "0.3", *COMMON, "--data", "mine.txt", "--out",
                     tmp_path / "o"])
    assert code == 0, err
    assert "pad_token" not in json.loads((tmp_path / "o" / "model" / "tokenizer_config.json").read_text())
    # the fast tokenizer's file as read too: the batches' calls had set its padding (to the stand-in) and truncation
    read, saved = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path / "nopad", tmp_path / "o" / "model"))
    assert (saved["padding"], saved["truncation"]) == (read["padding"], read["truncation"])


def test_the_stand_in_padding_token_comes_back_after_saving():
    """It was set back to the end-of-text token, which a BERT tokenizer has not: no padding after."""
    import tokenizers
    import transformers

    from headprune.app.load import _pad, tokenizer_as_loaded

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = _pad(transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]"))
    assert tok.pad_token == "[UNK]"
    with tokenizer_as_loaded(tok) as plain:
        assert plain.pad_token is None
    assert tok.pad_token == "[UNK]" and tok(["a", "a a"], padding=True)["input_ids"][0] == [1, 0]


def test_eval_of_a_pruned_directory_whose_text_is_gone_reads_the_default(run, tmp_path, tiny_dir):  # noqa: F811
    """Moved to another machine, the folder's text path does not exist: eval stopped naming a
    --data it was never given."""
    _write(tmp_path, "mine.txt", SENTENCES)
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", *COMMON, "--data", "mine.txt", "--out", tmp_path / "o"])
    assert code == 0, err
    (tmp_path / "mine.txt").unlink()
    code, err = run(["eval", tmp_path / "o", "--no-speed", "--quiet", "--eval-windows", "2"])
    assert code == 0 and any("mine.txt, which is not found here: evaluating on the default text" in e for e in err)


def test_quiet_quiets_transformers_loading_bars_in_eval(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    """Only the commands that calibrate turned transformers' bars off: eval and recover printed
    'Loading weights' under --quiet. Off while the command runs, as they were after it."""
    from transformers.utils import logging as hf_logging

    from headprune.app import eval_command

    seen, load = [], eval_command.load_model
    monkeypatch.setattr(eval_command, "load_model", lambda *a, **kw: seen.append(
        (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())) or load(*a, **kw))
    _write(tmp_path, "text.txt", SENTENCES)
    was, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    try:
        code, err, _ = _eval(run, [tiny_dir, "--no-speed"])
        assert code == 0 and seen == [(False, hf_logging.ERROR)]
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(level)


def test_resume_accepts_a_checkpoint_written_before_the_token_count_was_recorded(run, tmp_path, tiny_dir,
                                                                                   monkeypatch):
    """The settings gained calibration_tokens, a count of the tokens the fingerprint's digest
    already holds; a checkpoint written without it was refused as other settings."""
    out = tmp_path / "o"
    _scan_interrupted(run, monkeypatch, tiny_dir, out, [])
    fingerprint = json.loads((tmp_path / ".o.checkpoint.json").read_text())["fingerprint"]
    assert "calibration_tokens" not in fingerprint  # so a checkpoint of an older headprune matches
    code, err = run(["scan", tiny_dir, *SMALL, "--out", out, "--resume"])
    assert code == 0, err


def test_paragraphs_repeated_on_both_sides_of_the_split_are_named(run, tmp_path, tiny_dir):  # noqa: F811
    """A header repeated before every body (licence headers, boilerplate) is calibrated on and
    evaluated on again without a word; where such paragraphs make 5% of the held-out text or
    more, a warning gives their count and share."""
    header = "The licence below applies to every part of this work."
    bodies = [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3)) + f" Part {i}." for i in range(10)]
    (tmp_path / "text.txt").write_text("\n\n".join(p for b in bodies for p in (header, b)))
    with pytest.warns(texts.TextWarning, match=r"3 held-out paragraph\(s\), 36% of the held-out text, are also"):
        parts, held = texts.load_split(str(tmp_path / "text.txt"))
    assert held.count(header) == 3 and len(held) == 6  # kept: what the text is
    code, err, _ = _eval(run, [tiny_dir])
    assert code == 0 and err[0].startswith("headprune: warning: --data: text.txt: 3 held-out paragraph(s), 36%"), err
    assert err[0].endswith("of the held-out text, are also calibration paragraphs: quality on the held-out part is "
                           "partly measured on calibration text"), err
    (tmp_path / "once.txt").write_text("\n\n".join([header] + bodies))  # once, in the calibration part
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        texts.load_split(str(tmp_path / "once.txt"))


def test_a_checkpoint_resumes_with_the_model_text_and_device_spelled_otherwise(run, tmp_path, tiny_dir,  # noqa: F811
                                                                                   monkeypatch):
    """The fingerprint held the model, --data and --device as spelled: a scan interrupted with "m"
    and "text.txt" was refused when resumed from a subdirectory as "../m" and "../text.txt", the
    same files, and on "cpu:0", the same device."""
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    _write(tmp_path, "text.txt", SENTENCES)
    out = tmp_path / "o"
    _scan_interrupted(run, monkeypatch, "m", out, ["--data", "text.txt"])
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    code, err = run(["scan", "../m", *SMALL, "--data", "../text.txt", "--out", out, "--resume", "--device", "cpu:0"])
    assert code == 0, err
    assert not (tmp_path / ".o.checkpoint.json").exists()  # resumed and finished: removed


def test_a_checkpoint_written_with_the_names_as_given_still_resumes(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    """Earlier releases wrote the model, --data and --device into the fingerprint as given; such a
    checkpoint resumes where the same names are given again."""
    import shutil

    from headprune.app import fingerprints

    shutil.copytree(tiny_dir, tmp_path / "m")
    _write(tmp_path, "text.txt", SENTENCES)
    out, now = tmp_path / "o", fingerprints.collection_fingerprint
    with monkeypatch.context() as m:  # written as an earlier release wrote it
        m.setattr(fingerprints, "collection_fingerprint", lambda *a, legacy=None: now(*a, legacy="as given"))
        _scan_interrupted(run, monkeypatch, "m", out, ["--data", "text.txt", "--device", "cpu:0"])
    saved = json.loads((tmp_path / ".o.checkpoint.json").read_text())["fingerprint"]
    assert '"model": "m"' in saved and '"device": "cpu:0"' in saved
    code, err = run(["scan", "m", *SMALL, "--data", "text.txt", "--device", "cpu:0", "--out", out, "--resume"])
    assert code == 0, err


def test_paths_through_links_name_the_file_read(tmp_path, monkeypatch):
    """``lnk/../text.txt`` with ``lnk`` a link to a folder elsewhere reads the text beside that
    folder; made absolute by text (abspath) it named another file, which recover then read. The
    fingerprint takes the file itself, so a link to it resumes alike."""
    from types import SimpleNamespace

    from headprune.app.fingerprints import collection_fingerprint

    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "text.txt").write_text("one\n\ntwo\n")
    (tmp_path / "text.txt").write_text("other\n\nfile\n")
    (tmp_path / "lnk").symlink_to(tmp_path / "a" / "deep")
    (tmp_path / "same.txt").symlink_to(tmp_path / "a" / "text.txt")
    monkeypatch.chdir(tmp_path)
    recorded = texts.data_paths("lnk/../text.txt")
    assert texts.load_paragraphs(recorded) == texts.load_paragraphs("lnk/../text.txt") == ["one", "two"]
    args = SimpleNamespace(model="lnk", batch_size=1)

    def fingerprint(data):
        return collection_fingerprint(args, [], {"data": data, "device": "cpu"})

    assert fingerprint("same.txt") == fingerprint("lnk/../text.txt") == fingerprint(str(tmp_path / "a" / "text.txt"))
    assert fingerprint("text.txt") != fingerprint("same.txt")
