"""Calibration and held-out text as the command line reads it: paragraph and JSONL parsing,
names joined by ``+``, a text shorter than the calibration asked for, the reference share's
bounds, and perplexity over the whole held-out stream."""

import json
import math
import re
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)

from headprune.app import texts  # noqa: E402


def _tokenizer(tiny_dir):  # noqa: F811
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def test_blank_lines_of_spaces_separate_paragraphs(tmp_path):
    """The help promises paragraphs separated by blank lines; a line of spaces or tabs did not
    separate them (10 paragraphs read as 5, a two-paragraph file refused)."""
    path = tmp_path / "d.txt"
    path.write_text("one a\nb\n  \t\ntwo c\r\n \r\nthree d\n\n\n\nfour\n")
    assert texts.load_paragraphs(str(path)) == ["one a\nb", "two c", "three d", "four"]


def test_a_text_file_keeps_its_lines_as_a_jsonl_record_does(tmp_path):
    """A text file's paragraphs had their lines joined and their whitespace collapsed, while a
    JSON Lines record kept them: code given as a text file lost its lines and its indentation
    (a comment then swallowed the code after it), and calibrated and evaluated on that. Lines
    end without their trailing whitespace; the bundled texts are stored one paragraph per line,
    so they read as they were measured."""
    code = "def f(x):\n    # add one\n    return x + 1"
    path = tmp_path / "code.txt"
    path.write_text("\n\n" + code.replace("\n", "  \r\n") + "\r\n\r\n\n  class A:\n      pass\t\n\n")
    jsonl = tmp_path / "code.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in (code, "class A:\n      pass")) + "\n")
    assert texts.load_paragraphs(str(path)) == [code, "  class A:\n      pass"]  # indented as written
    assert texts.load_paragraphs(str(jsonl))[0] == code
    for name in texts.BUNDLED_TEXTS:
        stored = (texts.DATA / f"{name}.txt").read_text(encoding="utf-8")
        assert texts.flattened(stored) == stored, name


def test_jsonl_lines_end_at_newlines_only_and_a_byte_order_mark_is_dropped(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped; splitlines() broke lines at
    them and the file was refused as invalid JSON, as was one starting with a byte-order mark."""
    path = tmp_path / "d.jsonl"
    rows = ["first\u2028line", "second\u2029x\u0085y", "third"]
    path.write_bytes(("\ufeff" + "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in rows)).encode())
    assert texts.load_paragraphs(str(path)) == rows


def test_a_text_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 one\n\ncaf\xe9 two\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--data: .*latin\.txt is not UTF-8 text"):
        texts.load_paragraphs(str(path))


def test_a_file_name_with_a_plus_is_one_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q+a.txt").write_text("one\n\ntwo\n\nthree\n")
    assert texts.spec_names("q+a.txt") == ["q+a.txt"]
    parts, held = texts.load_split("q+a.txt")
    assert parts == [["one", "two"]] and held == ["three"]
    assert texts.spec_names("persuasion + python_code") == ["persuasion", "python_code"]


def test_data_paths_name_what_was_read(tmp_path, monkeypatch):
    """recover reads the text prune recorded: a part with spaces around its + and a directory
    were left relative, and a bundled name that is also a local file pointed at the file,
    which prune had not read (a bundled name is read first)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("a\n\nb\n")
    (tmp_path / "persuasion").write_text("not the bundled text\n\nat all\n")
    (tmp_path / "ds").mkdir()
    assert texts.data_paths("mine.txt + persuasion") == f"{tmp_path / 'mine.txt'}+persuasion"
    assert texts.data_paths("ds") == str(tmp_path / "ds")
    assert texts.data_paths("persuasion+python_tutorial") == "persuasion+python_tutorial"


def test_a_dataset_of_one_row_is_refused_like_a_file(tmp_path, monkeypatch):
    """A datasets directory returned before the check that a text holds two paragraphs."""

    class Dataset:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["only one row"]

    fake = types.SimpleNamespace(load_from_disk=lambda path: Dataset(), DatasetDict=dict)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match=r"--data: .*ds' holds 1 paragraph\(s\); need at least 2"):
        texts.load_paragraphs(str(tmp_path / "ds"))


