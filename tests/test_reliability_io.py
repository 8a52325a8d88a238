"""Bad inputs of saving and loading pruned models: corrupt or mismatching ``headprune.json``,
damaged or hostile weights and configs, unwritable, non-empty or file targets. Every row
asserts the error type and message, and that nothing is left half-written or changed."""

import json
import os
import re
import shutil

import pytest
import torch

from hf_tiny import tiny_model
from model_snapshot import ModelSnapshot

from headprune.hf import kept_heads, load_pruned, prune_heads, save_pruned


# ---- saving and loading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Non-uniform (rebuilt by re-pruning) GPT-2 and T5 and a uniform (plain-loadable) Llama."""
    root = tmp_path_factory.mktemp("saved")
    gpt2 = tiny_model("gpt2")
    prune_heads(gpt2, {0: [0, 1]})
    save_pruned(gpt2, root / "uneven")
    llama = tiny_model("llama")
    prune_heads(llama, {0: [2, 3], 1: [2, 3]})
    save_pruned(llama, root / "uniform")
    t5 = tiny_model("t5")
    prune_heads(t5, {0: [1], 3: [0, 2]})
    save_pruned(t5, root / "t5")
    return root


def _edit_meta(**changes):
    def edit(path):
        meta = json.loads((path / "headprune.json").read_text())
        for k, v in changes.items():
            if v is KeyError:
                del meta[k]
            else:
                meta[k] = v
        (path / "headprune.json").write_text(json.dumps(meta))

    return edit


def _write_meta(text):
    return lambda path: (path / "headprune.json").write_text(text)


def _write(name, text):
    return lambda path: (path / name).write_text(text)


def _edit_json(name, key=None, **changes):
    """Change fields of the JSON file ``name`` (of its object ``key`` if given)."""

    def edit(path):
        data = json.loads((path / name).read_text())
        (data[key] if key else data).update(changes)
        (path / name).write_text(json.dumps(data))

    return edit


def _edit_original(**changes):
    return _edit_json("headprune.json", "original_config", **changes)


def _edit_tensors(name, drop=(), add=()):
    def edit(path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / name)
        for k in drop:
            del tensors[k]
        for k in add:
            tensors[k] = torch.ones(3)
        save_file(tensors, path / name, metadata={"format": "pt"})

    return edit


def _truncate(name, cut):
    def edit(path):
        size = (path / name).stat().st_size
        os.truncate(path / name, size - cut if cut > 0 else -cut)

    return edit


def _replace_by(name, make):
    def edit(path):
        (path / name).unlink()
        make(path / name)

    return edit


def _index(*shards, text=None):
    """The weights as a shard index naming ``shards`` (not ``model.safetensors``, read first)."""
    weight_map = {f"t{i}": s for i, s in enumerate(shards)}

    def edit(path):
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}) if text is None else text)

    return edit


WEIGHTS = "headprune-model.safetensors"
NO_FLASH = __import__("importlib").util.find_spec("flash_attn") is None


