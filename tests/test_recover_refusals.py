"""Recovery's refusals name what was given: validation batches as ``validation``, a command-line
teacher that cannot teach the pruned model as ``--teacher`` (before both models are evaluated),
token ids the model has no embedding for; an interrupted ``recover`` says what its --checkpoint
keeps, and a recovered model keeps the record of every recovery."""

import argparse
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import headprune  # noqa: E402
from headprune.hf.recover import recover  # noqa: E402
from hf_tiny import tiny_batch, tiny_config  # noqa: E402
from test_cli import run, tiny_dir  # noqa: E402,F401,F811  (fixtures)


def _pair():
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    student = copy.deepcopy(teacher)
    headprune.prune_heads(student, {0: [0, 1]})
    return teacher, student


@pytest.mark.parametrize("bad, error, message", [
    ("text", TypeError, "validation: expected dicts of tensors (e.g. a tokenizer's output), got str"),
    ({"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 3)}, ValueError,
     "validation: 'attention_mask' has shape (1, 3) but 'input_ids' (1, 2); they should match"),
    ({"input_ids": torch.ones(1, 4)}, TypeError, "validation: 'input_ids' are token ids, int64 or int32; got float32"),
])
def test_a_bad_validation_batch_is_refused_as_validation(bad, error, message):
    """They were refused as ``batches:``, the training batches the user had right."""
    teacher, student = _pair()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(error) as e:
        recover(student, teacher, [tiny_batch("llama")], steps=1, validation=[tiny_batch("llama", seed=1), bad])
    assert str(e.value) == message
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(TypeError, match=r"^batches: expected dicts of tensors"):  # the training batches' own name
        recover(student, teacher, ["text"], steps=1)


def test_a_teacher_of_another_family_is_refused_before_the_evaluation(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    """--teacher of the same tokenizer and width and another family was refused by the distillation
    only after both models were evaluated, as teacher: (the library's argument)."""
    import headprune.app.recover_command as R

    calib = ["--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    assert run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--out", tmp_path / "p"])[0] == 0
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    other = transformers.DistilBertConfig(vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=1, n_heads=2,
                                          hidden_dim=64, max_position_embeddings=config.max_position_embeddings)
    wide = tmp_path / "distil"
    transformers.AutoModel.from_config(other).save_pretrained(wide)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(wide)
    monkeypatch.setattr(R, "_quality", lambda *a, **k: pytest.fail("evaluated before the teacher was refused"))
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--teacher", wide, "--out", tmp_path / "r"])
    assert code == 2 and err[-1].endswith(f"--teacher: {wide}: a distilbert model cannot teach a bert student; "
                                          "pass the unpruned model DIR was pruned from"), err
    assert not (tmp_path / "r").exists()


def test_an_interrupted_recovery_says_what_its_checkpoint_keeps(tmp_path):
    from headprune.app.commands import interrupted

    ckpt = tmp_path / "r.pt"
    args = argparse.Namespace(command="recover", out=str(tmp_path / "r"), checkpoint=str(ckpt), stages=[])
    assert "--checkpoint" not in interrupted(args)  # nothing saved yet
    ckpt.write_bytes(b"steps")
    assert interrupted(args).endswith(f"--checkpoint {ckpt} keeps the recovery's steps saved: the same command again "
                                      "goes on from them")


def test_token_ids_outside_the_vocabulary_are_refused_by_name():
    """They failed inside the embedding: IndexError: index out of range in self."""
    from headprune.hf import collect

    teacher, student = _pair()
    bad = {"input_ids": torch.tensor([[1, 2, 1000]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    rows = teacher.get_input_embeddings().num_embeddings
    want = f"token ids run from 1 to 1000, and the model's input embeddings hold ids 0 to {rows - 1}"
    with pytest.raises(ValueError, match=f"^batches: {want}"):
        recover(student, teacher, [bad], steps=1)
    with pytest.raises(ValueError, match=f"^validation: {want}"):
        recover(student, teacher, [tiny_batch("llama")], steps=1, validation=[bad])
    with pytest.raises(ValueError, match=f"^batches: {want}"):
        collect(teacher, [bad], progress=False)
    negative = {"input_ids": torch.tensor([[-1, 2]])}
    with pytest.raises(ValueError, match=r"^batches: token ids run from -1 to 2"):
        collect(teacher, [negative], progress=False)


def test_a_second_recovery_keeps_the_record_of_the_first(run, tmp_path, tiny_dir):  # noqa: F811
    """The recovered model's headprune.json held only the last recovery's record."""
    import json

    calib = ["--samples", "4", "--seq-len", "16", "--quiet"]
    assert run(["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--out", tmp_path / "p"])[0] == 0
    for src, out, steps in (("p", "r1", "2"), ("r1", "r2", "1"), ("r2", "r3", "1")):
        code, err = run(["recover", tmp_path / src, "--steps", steps, "--validation", "0", "--samples", "4", "--quiet",
                         "--out", tmp_path / out])
        assert code == 0, err
    settings = json.loads((tmp_path / "r3" / "model" / "headprune.json").read_text())["settings"]
    assert settings["recover"]["steps"] == 1 and [r["steps"] for r in settings["recover_earlier"]] == [2, 1]
    first = json.loads((tmp_path / "r1" / "model" / "headprune.json").read_text())["settings"]
    assert "recover_earlier" not in first and first["recover"]["steps"] == 2
