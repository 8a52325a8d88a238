"""``--moments-dtype``: the refit's second moments summed in float32 (half the memory) on the
command line, their size said before the collection, every collection of the run in the same
type, and the options that would not use it refused."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)
from test_cli_gqa import _tiny_llama  # noqa: E402

from hf_tiny import tiny_batch, tiny_model  # noqa: E402

from headprune.hf import collect  # noqa: E402
from headprune.hf.collect import moments_size  # noqa: E402

ARGS = ["--samples", "4", "--seq-len", "16", "--no-speed"]


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_size_said_is_what_the_collection_holds(family, dtype):
    model = tiny_model(family)
    got = collect(model, [tiny_batch(family)], progress=False, moments=dtype).moments
    size, sites = moments_size(model, dtype)
    assert size == sum(g.numel() * g.element_size() for g in got.gram) and sites == got.num_sites
    assert got.dtype == getattr(torch, dtype) and moments_size(model, False) == (0, 0)


def test_prune_sums_every_rounds_moments_in_float32(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    import headprune.hf as hf
    from headprune import distributed

    asked = []
    for module in (hf, distributed):  # the first collection goes through distributed.collect, the rounds through hf
        real = module.collect

        def spy(*a, _real=real, **kw):
            asked.append(kw.get("moments"))
            return _real(*a, **kw)

        monkeypatch.setattr(module, "collect", spy)
    path = _tiny_llama(tmp_path, tiny_dir)
    code, err = run(["prune", path, "--ratio", "0.5", "--protect-layers", "", "--steps", "2", *ARGS, "--moments-dtype", "float32",
                     "--out", tmp_path / "p"])
    assert code == 0, err
    assert len(asked) == 2 and all(m == "float32" for m in asked), asked


def test_the_size_is_said_before_the_collection(tmp_path, tiny_dir, monkeypatch, capsys):  # noqa: F811
    from headprune.app.cli import main

    path = _tiny_llama(tmp_path, tiny_dir)
    monkeypatch.chdir(tmp_path)
    assert main([str(a) for a in ["prune", path, "--ratio", "0.3", *ARGS, "--moments-dtype", "float32",
                                  "--out", tmp_path / "p"]]) == 0
    out = capsys.readouterr().out
    size, sites = moments_size(tiny_model("llama"), "float32")
    assert f"second moments of {sites} output projections' inputs: {size / 2**20:,.1f} MiB in float32" in out
    settings = json.loads((tmp_path / "p" / "report.json").read_text())["settings"]
    assert settings["moments_dtype"] == "float32"
    assert main([str(a) for a in ["prune", path, "--ratio", "0.3", *ARGS, "--out", tmp_path / "q", "--quiet"]]) == 0
    assert "moments_dtype" not in json.loads((tmp_path / "q" / "report.json").read_text())["settings"]  # as before


def test_options_that_would_not_use_it_are_refused(run, tmp_path):  # noqa: F811
    code, err = run(["prune", tmp_path / "absent", "--ratio", "0.3", "--moments-dtype", "float32", "--no-reconstruct",
                     "--score", "entropy"])
    message = "--moments-dtype float32: no second moments are collected with --no-reconstruct and --score entropy"
    assert code == 2 and any(message in line for line in err), err


def test_the_measured_allocation_and_the_sequential_pass_sum_in_the_same_type(run, tmp_path, tiny_dir,  # noqa: F811
                                                                               monkeypatch):
    """The measured allocation (encoders' default) took its part's moments in float64, and
    --sequential was refused: both now sum in the type of the collection's moments."""
    from headprune.hf import allocation, sequential

    asked, grams = [], []
    real, real_gram = allocation.collect, sequential._gram

    def gram(*a):
        out = real_gram(*a)
        grams.append(out.dtype)
        return out

    monkeypatch.setattr(allocation, "collect", lambda *a, **kw: asked.append(kw.get("moments")) or real(*a, **kw))
    monkeypatch.setattr(sequential, "_gram", gram)
    code, err = run(["prune", tiny_dir, "--ratio", "0.5", *ARGS, "--moments-dtype", "float32", "--out", tmp_path / "e"])
    assert code == 0 and asked and all(m == torch.float32 for m in asked), (err, asked)
    code, err = run(["prune", _tiny_llama(tmp_path, tiny_dir), "--ratio", "0.5", "--protect-layers", "", *ARGS,
                     "--sequential", "--moments-dtype", "float32", "--out", tmp_path / "s"])
    assert code == 0 and grams and set(grams) == {torch.float32}, (err, grams)
    one = sequential.calibrate_sequentially(tiny_model("llama"), [tiny_batch("llama")], ratio=0.3, moments="float32")[1]
    assert one.moments.dtype == torch.float32


def test_a_sweep_records_the_moments_type_with_its_calibration(run, tmp_path, tiny_dir):  # noqa: F811
    """The type is a calibration setting: recorded in the sweep's settings, and in the fingerprint
    its journal and a collection checkpoint are resumed by."""
    args = ["sweep", tiny_dir, "--samples", "4", "--seq-len", "16", "--quiet", "--ratios", "0.2", "--seeds", "1",
            "--out", tmp_path / "s"]
    code, err = run([*args, "--moments-dtype", "float32"])
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["settings"]["moments_dtype"] == "float32"


@pytest.mark.parametrize("moments", ["bogus", False, "float16"])
def test_calibrate_sequentially_refuses_moments_it_cannot_sum_in(moments):
    """The one pass refused these with a message that listed False as accepted; given scores and
    counts it accepted any value and summed in the scores' type."""
    from headprune.hf.sequential import calibrate_sequentially

    model, batches = tiny_model("llama"), [tiny_batch("llama")]
    with pytest.raises(ValueError, match=r"^moments: expected True, 'float64' or 'float32', got"):
        calibrate_sequentially(model, batches, ratio=0.3, moments=moments)
    scores = collect(model, batches, progress=False, moments=True)
    with pytest.raises(ValueError, match=r"^moments: given scores and counts, the pass sums in the type of the scores'"):
        calibrate_sequentially(model, batches, scores, {1: 1}, moments="float32")
