"""The reference share of a refit's calibration (``--reference``): sequences from the bundled
texts the user's text does not name, taken from their calibration parts, joined to the
user's own in ``prune`` and ``sweep``."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)

from headprune.app import texts  # noqa: E402


def _tokenizer(tiny_dir):  # noqa: F811
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def test_reference_texts_are_the_bundled_kinds_the_data_does_not_name():
    assert texts.BUNDLED_TEXTS == ("persuasion", "python_tutorial", "python_code")
    assert texts.reference_texts(None) == ["python_code"]  # the default data names the other two
    assert texts.reference_texts("persuasion") == ["python_tutorial", "python_code"]
    assert texts.reference_texts("/tmp/mine.txt") == list(texts.BUNDLED_TEXTS)
    assert texts.reference_texts("python_code+persuasion + python_tutorial") == []
    assert texts.reference_samples(64, 0.25, "persuasion") == 16
    assert texts.reference_samples(256, 0.25, "/tmp/mine.txt") == 64
    assert texts.reference_samples(64, 0.0, "persuasion") == 0
    assert texts.reference_samples(64, 0.5, "persuasion+python_tutorial+python_code") == 0
    for bad in (1.0, -0.1, True, "0.2", float("nan")):
        with pytest.raises(ValueError, match=r"reference: expected a share in \[0, 1\)"):
            texts.reference_samples(64, bad, "persuasion")


def test_python_code_is_code_from_its_calibration_part():
    paragraphs = texts.load_paragraphs("python_code")
    calib, held = texts.split(paragraphs)
    assert calib[0].startswith("# Author: Steven J. Bethard")  # argparse.py comes first
    assert sum("def " in p for p in calib) > 100 and held


@pytest.mark.parametrize("causal", [True, False])
def test_calibration_set_takes_the_share_from_the_reference_calibration_parts(tiny_dir, causal):  # noqa: F811
    tok = _tokenizer(tiny_dir)
    spec = "persuasion"
    parts, _ = texts.load_split(spec)
    batches, settings = texts.calibration_set(tok, parts, spec, causal=causal, samples=12, seq_len=16,
                                              reference=0.25, batch_size=4)
    assert settings == {"reference": {"samples": 3, "texts": ["python_tutorial", "python_code"]}}
    own = texts.calibration_batches(tok, parts[0], causal=causal, samples=9, seq_len=16, batch_size=4)
    ref = texts.mixed_calibration_batches(tok, [texts.split(texts.load_paragraphs(n))[0]
                                                for n in ("python_tutorial", "python_code")],
                                          causal=causal, samples=3, seq_len=16, batch_size=4)
    assert len(batches) == len(own) + len(ref)
    for got, want in zip(batches, own + ref):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert sum(len(b["input_ids"]) for b in batches) == 12
    plain, none = texts.calibration_set(tok, parts, spec, causal=causal, samples=12, seq_len=16, reference=0.0,
                                        batch_size=4)
    assert none == {} and sum(len(b["input_ids"]) for b in plain) == 12
    assert torch.equal(plain[0]["input_ids"], own[0]["input_ids"])
    assert texts.reference_batches(tok, samples=3, seq_len=16, causal=causal,
                                   exclude="persuasion+python_tutorial+python_code") == []


def test_reference_batches_at_the_top_level():
    import headprune

    assert headprune.reference_batches is texts.reference_batches


def test_cli_prune_takes_the_reference_share_and_says_so(run, tmp_path, tiny_dir):  # noqa: F811
    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(f"the a of and {i} her she it he had not be was" for i in range(40)))
    common = ["prune", tiny_dir, "--data", data, "--count", "1", "--samples", "8", "--seq-len", "16", "--quiet"]
    code, err = run([*common, "--out", tmp_path / "r"])
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # two sequences in equal shares of three texts: one from each of the first two (all three were named)
    assert report["settings"]["reference"] == {"samples": 2, "texts": ["persuasion", "python_tutorial"]}
    assert ("(2 of the 8 sequences from the bundled `persuasion` and `python_tutorial`, "
            "`--reference`)") in (tmp_path / "r" / "report.md").read_text()
    code, err = run([*common, "--reference", "0", "--out", tmp_path / "n"])
    assert code == 0, err
    assert "reference" not in json.loads((tmp_path / "n" / "report.json").read_text())["settings"]
    code, err = run([*common, "--reference", "1", "--out", tmp_path / "bad"])
    assert code == 2 and any("--reference: expected a fraction in [0, 1)" in line for line in err), err
    assert not (tmp_path / "bad").exists()
    code, err = run(["scan", tiny_dir, "--reference", "0.5", "--out", tmp_path / "s"])
    assert code == 2 and any("unrecognized arguments: --reference" in line for line in err), err