LOAD_ERRORS = [
    ("uneven", lambda p: (p / "headprune.json").unlink(), FileNotFoundError, "has no headprune.json"),
    ("uneven", _write_meta("{not json"), ValueError, "headprune.json is not valid JSON"),
    ("uneven", _write_meta(""), ValueError, "headprune.json is not valid JSON"),
    ("uniform", _write_meta("[1, 2]"), ValueError, "has format 'list', expected 'headprune.pruned/1'"),
    ("uniform", _edit_meta(format="other/2"), ValueError, "has format 'other/2'"),
    ("uniform", _edit_meta(architecture=KeyError), ValueError, r"lacks \['architecture'\]"),
    ("uneven", _edit_meta(architecture="NoSuchModel"), ValueError, "has unknown architecture 'NoSuchModel'"),
    ("uneven", _edit_meta(kept_heads=[[2, 3]]), ValueError, "kv_heads for 2 sites and kept_heads for 1"),
    ("uneven", _edit_meta(kept_heads=[[0, 1, 2], [0, 1, 2, 3]]), ValueError,
     r"holds h.0.attn.c_attn.weight of shape \[32, 48\], the model headprune.json describes .* declares \[32, 72\]"),
    ("uneven", _edit_meta(kept_heads=[[3, 2], [0, 1, 2, 3]]), ValueError, r"kept_heads\[0\] \[3, 2\]; expected increasing"),
    ("uneven", _edit_meta(kept_heads=[[2, 2], [0, 1, 2, 3]]), ValueError, r"kept_heads\[0\] \[2, 2\]; expected increasing"),
    ("uneven", _edit_meta(kept_heads=[[2, 9], [0, 1, 2, 3]]), ValueError, r"expected increasing indices below 4"),
    ("uniform", _edit_meta(kept_heads=[[0, 1, 2], [0, 1]]), ValueError, "lists 3 query / 1 KV heads for site 0, the weights hold 2 / 1"),
    ("uniform", _edit_meta(kv_heads=[[0, 1], [0]]), ValueError, "lists 2 query / 2 KV heads for site 0"),
    # every field of headprune.json, one message each
    ("uneven", _edit_meta(dtype="float99"), ValueError, "has dtype 'float99'; expected one of float32, float16"),
    ("uneven", _edit_meta(dtype=["float32"]), ValueError, r"has dtype \['float32'\]; expected one of"),
    ("uneven", _edit_meta(architecture="AutoModel"), ValueError, "unknown architecture 'AutoModel': not a transformers model"),
    ("uneven", _edit_meta(architecture="os.system"), ValueError, "has architecture 'os.system'; expected the name of"),
    ("uneven", _edit_meta(architecture=5), ValueError, "has architecture 5; expected the name of a transformers"),
    ("uneven", _edit_meta(architecture="WhisperModel"), ValueError, "architecture 'WhisperModel', of model_type 'whisper'; headprune supports bert"),
    ("uneven", _edit_meta(architecture="LlamaModel"), ValueError, "model_type 'gpt2' but architecture 'LlamaModel'"),
    ("uneven", _edit_meta(model_type=["gpt2"]), ValueError, r"has model_type \['gpt2'\]; expected one of bert"),
    ("uneven", _edit_meta(attn_implementation=5), ValueError, "has attn_implementation 5; expected one of eager, sdpa"),
    ("uneven", _edit_meta(per_layer_bias=5), ValueError, "has per_layer_bias 5; expected a list"),
    ("uneven", _edit_meta(per_layer_bias=[5]), ValueError, r"has per_layer_bias\[0\] 5; expected a block name"),
    ("uneven", _edit_meta(per_layer_bias=["decoder.self"]), ValueError,
     r"per_layer_bias \['decoder.self'\]; the model's blocks with a shared position bias are \[\]"),
    ("t5", _edit_meta(per_layer_bias=["encoder.cross"]), ValueError,
     r"per_layer_bias \['encoder.cross'\]; .* are \['decoder.cross', 'decoder.self', 'encoder.self'\]"),
    ("uniform", _edit_meta(kept_heads=[[0, 0], [0, 1]]), ValueError, r"has kept_heads\[0\] \[0, 0\]; expected increasing"),
    ("uniform", _edit_meta(kept_heads=[[-1, 0], [0, 1]]), ValueError, r"has kept_heads\[0\] \[-1, 0\]; expected"),
    ("uniform", _edit_meta(kept_heads=[["0", "1"], [0, 1]]), ValueError, r"has kept_heads\[0\] \['0', '1'\]"),
    ("uniform", _edit_meta(kept_heads=[[True, 2], [0, 1]]), ValueError, r"has kept_heads\[0\] \[True, 2\]"),
    ("uniform", _edit_meta(kept_heads=5), ValueError, "has kept_heads 5; expected a list"),
    ("uniform", _edit_meta(kept_heads=[[0, 9], [0, 1]]), ValueError,
     r"kept_heads of site 0 is \[0, 9\]; expected increasing indices below 4"),
    ("uniform", _edit_meta(kv_heads=[[-1], [0]]), ValueError, r"has kv_heads\[0\] \[-1\]; expected KV head indices"),
    ("uniform", _edit_meta(kv_heads=[[1], [0]]), ValueError,
     r"has kv_heads \[\[1\], \[0\]\]; pruning the original model to its kept_heads gives \[\[0\], \[0\]\]"),
    ("uniform", _edit_meta(kv_heads=[[0]]), ValueError, "has kv_heads for 1 sites and kept_heads for 2"),
    ("uniform", _edit_meta(sites=["a", "b"]), ValueError, r"lists sites \['a', 'b'\], the model has \['0', '1'\]"),
    ("uniform", _edit_meta(sites=["0"]), ValueError, "has 1 sites and kept_heads for 2"),
    ("uniform", _edit_meta(plain_loadable="yes"), ValueError, "has plain_loadable 'yes'; expected true or false"),
    ("uniform", _edit_meta(o_bias=[0]), ValueError, "plain_loadable true with o_bias or per_layer_bias"),
    ("uneven", _edit_meta(o_bias=[5]), ValueError, r"has o_bias \[5\]; expected site indices below 2"),
    ("uneven", _edit_meta(o_bias=[1, 0]), ValueError, r"has o_bias \[1, 0\]; expected a list of increasing"),
    ("uneven", _edit_meta(original_config=5), ValueError, "has original_config 5; expected null or the original"),
    ("uneven", _edit_meta(original_config=None, kv_heads=None), ValueError,
     "plain_loadable false without an original_config"),
    ("uneven", _edit_meta(original_config=None), ValueError, "kv_heads and original_config not both null"),
    ("uneven", _edit_meta(scores={"stats": 5}), ValueError, "has scores .*; expected null or scores written by HeadScores"),
    ("uneven", _edit_meta(settings=[1]), ValueError, r"has settings \[1\]; expected an object"),
    ("uneven", _edit_original(model_type="llama"), ValueError, "original_config has model_type 'llama', expected 'gpt2'"),
    ("uneven", _edit_original(n_embd="wide"), ValueError, "original_config is not a valid GPT2Config .*n_embd"),
    ("uneven", _edit_original(n_head=3), ValueError, "original_config does not build a model .*divisible by num_heads"),
    ("uneven", _write_meta("[" * 100_000 + "]" * 100_000), ValueError, r"is not valid JSON \(nested too deeply\)"),
    # missing or extra tensors, on both paths (transformers would initialise a missing one at random)
    ("uniform", _edit_tensors("model.safetensors", drop=["layers.0.self_attn.q_proj.weight"]), ValueError,
     r"model.safetensors lacks \['layers.0.self_attn.q_proj.weight'\] that .*config.json declares"),
    ("uniform", _edit_tensors("model.safetensors", add=["extra.weight"]), ValueError,
     r"model.safetensors holds \['extra.weight'\] that .*config.json does not declare"),
    ("uneven", _edit_tensors(WEIGHTS, drop=["h.1.attn.c_proj.weight"]), ValueError,
     r"headprune-model.safetensors lacks \['h.1.attn.c_proj.weight'\] that the model headprune.json describes"),
    ("uneven", _edit_tensors(WEIGHTS, add=["extra"]), ValueError, r"headprune-model.safetensors holds \['extra'\]"),
    # declared sizes the weights do not hold are refused before anything is allocated
    ("uneven", _edit_original(vocab_size=4_000_000), ValueError, "original_config declares a model of [0-9,]+ elements"),
    ("uneven", _edit_original(n_layer=2_000), ValueError, "original_config declares n_layer = 2000; the weights hold 28"),
    ("uniform", _edit_json("config.json", vocab_size=4_000_000), ValueError, "config.json declares a model of [0-9,]+"),
    ("uniform", _edit_json("config.json", num_hidden_layers=2_000), ValueError, "declares num_hidden_layers = 2000"),
    ("uniform", _edit_json("config.json", num_hidden_layers="2"), ValueError, "declares num_hidden_layers = '2'"),
    ("uniform", _edit_json("config.json", intermediate_size=96), ValueError,
     r"holds layers.0.mlp.gate_proj.weight of shape \[64, 32\], .*config.json declares \[96, 32\]"),
    ("t5", _edit_original(num_decoder_layers=5_000), ValueError, "original_config declares a model of more than [0-9,]+ mod"),
    ("t5", _edit_original(num_heads=20_000), ValueError, "original_config declares a model of [0-9,]+ elements"),
    # damaged files: one ValueError naming the file
    ("uneven", _truncate(WEIGHTS, 100), ValueError, "headprune-model.safetensors is not a readable safetensors file"),
    ("uniform", _truncate("model.safetensors", 8), ValueError, "model.safetensors is not a readable safetensors file"),
    ("uniform", _write("model.safetensors", ""), ValueError, "model.safetensors is not a readable safetensors file"),
    ("uniform", _write("config.json", "{"), ValueError, "config.json is not valid JSON"),
    ("uniform", _write("config.json", "[1]"), ValueError, "config.json is list, expected a config object"),
    ("uniform", _write("config.json", "[" * 100_000), ValueError, r"config.json is not valid JSON \(nested too deeply"),
    ("uniform", _edit_json("config.json", model_type="bert"), ValueError, "config.json has model_type 'bert', expected"),
    ("uniform", _replace_by("model.safetensors", os.mkdir), ValueError, "model.safetensors is not a regular file"),
    ("uniform", _replace_by("config.json", lambda p: p.symlink_to(p.parent)), ValueError, "config.json is not a regular"),
    ("uneven", _replace_by(WEIGHTS, lambda p: p.symlink_to(p.name)), ValueError, "cannot read .*safetensors \\(Too many"),
    ("uniform", lambda p: (p / "model.safetensors").unlink(), FileNotFoundError, "has no model.safetensors"),
    ("uniform", _index("../model.safetensors"), ValueError, r"names shards outside the directory .*\['../model.safetensors"),
    ("uniform", _index("/etc/passwd"), ValueError, "names shards outside the directory or not .safetensors"),
    ("uniform", _index(text="{}"), ValueError, "has no weight_map of tensor names"),
    # a dtype other than the weights' was applied: the model loaded cast, and computed otherwise
    ("uniform", _edit_meta(dtype="bfloat16"), ValueError,
     r"headprune.json records dtype bfloat16, but .*model.safetensors hold float32"),
]


