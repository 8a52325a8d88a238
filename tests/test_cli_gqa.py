"""``headprune prune`` on a grouped-query model: the KV cache's growth under ``--gqa query`` is
said (the fixtures of test_cli.py: an in-process ``main`` and a tokenizer directory)."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("gqa", ["query", "group"])
def test_prune_warns_when_the_kv_cache_grows(run, tmp_path, tiny_dir, gqa):  # noqa: F811
    import json

    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    # 2 layers of 4 query / 2 KV heads, the first kept whole: one query head leaves a partly
    # pruned group (KV grows), one group shrinks it
    code, err = run(["prune", path, "--count", "1", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--gqa", gqa, "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    before, after = report["before"]["kv_heads"], report["after"]["kv_heads"]
    warned = [line for line in err if "KV heads grew" in line]
    if gqa == "query":
        assert after > before and warned == [f"headprune: warning: KV heads grew from {before} to {after}: --gqa "
                                             "query repeats the KV head of a partly pruned group, so the KV cache "
                                             "grows; --gqa group prunes whole groups and shrinks it, at a higher "
                                             "quality cost (docs/quality.md)"]
    else:
        assert after < before and not warned