def test_a_dataset_of_several_splits_or_rows_without_text_is_refused(tmp_path, monkeypatch):
    """A datasets directory of several splits gave its first without a word (a "test" split
    first calibrated on it), and rows whose text was not a string were dropped, where a JSON
    record without one is refused."""

    class Dataset:
        column_names = ["text"]

        def __init__(self, rows):
            self.rows = rows

        def __getitem__(self, key):
            return self.rows

    class DatasetDict(dict):
        pass

    loaded = {}
    fake = types.SimpleNamespace(load_from_disk=lambda path: loaded["value"], DatasetDict=DatasetDict)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "ds").mkdir()
    loaded["value"] = DatasetDict(test=Dataset(["a", "b"]), train=Dataset(["c", "d"]))
    with pytest.raises(ValueError, match=r"--data: .*ds holds a dataset of 2 splits \(test, train\); name one of "
                                         r"their directories \(e\.g\. .*ds/test\)"):
        texts.load_paragraphs(str(tmp_path / "ds"))
    loaded["value"] = DatasetDict()
    with pytest.raises(ValueError, match=r"--data: .*ds holds a dataset dict with no split, so no text$"):
        texts.load_paragraphs(str(tmp_path / "ds"))
    loaded["value"] = DatasetDict(train=Dataset(["c", "d"]))
    assert texts.load_paragraphs(str(tmp_path / "ds")) == ["c", "d"]
    loaded["value"] = Dataset(["c", None, "d"])
    with pytest.raises(ValueError, match=r"--data: dataset .*ds row 1 has no string 'text' \(NoneType\)"):
        texts.load_paragraphs(str(tmp_path / "ds"))


def test_a_reference_share_below_one_leaves_a_sequence_of_the_data():
    assert texts.reference_samples(4, 0.9, "persuasion") == 3
    assert texts.reference_samples(1, 0.5, "persuasion") == 0


@pytest.mark.parametrize("causal", [True, False])
def test_a_short_text_keeps_the_reference_share_of_what_it_gives(tiny_dir, causal, tmp_path):  # noqa: F811
    """Asked for 64 sequences, a short text gave 5 and the reference share took 16 more (76%,
    not 25%); the share is now taken of the sequences the text gives."""
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(f"the a of and to in was her she it he had not be {i}" for i in range(7)))
    parts, _ = texts.load_split(str(path))
    batches, settings = texts.calibration_set(_tokenizer(tiny_dir), parts, str(path), causal=causal, samples=64,
                                              seq_len=8, reference=0.25, batch_size=4)
    total = sum(len(b["input_ids"]) for b in batches)
    own = total - settings["reference"]["samples"]
    assert own < 48 and settings["reference"]["samples"] == round(own / 3) and total < 64


def test_a_text_of_a_mix_too_short_for_a_window_is_named(tiny_dir, tmp_path):  # noqa: F811
    """Of two texts joined by +, the one too short for a --seq-len window was not named, and the
    refusal named --seq-len alone, though the text is what is short."""
    long, short = tmp_path / "long.txt", tmp_path / "short.txt"
    long.write_text("\n\n".join(f"the a of and to in was her she it he had not be {i}" for i in range(40)))
    short.write_text("the a\n\nof and\n\nto in")
    for spec in (f"{long}+{short}", str(short)):
        with pytest.raises(ValueError, match=f"^--data: the text '{short}' has \\d+ tokens, fewer than one window "
                                             "of --seq-len 16$"):
            texts.calibration_set(_tokenizer(tiny_dir), texts.load_split(spec)[0], spec, causal=True, samples=8,
                                  seq_len=16, reference=0.25)
    with pytest.raises(ValueError, match="^--reference: the bundled text 'python_code' has \\d+ tokens, fewer than "
                                         r"one window of --seq-len 10000000 \(--reference 0 leaves the bundled texts "
                                         r"out\)$"):  # it blamed --data, which the user's long text was not
        texts.reference_batches(_tokenizer(tiny_dir), samples=2, seq_len=10_000_000, causal=True,
                                exclude="persuasion+python_tutorial")


