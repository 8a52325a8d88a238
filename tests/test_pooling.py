"""Encoders' embeddings pooled as the model's sentence-transformers pipeline pools them, in
fidelity and distillation, and the pipeline kept beside a pruned model's weights."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import tiny_batch, tiny_model

from headprune.app.evaluate import embed, encoder_quality
from headprune.hf import load_pruned, prune_heads, save_pruned
from headprune.hf.distil import distillation_loss
from headprune.hf.pooling import MODES, pool, pooling_of


def _reference(h, mask, mode):  # float64, one sequence at a time, from its valid positions alone
    out = []
    for row, m in zip(h.double(), mask.bool()):
        valid = row[m]
        n, pos = len(valid), torch.arange(1, len(row) + 1, dtype=torch.float64)[m]
        out.append({"cls_token": row[0], "max_tokens": valid.max(0).values, "mean_tokens": valid.mean(0),
                    "mean_sqrt_len_tokens": valid.sum(0) / n ** 0.5,
                    "weightedmean_tokens": (valid * pos[:, None]).sum(0) / pos.sum(),
                    "lasttoken": valid[-1]}[mode])
    return torch.stack(out)


@pytest.mark.parametrize("side", ["right", "left"])
def test_each_mode_and_their_concatenation_match_a_float64_reference(side):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 5, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    mask = mask if side == "right" else mask.flip(1)
    for mode in MODES:
        if mode == "cls_token" and side == "left":
            continue  # the first position, padded or not, as sentence-transformers takes it
        torch.testing.assert_close(pool(h, mask, (mode,)).double(), _reference(h, mask, mode), rtol=1e-6, atol=1e-6)
    both = pool(h, mask, ("max_tokens", "mean_tokens"))
    assert both.shape == (3, 10) and torch.equal(both[:, 5:], pool(h, mask, ("mean_tokens",)))
    with pytest.raises(ValueError, match="pooling: expected modes among"):
        pool(h, mask, ("sum",))


def _pipeline(path, **modes):
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **{
        f"pooling_mode_{m}": modes.get(m, False) for m in MODES}}))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "../outside", "type": "sentence_transformers.models.Normalize"}]))
    (path.parent / "outside").mkdir()
    (path.parent / "outside" / "secret.txt").write_text("not the pipeline's")
    (path / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')


def test_a_first_token_pipeline_pools_fidelity_and_distillation_and_is_saved(tmp_path):
    """Fidelity and the distillation loss took the mean of the tokens of a model served by its
    first token's state, and a pruned model was saved without its pipeline (sentence-transformers
    then serves the mean, unnormalised)."""
    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).save_pretrained(tmp_path / "m")
    _pipeline(tmp_path / "m", cls_token=True)
    model = transformers.BertModel.from_pretrained(tmp_path / "m").eval()
    assert pooling_of(model) == ("cls_token",) and pooling_of(tiny_model("bert")) == ("mean_tokens",)

    class Tok:  # ids 3.. of each word, as many as the text has
        def __call__(self, texts, **kw):
            ids = [[3 + len(w) for w in t.split()] for t in texts]
            n = max(map(len, ids))
            return transformers.BatchEncoding({"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                                               "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i))
                                                                               for i in ids])})

    texts = ["a bb ccc", "dddd e"]
    enc = Tok()(texts)
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    torch.testing.assert_close(embed(model, Tok(), texts), F.normalize(h[:, 0], dim=-1))
    # a pruned copy saved without the pipeline is compared as its reference was pooled
    plain = copy.deepcopy(model)
    plain.config._name_or_path = ""
    reference = {"embeddings": embed(model, Tok(), texts), "pooling": "cls_token"}
    got = encoder_quality(plain, Tok(), texts, reference=reference, retrieval=False)
    assert got["fidelity"] == pytest.approx(1.0) and got["pooling"] == "cls_token"
    batch = tiny_batch("bert")
    student = transformers.BertModel.from_pretrained(tmp_path / "m").eval()
    prune_heads(student, {0: [1]})
    with torch.no_grad():
        s, t = student(**batch).last_hidden_state[:, 0], model(**batch).last_hidden_state[:, 0]
        want = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        torch.testing.assert_close(distillation_loss(student, model, batch), want)
    save_pruned(student, tmp_path / "pruned")
    assert (tmp_path / "pruned" / "modules.json").read_text() == (tmp_path / "m" / "modules.json").read_text()
    assert (tmp_path / "pruned" / "sentence_bert_config.json").exists()
    assert not (tmp_path / "outside" / "pruned").exists() and not list(tmp_path.glob("pruned/**/secret.txt"))
    assert pooling_of(load_pruned(tmp_path / "pruned")) == ("cls_token",)


def test_the_pipeline_is_read_as_sentence_transformers_reads_it(tmp_path, monkeypatch):
    """Pooling(**config): a pooling_mode name wins, a flag left out takes its default (the mean
    on); an older layout keeps the weights in 0_Transformer/ below the pipeline; a hub id is
    read from its cached snapshot. A save into the pipeline's own module folder copied that
    folder into itself until the path was too long."""
    import huggingface_hub
    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.BertModel(tiny_config("bert")).eval()
    model.save_pretrained(tmp_path / "m")
    _pipeline(tmp_path / "m")
    loaded = transformers.BertModel.from_pretrained(tmp_path / "m")
    pooling = tmp_path / "m" / "1_Pooling" / "config.json"
    for config, modes in [({"pooling_mode": "cls"}, ("cls_token",)), ({"pooling_mode": ["max", "lasttoken"]},
                           ("max_tokens", "lasttoken")), ({"pooling_mode_cls_token": True}, ("cls_token", "mean_tokens")),
                          ({"pooling_mode_mean_tokens": False}, ("mean_tokens",))]:
        pooling.write_text(json.dumps({"word_embedding_dimension": 16, **config}))
        assert pooling_of(loaded) == modes, config
    pooling.write_text(json.dumps({"pooling_mode": "median"}))
    with pytest.warns(UserWarning, match=r"pooling_mode 'median', which headprune does not compute"):
        assert pooling_of(loaded) == ("mean_tokens",)
    pooling.write_text(json.dumps({"pooling_mode": "cls"}))
    snapshots = tmp_path / "hub" / "models--own--bge" / "snapshots"  # a hub id, read from its one cached snapshot
    shutil.copytree(tmp_path / "m", snapshots / "abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded.config._name_or_path = "own/bge"
    assert pooling_of(loaded) == ("cls_token",)
    shutil.copytree(tmp_path / "m", snapshots / "def")  # two: which one the model came from is not known
    with pytest.warns(UserWarning, match=r"2 revisions of own/bge are in the hub cache"):
        assert pooling_of(loaded) == ("mean_tokens",)
    loaded.config._name_or_path = str(tmp_path / "m")
    save_pruned(loaded, tmp_path / "m" / "1_Pooling" / "pruned")  # inside a module folder of the pipeline
    saved = tmp_path / "m" / "1_Pooling" / "pruned"
    assert (saved / "modules.json").exists() and (saved / "1_Pooling" / "config.json").exists()
    assert not (saved / "1_Pooling" / "pruned").exists() and not list(saved.glob("1_Pooling/.*"))
    old = tmp_path / "old"  # weights in 0_Transformer/, the pipeline around them
    model.save_pretrained(old / "0_Transformer")
    (old / "1_Pooling").mkdir()
    (old / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                               "pooling_mode_mean_tokens": False}))
    (old / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    below = transformers.BertModel.from_pretrained(old / "0_Transformer")
    assert pooling_of(below) == ("cls_token",)
    (old / "modules.json").write_text(json.dumps([*json.loads((old / "modules.json").read_text()),
                                                  {"idx": 2, "name": "2", "path": "2_Dense",
                                                   "type": "sentence_transformers.models.Dense"}]))
    with pytest.warns(UserWarning, match=r"pipeline applies Dense after pooling, which headprune does not"):
        assert pooling_of(below) == ("cls_token",)
    save_pruned(below, tmp_path / "old_pruned")  # its layout is not what the save writes: no pipeline
    assert not (tmp_path / "old_pruned" / "modules.json").exists()
