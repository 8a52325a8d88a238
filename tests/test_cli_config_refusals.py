"""Options the model's config rules out (``--speed-decode`` or ``--generated`` on an encoder,
``--kv-ratio`` without grouped queries) are refused before the weights are read: they were
refused after loading them (minutes for a large model). The weights here are unreadable, so
a refusal that came after reading them would name the weights instead."""

import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)


def _unreadable(src, dst):
    """``src`` copied with its weights file replaced by bytes that are no safetensors."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    return dst


def _llama_dir(tmp_path, tiny_dir, name: str, kv: int):  # noqa: F811
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / name
    transformers.LlamaForCausalLM(tiny_config("llama", num_key_value_heads=kv)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_what_the_config_rules_out_is_refused_before_the_weights_are_read(run, tmp_path, tiny_dir, command):  # noqa: F811
    bert = _unreadable(tiny_dir, tmp_path / "bert")
    common = ["--samples", "4", "--seq-len", "16", "--quiet"]
    ratio = ["--ratio", "0.3"] if command == "prune" else ["--ratios", "0.3", "--seeds", "1"]
    cases = [(["--generated", "2"], "--generated: sampling calibration text needs a causal LM, not ")]
    if command == "prune":
        cases.append((["--speed-decode", "1x8"], "--speed-decode: "))
    for flags, said in cases:
        code, err = run([command, bert, *ratio, *common, *flags, "--out", tmp_path / "o"])
        assert code == 2 and len(err) == 1 and err[0].startswith(f"headprune {command}: error: {said}"), err
    if command != "prune":
        return
    from hf_tiny import tiny_config

    heads = tiny_config("llama").num_attention_heads
    plain = _unreadable(_llama_dir(tmp_path, tiny_dir, "plain", heads), tmp_path / "plain-broken")
    code, err = run(["prune", plain, *ratio, *common, "--kv-ratio", "0.25", "--out", tmp_path / "o"])
    assert code == 2 and err == [f"headprune prune: error: --kv-ratio: {plain} has no grouped queries; every KV head goes "
                                 "with its query head"], err
    # grouped queries: the config allows --kv-ratio, so the weights are read (and found unreadable)
    grouped = _unreadable(_llama_dir(tmp_path, tiny_dir, "grouped", heads // 2), tmp_path / "grouped-broken")
    code, err = run(["prune", grouped, *ratio, *common, "--kv-ratio", "0.25", "--out", tmp_path / "o"])
    assert code == 2 and "kv-ratio" not in " ".join(err) and "safetensors" in " ".join(err).lower(), err
    assert not (tmp_path / "o").exists()


def test_kv_ratio_goes_through_where_the_config_does_not_rule_grouped_queries_out(run, tmp_path, tiny_dir):  # noqa: F811
    """A config that leaves the KV heads to its class's default, or a headprune directory saved
    unpruned (no original config recorded), was refused as having no grouped queries."""
    import json

    import transformers

    import headprune
    from hf_tiny import tiny_config

    common = ["--ratio", "0.25", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--kv-ratio", "0.25"]
    heads = tiny_config("llama").num_attention_heads
    saved = tmp_path / "saved"
    model = transformers.LlamaForCausalLM(tiny_config("llama", num_key_value_heads=heads // 2))
    headprune.save_pruned(model, saved, tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_dir))
    code, err = run(["prune", saved, *common, "--out", tmp_path / "o1"])
    assert code == 0, err
    mistral = tmp_path / "mistral"  # MistralConfig's default: 8 KV heads
    transformers.MistralForCausalLM(tiny_config("mistral", num_attention_heads=16, num_key_value_heads=8,
                                                head_dim=4)).save_pretrained(mistral)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(mistral)
    config = json.loads((mistral / "config.json").read_text())
    del config["num_key_value_heads"]
    (mistral / "config.json").write_text(json.dumps(config))
    code, err = run(["prune", mistral, *common, "--out", tmp_path / "o2"])
    assert code == 0, err


def test_a_teacher_of_another_kind_or_family_is_refused_before_its_weights_are_read(run, tmp_path, tiny_dir):  # noqa: F811
    """eval refused a teacher of another kind after loading it, and recover loaded one of another
    kind or family before the distillation's checks refused it."""
    import transformers

    from hf_tiny import tiny_config

    path = _llama_dir(tmp_path, tiny_dir, "llama", tiny_config("llama").num_attention_heads)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "o"])
    assert code == 0, err
    bert = _unreadable(tiny_dir, tmp_path / "bert")
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(tiny_config("gpt2")).save_pretrained(gpt2)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(gpt2)
    gpt2 = _unreadable(gpt2, tmp_path / "gpt2-broken")
    code, err = run(["eval", tmp_path / "o", "--teacher", bert, "--quiet", "--no-speed"])
    assert code == 2 and err[-1].endswith(f"--teacher: {bert} is an encoder model, MODEL a causal one"), err
    code, err = run(["eval", tmp_path / "o", "--teacher", gpt2, "--quiet", "--no-speed"])
    assert code == 2 and err[-1].endswith(f"--teacher: {gpt2}: a gpt2 model cannot teach a llama student; pass the "
                                          "unpruned model MODEL was pruned from"), err
    code, err = run(["recover", tmp_path / "o", "--teacher", bert, "--steps", "1", "--quiet", "--out", tmp_path / "r"])
    assert code == 2 and err[-1].endswith(f"--teacher: {bert} is an encoder model, DIR a causal one"), err
    code, err = run(["recover", tmp_path / "o", "--teacher", gpt2, "--steps", "1", "--quiet", "--out", tmp_path / "r"])
    assert code == 2 and err[-1].endswith(f"--teacher: {gpt2}: a gpt2 model cannot teach a llama student; pass the "
                                          "unpruned model DIR was pruned from"), err
    assert not (tmp_path / "r").exists()
    # named by the report, not by --teacher: said so, with the advice to pass --teacher
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    (tmp_path / "o" / "report.json").write_text(json.dumps({**report, "model_path": str(bert)}))
    code, err = run(["recover", tmp_path / "o", "--steps", "1", "--quiet", "--out", tmp_path / "r"])
    assert code == 2 and err[-1].endswith(f"DIR/report.json names {bert} as the unpruned model, which is an encoder "
                                          "model, DIR a causal one; pass --teacher, the unpruned model DIR was pruned "
                                          "from"), err
    # a teacher that is not there is said before the pruned model's weights are read (unreadable here)
    for f in (tmp_path / "o" / "model").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    code, err = run(["recover", tmp_path / "o", "--teacher", tmp_path / "nowhere", "--steps", "1", "--quiet",
                     "--out", tmp_path / "r"])
    assert code == 2 and "--teacher: " in err[-1] and "nowhere" in err[-1] and "safetensors" not in err[-1], err