def test_the_command_says_when_the_text_gives_fewer_sequences(run, tmp_path, tiny_dir):  # noqa: F811
    """The report said 64 x 16 tokens where 21 sequences were used."""
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(f"the a of and to in was her she it he had not be {i}" for i in range(10)))
    code, lines = run(["scan", tiny_dir, "--data", path, "--samples", "64", "--seq-len", "16", "--quiet",
                       "--out", tmp_path / "s"])
    assert code == 0 and any("--samples 64: the calibration text gives" in line for line in lines), lines
    settings = json.loads((tmp_path / "s" / "scores.json").read_text())["settings"]
    assert settings["samples_requested"] == 64 and settings["samples"] < 64


def test_perplexity_scores_the_tokens_after_the_last_full_window():
    """123 held-out tokens in windows of 64 scored 63 and dropped the last 59."""
    import transformers

    from headprune.app.evaluate import perplexity
    from hf_tiny import tiny_config

    class Tok:
        def __call__(self, text, add_special_tokens=False, verbose=True):  # as transformers' tokenizers
            return {"input_ids": [int(w) for w in text.split()]}

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=128)).eval()
    ids = torch.randint(0, 50, (123,), generator=torch.Generator().manual_seed(0)).tolist()
    out = perplexity(model, Tok(), [" ".join(map(str, ids))], window=64, stride=64)
    assert out["windows"] == 2 and out["tokens"] == 63 + 59
    logits = model(input_ids=torch.tensor([ids[59:]])).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[60:])[:, None]).squeeze(-1)
    first = model(input_ids=torch.tensor([ids[:64]])).logits.float()
    lp0 = torch.log_softmax(first[0, :-1], -1).gather(-1, torch.tensor(ids[1:64])[:, None]).squeeze(-1)
    want = -(lp0.sum() + lp[64 - 59 - 1:].sum()).item() / 122
    assert math.isclose(out["nll"], want, rel_tol=1e-5)
    capped = perplexity(model, Tok(), [" ".join(map(str, ids))], window=64, stride=64, max_windows=1)
    assert capped["windows"] == 1 and capped["tokens"] == 63


class _BosTok:
    """A tokenizer that starts every text with BOS (99) by default, as Llama's and Gemma's do
    (``before=False``: one that only appends it, which is no BOS)."""

    def __init__(self, before=True):
        self.before = before

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [int(w) if w.isdigit() else 0 for w in text.split()]
        return {"input_ids": ([99] + ids if self.before else ids + [99]) if add_special_tokens else ids}


