"""The float type ``headprune prune`` saves (and evaluates) in by default: the checkpoint's own,
read from its config or, where the config names none (sentence-transformers checkpoints), from
the weights themselves; never narrower than what was read (the fixtures of test_cli.py)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import run, tiny_dir  # noqa: E402,F401  (fixtures)


def _checkpoint(tmp_path, tiny_dir, dtype, *, config_names_it: bool):  # noqa: F811
    import torch
    import transformers

    from hf_tiny import tiny_config

    path = tmp_path / f"llama-{dtype}-{config_names_it}"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config("llama")).to(getattr(torch, dtype)).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    if config_names_it:
        config["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_stored_float_type_counts_elements(tmp_path):
    import torch
    from safetensors.torch import save_file

    from headprune.hf.files import stored_float_type

    save_file({"big": torch.zeros(64, dtype=torch.float16), "small": torch.zeros(8),
               "ids": torch.zeros(100, dtype=torch.int64)}, tmp_path / "a.safetensors")
    save_file({"more": torch.zeros(80, dtype=torch.bfloat16)}, tmp_path / "b.safetensors")
    assert stored_float_type([tmp_path / "a.safetensors"]) == "float16"
    assert stored_float_type([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == "bfloat16"
    save_file({"ids": torch.zeros(3, dtype=torch.int64)}, tmp_path / "c.safetensors")
    assert stored_float_type([tmp_path / "c.safetensors"]) is None
    (tmp_path / "d.safetensors").write_bytes(b"not safetensors")
    assert stored_float_type([tmp_path / "d.safetensors"]) is None


@pytest.mark.parametrize("dtype,config_names_it", [("float32", False), ("float16", False), ("float16", True)])
def test_prune_saves_in_the_checkpoints_own_type(run, tmp_path, tiny_dir, dtype, config_names_it):  # noqa: F811
    import torch
    from safetensors import safe_open

    path = _checkpoint(tmp_path, tiny_dir, dtype, config_names_it=config_names_it)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["saved_dtype"] == dtype
    kinds = set()
    for file in (tmp_path / "o" / "model").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            kinds |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert kinds == {"F32" if dtype == "float32" else "F16"}


def test_kv_cache_row_compares_at_the_saved_type(run, tmp_path, tiny_dir):  # noqa: F811
    """The unpruned model is read in float32 and the pruned one saved in float16: the KV cache
    row compares both in float16, so it changes only by the KV heads removed."""
    path = _checkpoint(tmp_path, tiny_dir, "float16", config_names_it=True)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    b, a = report["before"], report["after"]
    assert b["kv_cache_dtype"] == a["kv_cache_dtype"] == "float16"
    assert b["kv_cache_bytes_per_token"] * a["kv_heads"] == a["kv_cache_bytes_per_token"] * b["kv_heads"]
    assert "KV cache bytes per token (float16)" in (tmp_path / "o" / "report.md").read_text()


def test_the_report_evaluates_the_saved_weights_as_they_are_loaded(run, tmp_path, tiny_dir):  # noqa: F811
    """A float16 checkpoint is read and evaluated in float32; the pruned model is saved in
    float16 and evaluated before saving with exactly the weights saved, in float32: its
    report's perplexity is the saved directory's, loaded as headprune loads it."""
    import torch
    from safetensors import safe_open

    from headprune.app import evaluate as E
    from headprune.app import texts
    from headprune.app.load import load_model

    path = _checkpoint(tmp_path, tiny_dir, "float16", config_names_it=True)
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--data", "persuasion", "--out", tmp_path / "o"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["compute_dtype"] == "float32" and report["settings"]["saved_dtype"] == "float16"
    for file in (tmp_path / "o" / "model").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    back = load_model(str(tmp_path / "o" / "model"))
    assert next(back.model.parameters()).dtype == torch.float32
    _, held = texts.load_split("persuasion")
    got = E.quality(back, held, None, eval_windows=48, progress=False)  # the CLI's default
    assert got["perplexity"] == report["after"]["perplexity"]
    assert "Both models were evaluated in float32" in (tmp_path / "o" / "report.md").read_text()  # --no-speed


def test_a_pruned_directory_read_in_a_half_type_computes_as_the_model_that_was_saved(tmp_path, tiny_dir):  # noqa: F811
    """eval / recover / prune of a pruned directory with --dtype bfloat16 cast the whole model,
    rounding the float32 rotary frequencies (from_pretrained and load_pruned keep them): the
    saved model computed another function than the one prune evaluated."""
    import torch
    import transformers

    import headprune
    from headprune.app.load import load_model
    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", max_position_embeddings=4096)).eval()
    model.save_pretrained(tmp_path / "src")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16).eval()
    headprune.prune_heads(model, {0: [1], 1: [0, 2]})
    headprune.save_pruned(model, tmp_path / "p", tokenizer=transformers.AutoTokenizer.from_pretrained(tiny_dir))
    read = load_model(str(tmp_path / "p"), dtype="bfloat16").model
    assert read.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in read.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 90, (1, 1500), generator=torch.Generator().manual_seed(0))
    for m in (read, model):  # torch's bfloat16 SDPA fails under ATEN_CPU_CAPABILITY=avx2 on CPUs with AMX
        m.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(read(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("flags", [["--dtype", "float16", "--save-dtype", "bfloat16"], ["--dtype", "bfloat16"]])
def test_one_half_type_computed_and_the_other_saved_is_refused_before_the_work(run, tmp_path, tiny_dir, flags):  # noqa: F811
    """Computing in float16 and saving bfloat16 (or the reverse) rounded the weights through
    both types: float16 does not hold every bfloat16 value, so the report described other
    weights than were saved. Refused after the load, naming the options that fix it."""
    path = _checkpoint(tmp_path, tiny_dir, "float16", config_names_it=True)  # saved as float16 by default
    code, err = run(["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "o", *flags])
    assert code != 0 and not (tmp_path / "o").exists()
    assert any("--save-dtype: saving" in line and "would evaluate other weights than it saves" in line for line in err), err


def test_a_narrower_dtype_than_the_checkpoint_is_said_to_round_every_weight(run, tmp_path, tiny_dir):  # noqa: F811
    """--dtype float16 on a float32 checkpoint rounds the weights pruning leaves alone too, and the
    saved float32 model holds those values: said, where it was silent. (Not bfloat16: torch's
    bfloat16 SDPA fails under ATEN_CPU_CAPABILITY=avx2 on CPUs with AMX.)"""
    path = _checkpoint(tmp_path, tiny_dir, "float32", config_names_it=True)
    common = ["--count", "2", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed"]
    code, err = run(["prune", path, *common, "--dtype", "float16", "--out", tmp_path / "o"])
    assert code == 0, err
    assert ("headprune: warning: --dtype float16 rounds every weight of the float32 checkpoint, those pruning leaves "
            "alone too: the model saved (float32) holds what was evaluated; leave --dtype out to keep the "
            "checkpoint's precision") in err
    code, err = run(["prune", path, *common, "--out", tmp_path / "p"])
    assert code == 0 and not any("rounds every weight" in line for line in err), err