def _listing(path) -> dict:
    """Every entry of ``path``: a link's target, "dir", or a file's bytes."""
    def entry(p):
        return ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()

    return {p.name: entry(p) for p in path.iterdir()}


@pytest.mark.parametrize("which, corrupt, exc, match", LOAD_ERRORS, ids=[str(i) for i in range(len(LOAD_ERRORS))])
def test_load_refuses(saved, tmp_path, which, corrupt, exc, match):
    path = tmp_path / which
    shutil.copytree(saved / which, path)
    corrupt(path)
    files = _listing(path)
    with pytest.raises(exc, match=match):
        load_pruned(path)
    assert _listing(path) == files
    assert not torch.nn.modules.module._global_module_registration_hooks  # the meta build's budget is gone


def test_pickled_weights_are_never_unpickled(saved, tmp_path):
    """A directory whose safetensors weights are replaced by a pickle that runs code."""
    path = tmp_path / "d"
    shutil.copytree(saved / "uniform", path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"layers.0.self_attn.q_proj.weight": Payload()}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors \(pickled weights such as "
                                                r"pytorch_model.bin are never loaded"):
        load_pruned(path)
    assert not marker.exists()


def test_load_checks_its_arguments(saved, tmp_path):
    with pytest.raises(TypeError, match="path: expected a directory path, got int"):
        load_pruned(3)
    with pytest.raises(FileNotFoundError, match="path: .* is not a directory"):
        load_pruned(saved / "uneven" / "headprune.json")
    for device in ("gpu0", "meta"):  # meta: every weight was read, and the model came back with none
        with pytest.raises(ValueError, match=f"device: expected a torch device that holds weights, .* got '{device}'"):
            load_pruned(saved / "uneven", device=device)