def test_windows_start_with_the_bos_token_a_tokenizer_adds():
    """Calibration windows and perplexity windows never started with BOS, which Gemma-2 and the
    Llama families are trained with first (SmolLM2's and GPT-2's tokenizers add none: unchanged)."""
    import transformers

    from headprune.app.evaluate import perplexity
    from hf_tiny import tiny_config

    ids = torch.randint(0, 50, (123,), generator=torch.Generator().manual_seed(0)).tolist()
    text = [" ".join(map(str, ids))]
    assert texts.bos_token(_BosTok()) == 99 and texts.bos_token(_BosTok(before=False)) is None
    batches = texts.calibration_batches(_BosTok(), text, causal=True, samples=3, seq_len=8, batch_size=8)
    want = torch.tensor([[99] + ids[7 * k: 7 * k + 7] for k in range(3)])
    assert torch.equal(batches[0]["input_ids"], want)  # the stream goes on across windows, none of it lost
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=128)).eval()
    out = perplexity(model, _BosTok(), text, window=64, stride=64)
    assert out["windows"] == 2 and out["tokens"] == 123  # every token scored once, the first from BOS alone

    def scored(start, first):
        chunk = torch.tensor([[99] + ids[start: start + 63]])
        lp = torch.log_softmax(model(input_ids=chunk).logits.float()[0, :-1], -1)
        return lp.gather(-1, chunk[0, 1:, None]).squeeze(-1)[first:].sum()

    assert math.isclose(out["nll"], -(scored(0, 0) + scored(60, 3)).item() / 123, rel_tol=1e-5)
    one = perplexity(model, _BosTok(), [str(ids[0])], window=64)  # one token: scored from BOS alone (it was refused)
    assert one["tokens"] == 1 and one["windows"] == 1
    lp = torch.log_softmax(model(input_ids=torch.tensor([[99, ids[0]]])).logits.float()[0, 0], -1)[ids[0]]
    assert math.isclose(one["nll"], -lp.item(), rel_tol=1e-5)
    from headprune.app.evaluate import thin_held_out
    from headprune.app.load import Loaded
    from headprune.hf.generated import generated_batches

    short = Loaded(transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=16)), _BosTok(),
                   "causal", "tiny")
    assert thin_held_out(short, [" ".join(map(str, ids[:15]))]) is None  # 15 of the text fill a window of 16
    assert "has 14 token(s), fewer than one window of 15" in thin_held_out(short, [" ".join(map(str, ids[:14]))])
    rows = generated_batches(model, samples=2, seq_len=8, start=99, keep_start=True)[0]["input_ids"]
    assert rows.shape == (2, 8) and rows[:, 0].tolist() == [99, 99]  # sampled rows start as text windows do


def test_the_whole_stream_is_tokenized_without_the_length_warning(tiny_dir):  # noqa: F811
    """Calibration and perplexity tokenize a text longer than the model's positions at once and
    cut it into windows; transformers warned at every run that it "will result in indexing errors"."""
    import logging

    from transformers.utils import logging as hf_logging

    tok = _tokenizer(tiny_dir)
    tok.model_max_length = 8
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root, level = hf_logging.get_logger(), hf_logging.get_verbosity()
    root.addHandler(handler)
    hf_logging.set_verbosity_warning()  # as a run without --quiet (the suite sets errors only)
    try:
        windows = texts.token_windows(tok, ["the a of and to in"] * 10, 4)
        other = _tokenizer(tiny_dir)  # the warning is given once per tokenizer: another shows it reaches here
        other.model_max_length = 8
        other(" ".join(["the a of"] * 10))
    finally:
        hf_logging.set_verbosity(level)
        root.removeHandler(handler)
    assert windows.shape[1] == 4 and windows.shape[0] >= 10
    assert sum("longer than the specified maximum" in m for m in seen) == 1, seen  # the other tokenizer's


def test_one_paragraph_per_line_is_told_how_paragraphs_are_separated(tmp_path):
    """A file of one paragraph per line read as one paragraph and was refused without a word on
    why; a .ndjson file (JSON Lines by another name) read as one paragraph of JSON."""
    (tmp_path / "lines.txt").write_text("one line\ntwo line\nthree line\n")
    with pytest.raises(ValueError, match=r"holds 1 paragraph\(s\); need at least 2 \(calibration and held-out\); a "
                                         "text file's paragraphs are separated by blank lines"):
        texts.load_paragraphs(str(tmp_path / "lines.txt"))
    (tmp_path / "r.ndjson").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert texts.load_paragraphs(str(tmp_path / "r.ndjson")) == ["one", "two"]


