"""headprune.hf.generated: calibration text sampled from the causal LM itself, and
``--generated N`` on the command line."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_tiny import tiny_config, tiny_model  # noqa: E402
from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)

from headprune.hf import collect  # noqa: E402
from headprune.hf.generated import generated_batches  # noqa: E402


def _lm(family="llama"):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def _reference(model, n, length, seed, start):
    """The same draws, one sequence at a time, without a cache: a full forward per token."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[start] for _ in range(n)]
    with torch.no_grad():
        for _ in range(length):
            logits = model(input_ids=torch.tensor(seqs)).logits[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            for s, t in zip(seqs, nxt[:, 0].tolist()):
                s.append(t)
    return torch.tensor([s[1:] for s in seqs])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_samples_are_the_models_own_draws(family):
    model = _lm(family).train()
    start = model.config.bos_token_id if family == "llama" else 2  # the tiny gpt2's BOS is past its vocabulary
    batches = generated_batches(model, samples=5, seq_len=7, batch_size=2, seed=3,
                                start=None if family == "llama" else start)
    assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 7), (1, 7)]
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    ids = torch.cat([b["input_ids"] for b in batches])
    model.eval()
    # the cached loop draws exactly what full forwards draw from the same generator, unless a
    # near-tie of probabilities flips a draw between the two float paths (not on these seeds)
    assert torch.equal(ids, _reference(model, 5, 7, 3, start))
    again = generated_batches(model, samples=5, seq_len=7, batch_size=5, seed=3, start=start)
    assert torch.equal(ids, again[0]["input_ids"])
    other = generated_batches(model, samples=5, seq_len=7, seed=4, start=start)
    assert not torch.equal(ids, torch.cat([b["input_ids"] for b in other]))


def test_model_is_left_as_it_was_and_batches_collect():
    model = _lm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = generated_batches(model, samples=3, seq_len=6, start=2)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    scores = collect(model.eval(), batches, progress=False, moments=True)
    assert scores.moments.tokens(0) == 18


def test_progress_callable_sees_every_group():
    seen = []
    generated_batches(_lm(), samples=40, seq_len=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(32, 40), (40, 40)]


@pytest.mark.parametrize("kw,message", [
    ({"samples": 0}, "samples: expected a positive int, got 0"),
    ({"seq_len": 2.5}, "seq_len: expected a positive int, got 2.5"),
    ({"batch_size": True}, "batch_size: expected a positive int, got True"),
    ({"start": 10**6}, r"start: expected a token id in \[0, 100\), got 1000000"),
])
def test_bad_arguments_are_named(kw, message):
    args = {"samples": 2, "seq_len": 3, **kw}
    with pytest.raises(ValueError, match=message):
        generated_batches(_lm(), **args)


def test_refuses_models_it_cannot_sample_from():
    with pytest.raises(ValueError, match=r"needs a causal LM, not bert \(encoder\)"):
        generated_batches(tiny_model("bert"), samples=1, seq_len=2)
    with pytest.raises(ValueError, match="has no language-model head"):
        generated_batches(tiny_model("llama"), samples=1, seq_len=2)
    with pytest.raises(ValueError, match="seq_len: 65 tokens are more than the 64 learned positions of this gpt2 model"):
        generated_batches(_lm("gpt2"), samples=1, seq_len=65, start=2)
    assert generated_batches(_lm("gpt2"), samples=1, seq_len=64, start=2)[0]["input_ids"].shape == (1, 64)
    with pytest.raises(ValueError, match=r"no bos_token_id or eos_token_id inside its vocabulary of 100 to start "
                                         r"sampling from \(bos_token_id=50256, eos_token_id=50256"):
        generated_batches(_lm("gpt2"), samples=1, seq_len=2)


def test_cli_generated_joins_the_calibration_and_says_so(run, tmp_path, tiny_dir):  # noqa: F811
    import transformers

    path = tmp_path / "llama"
    _lm().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    common = ["--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-reconstruct", "--physical"]
    code, err = run(["prune", path, *common, "--generated", "3", "--out", tmp_path / "g"])
    assert code == 0, err
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["settings"]["generated"] == 3
    text = (tmp_path / "g" / "report.md").read_text()
    assert "and 3 x 16 tokens sampled from the model itself (`--generated`)" in text
    code, err = run(["prune", path, *common, "--out", tmp_path / "p"])
    assert code == 0, err
    assert "generated" not in json.loads((tmp_path / "p" / "report.json").read_text())["settings"]
    code, err = run(["prune", tiny_dir, "--count", "1", "--samples", "4", "--quiet", "--generated", "2",
                     "--out", tmp_path / "e"])
    assert code == 2 and any("--generated: sampling calibration text needs a causal LM" in line for line in err), err
    assert not (tmp_path / "e").exists()