def _read_only(path, monkeypatch):
    """A directory nobody may create entries in (root ignores modes, so refuse it in os)."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real = os.mkdir

        def mkdir(p, *a, **k):
            if os.path.dirname(os.path.abspath(p)) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real(p, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    return path / "out"


def _non_empty(path, monkeypatch):
    path.mkdir()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    return path


def _a_file(path, monkeypatch):
    path.write_text("x")
    return path


def _mount_point(path, monkeypatch):
    """An empty volume (``docker run -v host:/out``): no rename can replace it, which the swap
    found only after every weight was written, beside it on another file system."""
    path.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.abspath(p) == str(path) or real(p))
    return path


SAVE_ERRORS = [
    (_read_only, PermissionError, "path: cannot write in .*ro"),
    (_non_empty, FileExistsError, "is not empty; pass overwrite=True to replace it"),
    (_a_file, FileExistsError, "exists and is not a directory"),
    (_mount_point, OSError, r"path: .*ro is a mount point, which cannot be replaced in one step; write into a "
                            r"folder inside it, such as .*ro/out"),
]


@pytest.mark.parametrize("where, exc, match", SAVE_ERRORS, ids=["read-only", "non-empty", "a-file", "mount-point"])
@pytest.mark.parametrize("family, heads", [("gpt2", {0: [1]}), ("llama", {0: [1], 1: [1]})])
def test_save_refuses(tmp_path, monkeypatch, where, exc, match, family, heads):
    model = tiny_model(family)
    prune_heads(model, heads)
    target = where(tmp_path / "ro", monkeypatch)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    snap = ModelSnapshot(model)
    try:
        with pytest.raises(exc, match=match):
            save_pruned(model, target)
    finally:
        (tmp_path / "ro").chmod(0o755) if (tmp_path / "ro").is_dir() else None
    snap.assert_same()
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


def test_save_overwrite_replaces_a_non_empty_directory(tmp_path):
    model = tiny_model("gpt2")
    prune_heads(model, {0: [1]})
    (tmp_path / "stale.safetensors").write_bytes(b"stale")
    with pytest.raises(TypeError, match="overwrite: expected True or False, got 'no'"):
        save_pruned(model, tmp_path, overwrite="no")  # truthy: it replaced the directory
    assert (tmp_path / "stale.safetensors").read_bytes() == b"stale"
    snap = ModelSnapshot(model)
    save_pruned(model, tmp_path, overwrite=True)
    snap.assert_same()  # save_pretrained's config.architectures / dtype edits do not leak
    assert not (tmp_path / "stale.safetensors").exists()
    assert kept_heads(load_pruned(tmp_path)) == kept_heads(model)
    assert [p.name for p in tmp_path.parent.iterdir() if ".tmp-" in p.name] == []


def test_an_empty_output_folder_keeps_its_mode_and_group(tmp_path):
    """The new directory replaces an empty one made for it (a shared group's folder, setgid):
    it takes that folder's permission bits and group, as writing into it would have kept them."""
    model = tiny_model("gpt2")
    prune_heads(model, {0: [1]})
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o2750)
    before = os.stat(out)
    save_pruned(model, out)
    after = os.stat(out)
    assert (oct(after.st_mode & 0o7777), after.st_gid) == (oct(before.st_mode & 0o7777), before.st_gid)
    assert kept_heads(load_pruned(out)) == kept_heads(model)