def test_a_record_reads_as_the_same_paragraph_of_a_text_file(tmp_path):
    """A JSON record lost its first line's indentation and kept its CRLF and trailing spaces,
    where a text file's paragraph keeps the one and drops the others: the same code tokenised
    otherwise by the file it came in."""
    code = "    x = 1  \r\n    y = 2\r\n"
    txt, jsonl, array = tmp_path / "c.txt", tmp_path / "c.jsonl", tmp_path / "c.json"
    txt.write_bytes(("\n\n" + code + "\n\nb\n").encode())
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ("\n" + code, "b", " \r\n ")) + "\n")
    array.write_text(json.dumps([{"text": code}, {"text": "b\r"}]))
    want = ["    x = 1\n    y = 2", "b"]
    assert texts.load_paragraphs(str(txt)) == texts.load_paragraphs(str(jsonl)) == texts.load_paragraphs(str(array)) \
        == want


def test_the_same_text_under_another_name_is_refused_and_a_bundled_file_is_its_name(tmp_path):
    """Only the same path was caught: a copy, a link or a bundled text's own file took the same
    calibration windows twice, and each held-out paragraph came right after its copy (a causal
    LM could copy it: perplexity too good). A bundled text given by its file was no reason to
    leave it out of the reference share."""
    import os
    import shutil

    a = tmp_path / "a.txt"
    a.write_text("\n\n".join(f"paragraph {i}" for i in range(10)))
    shutil.copy(a, tmp_path / "copy.txt")
    os.link(a, tmp_path / "link.txt")
    bundled = str(texts.DATA / "persuasion.txt")
    for other in (tmp_path / "copy.txt", tmp_path / "link.txt"):
        with pytest.raises(ValueError, match=f"names '{a}' twice \\(as '{other}', which holds the same paragraphs\\)"):
            texts.load_split(f"{a}+{other}")
    with pytest.raises(ValueError, match="names 'persuasion' twice"):
        texts.load_split(f"persuasion+{bundled}")
    shutil.copy(bundled, tmp_path / "mine.txt")  # a copy is the text too (its share would repeat it)
    assert texts.reference_texts(bundled) == texts.reference_texts("persuasion") == ["python_tutorial", "python_code"]
    assert texts.reference_texts(str(tmp_path / "mine.txt")) == ["python_tutorial", "python_code"]
    assert texts.reference_texts(str(a)) == list(texts.BUNDLED_TEXTS)


def test_the_reference_share_recorded_is_the_one_the_bundled_texts_gave(tiny_dir, tmp_path):  # noqa: F811
    """Where the bundled texts' calibration parts hold fewer paragraphs than the share asks
    (python_tutorial's 488 of an equal third of 2,000), the settings recorded the share asked
    for, and the report said so many sequences came from them."""
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(f"the a of and to in was her she it he had not be {i}" for i in range(4000)))
    parts, _ = texts.load_split(str(path))
    with pytest.warns(texts.TextWarning, match=r"--reference: the bundled texts give (\d+) of the 2000 sequences "
                                               "asked of them; calibrating on those"):
        batches, settings = texts.calibration_set(_tokenizer(tiny_dir), parts, str(path), causal=False, samples=4000,
                                                  seq_len=8, reference=0.5, batch_size=64)
    total = sum(len(b["input_ids"]) for b in batches)
    assert settings["reference"]["samples"] == total - 2000 < 2000


def test_the_samples_warning_names_the_bundled_texts_when_they_fell_short(run, tmp_path, tiny_dir):  # noqa: F811
    """Where the reference share's bundled texts gave fewer sequences than asked, the command
    then said "the calibration text gives" that many, which the user's text had given in full."""
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(f"the a of and to in was her she it he had not be {i}" for i in range(4000)))
    code, lines = run(["prune", tiny_dir, "--data", path, "--samples", "4000", "--seq-len", "8", "--quiet",
                       "--out", tmp_path / "p", "--reference", "0.5", "--ratio", "0.25"])
    assert code == 0, lines
    assert any(re.search(r"--samples 4000: the calibration text and the bundled texts of the reference share give "
                         r"\d+ sequences \(paragraphs\); calibrating on those", line) for line in lines), lines
