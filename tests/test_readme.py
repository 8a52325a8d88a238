"""The README's Python example runs as written: its two blocks, in order, on a tiny random Llama
saved as a local directory (the path is the only text replaced) and a text file in the working
directory, as a new user would run them."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

README = Path(__file__).resolve().parents[1] / "README.md"
PATH_LINE = 'path = "path/to/hf-dir"'


def _python_blocks() -> list:
    """The README's Python blocks from the complete program on."""
    text = README.read_text()
    start = text.index("Python, on a causal LM")
    return re.findall(r"```python\n(.*?)```", text[start:], flags=re.S)[:2]


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    import torch
    import transformers

    from hf_tiny import save_tiny_bert, tiny_config

    blocks = _python_blocks()
    assert len(blocks) == 2 and blocks[0].count(PATH_LINE) == 1, "the README's example changed shape"
    save_tiny_bert(tmp_path / "bert")  # its word-level tokenizer
    path = tmp_path / "llama"
    torch.manual_seed(0)  # room for the example's 256-token windows
    transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=256)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "bert").save_pretrained(path)
    monkeypatch.chdir(tmp_path)
    words = "the a of and to in was her she it he had not be".split()
    g = torch.Generator().manual_seed(0)
    paragraphs = [" ".join(words[i] for i in torch.randint(len(words), (300,), generator=g)) for _ in range(60)]
    Path("my.txt").write_text("\n\n".join(paragraphs))

    namespace: dict = {}
    exec(compile(blocks[0].replace(PATH_LINE, f"path = {str(path)!r}"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "query heads 8 -> " in out and (tmp_path / "pruned-api" / "headprune.json").exists()
    assert sum(len(h) for h in namespace["headprune"].kept_heads(namespace["model"]).values()) < 8  # reloaded
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert namespace["g"].gate.grad is not None and torch.isfinite(namespace["masked_loss"])