def test_save_and_load_check_their_arguments_before_the_work(tmp_path):
    """A string tokenizer failed with an AttributeError after the weights were written, another
    model's statistics were saved beside this model's heads, and a device this torch cannot use
    failed after the whole load."""
    from hf_tiny import tiny_batch

    from headprune.hf import collect, resolve_sites

    model = tiny_model("llama")
    with pytest.raises(TypeError, match="tokenizer: expected a tokenizer or processor with save_pretrained, got str"):
        save_pruned(model, tmp_path / "a", tokenizer="gpt2")
    bert = tiny_model("bert")
    other = collect(bert, [tiny_batch("bert")], progress=False)
    if other.num_sites == len(resolve_sites(model)):
        other.model_type = "bert"
    with pytest.raises(ValueError, match="scores: statistics of a bert with .* attention sites, not of this llama"):
        save_pruned(model, tmp_path / "a", scores=other)
    assert not (tmp_path / "a").exists()
    save_pruned(model, tmp_path / "b", scores=collect(model, [tiny_batch("llama")], progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda' is not usable here"):
            load_pruned(tmp_path / "b", device="cuda")


@pytest.mark.parametrize("which", ["uniform", "uneven"])
def test_an_attention_that_does_not_run_here_loads_as_sdpa(saved, tmp_path, which):
    """A model saved on a GPU with flash-attn, or with a Hub kernel (never fetched), was refused
    on every other machine, with no way to choose another: it loads with sdpa and a warning, and
    ``attn_implementation=`` chooses (checked as before)."""
    names = ["kernels-community/flash-attn", "paged|sdpa", *(["flash_attention_2"] if NO_FLASH else [])]
    want = load_pruned(saved / which)
    for name in names:
        path = tmp_path / name.replace("/", "_").replace("|", "_")
        shutil.copytree(saved / which, path)
        _edit_meta(attn_implementation=name)(path)
        with pytest.warns(UserWarning, match=rf"records attn_implementation '{re.escape(name)}', which does not run "
                                             "here; the model is loaded with sdpa"):
            model = load_pruned(path)
        assert model.config._attn_implementation == "sdpa"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
        assert load_pruned(path, attn_implementation="eager").config._attn_implementation == "eager"
        with pytest.raises(ValueError, match=r"attn_implementation: 'org/kernel'; expected one of eager, sdpa"):
            load_pruned(path, attn_implementation="org/kernel")
