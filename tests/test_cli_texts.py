"""What the command line reads and says about its text: ``eval`` of a pruned directory reads
the text it was pruned with, ``recover --data`` records its own text, JSON files of records are
read as records, a tokenizer without a padding token borrows one, and ``--quiet`` quiets
transformers' loading bars."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)
from test_cli_eval import SENTENCES, _eval  # noqa: E402

from headprune.app import texts  # noqa: E402

COMMON = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
OTHER = ["He had to be in the house.", "It was her own and he had it."]


def _write(tmp_path, name, sentences, blocks=16):
    paragraphs = [" ".join(sentences[(i + k) % len(sentences)] for k in range(3)) for i in range(blocks)]
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


def test_a_json_array_without_text_fields_is_named(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(ValueError, match=r"a.json record 2 has no string field 'text'"):
        texts.load_paragraphs(str(tmp_path / "a.json"))


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


def test_quiet_quiets_transformers_loading_bars_in_eval(run, tmp_path, tiny_dir):  # noqa: F811
    """Only the commands that calibrate turned transformers' bars off: eval and recover printed
    'Loading weights' under --quiet."""
    from transformers.utils import logging as hf_logging

    _write(tmp_path, "text.txt", SENTENCES)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        code, err, _ = _eval(run, [tiny_dir, "--no-speed"])
        assert code == 0 and not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
