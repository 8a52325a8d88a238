"""Long texts: a ``--data`` text is tokenized a block of paragraphs at a time, only as far as
what is read, and gives the tokens the whole text gives."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import tiny_dir  # noqa: E402,F401  (fixture)

from headprune.app import texts  # noqa: E402


def _tokenizer(tiny_dir):  # noqa: F811
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def test_a_long_text_is_tokenized_only_as_far_as_it_is_read(tiny_dir, monkeypatch):  # noqa: F811
    """Calibration, perplexity and the thin-text check tokenized the whole text at once, which a
    tokenizer holds at about a hundred times its size (a 20 MB file took 2.1 GB); a text longer
    than a block is tokenized a block of paragraphs at a time, until what is read is there, and
    gives the tokens the whole text gives."""
    import transformers

    from headprune.app.evaluate import perplexity, thin_held_out
    from headprune.app.load import Loaded
    from hf_tiny import tiny_config

    tok, seen = _tokenizer(tiny_dir), []

    def counting(text, **kw):
        seen.append(len(text))
        return tok(text, **kw)

    paragraphs = texts.load_paragraphs("persuasion")  # 214,000 characters
    whole = tok("\n\n".join(paragraphs), add_special_tokens=False, verbose=False)["input_ids"]
    monkeypatch.setattr(texts, "BLOCK_CHARS", 2000, raising=False)
    batches = texts.calibration_batches(counting, paragraphs, causal=True, samples=4, seq_len=32)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.tensor(whole[:128]).view(4, 32))
    assert sum(seen) < 6000, seen  # a block or two, not the whole text
    assert texts.stream_ids(counting, paragraphs) == whole
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), max_position_embeddings=64)).eval()
    seen.clear()
    got = perplexity(model, counting, paragraphs, max_windows=3)
    assert sum(seen) < 6000, seen
    monkeypatch.setattr(texts, "BLOCK_CHARS", 1 << 30)  # one block: the whole text
    assert got == perplexity(model, tok, paragraphs, max_windows=3)
    monkeypatch.setattr(texts, "BLOCK_CHARS", 2000)
    seen.clear()
    assert thin_held_out(Loaded(model, counting, "causal", "tiny"), paragraphs) is None and sum(seen) < 6000


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_rebatch_refuses_a_size_that_is_not_a_positive_int(size):
    """A learned recipe's batch_size of 0 failed in range() ("arg 3 must not be zero"); a float
    in a slice."""
    batches = [{"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3)}]
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive int \(sequences per training step\), got"):
        texts.rebatch(batches, size)
    assert [len(b["input_ids"]) for b in texts.rebatch(batches, 3)] == [3, 1]


@pytest.mark.parametrize("max_windows", [0, -1, 1.5])
def test_perplexity_refuses_windows_that_are_not_a_positive_count(max_windows):
    """0 windows failed on an empty list, -1 read the text back to front (a sweep's eval_windows
    is not checked by the command line's argument type)."""
    from headprune.app.evaluate import perplexity

    with pytest.raises(ValueError, match=r"^max_windows: expected a positive int, got"):
        perplexity(None, None, ["a b"], max_windows=max_windows)
