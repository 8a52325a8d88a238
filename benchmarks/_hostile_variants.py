"""The hostile variants of benchmarks/hostile_dirs.py: edits of a saved directory, as data.

Each variant is ``(name, base, edit)``: ``edit(directory)`` damages a copy of the base
directory (None: the base itself). Payloads that run code create a marker file under
``markers`` so the benchmark can tell that they ran.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

WEIGHTS = "headprune-model.safetensors"


# ---- edits ---------------------------------------------------------------------------------------


def edit_json(name, key=None, **changes):
    """Set (or, given ``KeyError``, delete) fields of the JSON file ``name`` (of its object ``key``)."""
    def edit(d):
        data = json.loads((d / name).read_text())
        target = data[key] if key else data
        for k, v in changes.items():
            target.pop(k) if v is KeyError else target.__setitem__(k, v)
        (d / name).write_text(json.dumps(data))

    return edit


def meta(**changes):
    return edit_json("headprune.json", **changes)


def original(**changes):
    return edit_json("headprune.json", "original_config", **changes)


def config(**changes):
    return edit_json("config.json", **changes)


def write(name, data):
    def edit(d):
        if os.path.lexists(d / name):
            (d / name).unlink()
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return edit


def remove(*names):
    return lambda d: [(d / n).unlink() for n in names]


def truncate(name, keep):
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    return lambda d: os.truncate(d / name, keep if keep >= 0 else (d / name).stat().st_size + keep)


def replace(name, make):
    """``name`` replaced by what ``make(path)`` creates (a directory, a FIFO, a symlink)."""
    def edit(d):
        (d / name).unlink()
        make(d / name)

    return edit


def header(name, change):
    """The JSON header of the safetensors file ``name`` changed by ``change(header)``, the data
    left as is."""
    def edit(d):
        raw = (d / name).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        head = json.loads(raw[8:8 + n])
        change(head)
        new = json.dumps(head).encode()
        (d / name).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])

    return edit


def first_tensor(**fields):
    """A header change setting ``fields`` of the first tensor's entry."""
    return lambda head: head[min(k for k in head if k != "__metadata__")].update(fields)


def tensors(name, drop=(), add=()):
    def edit(d):
        from safetensors.torch import load_file, save_file

        sd = load_file(d / name)
        for k in drop:
            del sd[k]
        for k in add:
            sd[k] = torch.ones(4)
        save_file(sd, d / name, metadata={"format": "pt"})

    return edit


def pickle_payload(name, marker):
    """A pickle that creates ``marker`` when unpickled."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return lambda d: torch.save({"weight": Payload()}, d / name)


def remote_code(json_name, auto_map, module, marker):
    """``auto_map`` pointing at a module in the directory that creates ``marker`` on import."""
    def edit(d):
        edit_json(json_name, auto_map=auto_map)(d)
        (d / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    return edit


def both(*edits):
    return lambda d: [e(d) for e in edits]


def shard(d: Path) -> None:
    """model.safetensors split into two shards with an index, as save_pretrained shards big models."""
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    names = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: sd[k] for k in keys}, d / file, metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in parts.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def move_out(name):
    """``name`` moved out of the directory and linked back (as the Hugging Face cache links blobs)."""
    def edit(d):
        outside = d.parent.parent / "outside" / d.name
        outside.mkdir(parents=True)
        (d / name).rename(outside / name)
        (d / name).symlink_to(outside / name)

    return edit


# ---- the variants --------------------------------------------------------------------------------


def variants(bases, markers: Path) -> list:
    """Every variant of the ``bases`` (their names: gpt2, llama, bert, t5, hf-bert)."""
    out = [(b, b, None) for b in bases]
    for base, weights in [("gpt2", WEIGHTS), ("llama", "model.safetensors")]:
        groups = [_weights_variants(base, weights, markers), _file_variants(base, markers), _meta_variants(),
                  _original_variants(base)]
        out += [(f"{base}/{name}", base, edit) for group in groups for name, edit in group]
    out += [(f"llama/config-{name}", "llama", edit) for name, edit in _config_variants()]
    out += [(f"{base}/{name}", base, edit) for base, name, edit in _other_variants()]
    out += [(f"hf-bert/{name}", "hf-bert", edit) for name, edit in _hf_variants(markers)]
    return out


def _weights_variants(base: str, weights: str, markers: Path) -> list:
    attention = {"gpt2": "transformer.h.1.attn.c_attn.weight", "llama": "model.layers.0.self_attn.q_proj.weight"}
    return [
        ("no-weights", remove(weights)),
        ("weights-empty", write(weights, b"")),
        ("weights-truncated-header", truncate(weights, 20)),
        ("weights-truncated-data", truncate(weights, -100)),
        ("weights-garbage", write(weights, os.urandom(4096))),
        ("weights-header-length-2^63", lambda d: (d / weights).write_bytes(
            b"\xff" * 7 + b"\x7f" + (d / weights).read_bytes()[8:])),
        ("weights-header-not-json", write(weights, struct.pack("<Q", 9) + b"not json!" + b"\0" * 64)),
        ("weights-header-huge-shape", header(weights, first_tensor(shape=[40_000_000, 32]))),
        ("weights-header-bad-dtype", header(weights, first_tensor(dtype="F99"))),
        ("weights-header-offsets-past-end", header(weights, first_tensor(data_offsets=[0, 1 << 40]))),
        ("weights-header-overlapping", header(weights, first_tensor(data_offsets=[0, 4]))),
        ("weights-missing-tensor", tensors(weights, drop=[attention[base]])),
        ("weights-extra-tensor", tensors(weights, add=["extra.weight"])),
        ("weights-pickle", pickle_payload(weights, markers / f"{base}-weights-pickle")),
        ("weights-is-dir", replace(weights, os.mkdir)),
        ("weights-fifo", replace(weights, os.mkfifo)),
        ("weights-symlink-dev-zero", replace(weights, lambda p: p.symlink_to("/dev/zero"))),
        ("weights-symlink-loop", replace(weights, lambda p: p.symlink_to(p.name))),
        ("weights-symlink-dangling", replace(weights, lambda p: p.symlink_to("/nonexistent"))),
        ("pickle-beside-weights", pickle_payload("pytorch_model.bin", markers / f"{base}-beside")),
        ("pickle-instead-of-weights", both(remove(weights), pickle_payload(
            "pytorch_model.bin", markers / f"{base}-instead"))),
    ]


def _file_variants(base: str, markers: Path) -> list:
    cfg_code = {"AutoConfig": "evil_cfg.EvilConfig", "AutoModel": "evil_cfg.EvilModel"}
    return [
        ("no-headprune.json", remove("headprune.json")),
        ("no-tokenizer", remove("tokenizer.json", "tokenizer_config.json")),
        ("headprune.json-fifo", replace("headprune.json", os.mkfifo)),
        ("headprune.json-dev-zero", replace("headprune.json", lambda p: p.symlink_to("/dev/zero"))),
        ("headprune.json-empty", write("headprune.json", "")),
        ("headprune.json-truncated", truncate("headprune.json", 200)),
        ("headprune.json-nested", write("headprune.json", "[" * 200_000 + "]" * 200_000)),
        ("headprune.json-65MB", write("headprune.json", " " * (65 << 20) + "{}")),
        ("headprune.json-binary", write("headprune.json", os.urandom(512))),
        ("headprune.json-extra-field", meta(comment="harmless")),
        ("headprune.json-symlink-outside", move_out("headprune.json")),
        ("config.json-symlink-etc-passwd", replace("config.json", lambda p: p.symlink_to("/etc/passwd"))),
        ("tokenizer.json-corrupt", write("tokenizer.json", "{")),
        ("tokenizer_config-auto_map", remote_code("tokenizer_config.json", {"AutoTokenizer": [
            "evil_tok.EvilTokenizer", None]}, "evil_tok", markers / f"{base}-tok-code")),
        ("config-auto_map", remote_code("config.json", cfg_code, "evil_cfg", markers / f"{base}-cfg-code")),
        ("adapter_config.json", write("adapter_config.json", json.dumps(
            {"base_model_name_or_path": "someone/model", "peft_type": "LORA"}))),
        ("generation_config-corrupt", write("generation_config.json", "{")),
    ]


#: wrong values of every headprune.json field
WRONG_META = {
    "format": ["headprune.pruned/2", 1, None], "model_type": ["whisper", 5, ["gpt2"]],
    "architecture": ["AutoModel", "WhisperModel", "os.system", "__class__", 5, None, "LlamaForCausalLM"],
    "dtype": ["float99", "int64", 5, None],
    "attn_implementation": [5, None, "kernels-community/flash-attn", "org/name", "flash_attention_2", "paged|sdpa",
                            "../eager"],
    "sites": [5, ["x"], [None, None]],
    "kept_heads": [5, None, [[0, 0], [1]], [[-1], [0]], [["0"], [0]], [[0, 99], [0, 1]], [[0], [0], [0]]],
    "kv_heads": [5, [[-1], [0]], [[7], [0]], [[0]]], "per_layer_bias": [5, [5], ["decoder.self"]],
    "o_bias": [5, [7], [1, 0], ["0"]], "plain_loadable": ["yes", None, 1], "original_config": [5, None, [], {}],
    "scores": [5, {"stats": 5}, []], "settings": [5, []],
}


def _meta_variants() -> list:
    out = [(f"meta-{k}={json.dumps(v)[:24].replace(chr(34), '')}", meta(**{k: v}))
           for k, values in WRONG_META.items() for v in values]
    return out + [(f"meta-no-{k}", meta(**{k: KeyError})) for k in ("architecture", "kept_heads", "original_config")]


def _original_variants(base: str) -> list:
    layers, heads = {"gpt2": ("n_layer", "n_head"), "llama": ("num_hidden_layers", "num_attention_heads")}[base]
    return [("original-vocab-40M", original(vocab_size=40_000_000)),
            ("original-layers-200000", original(**{layers: 200_000})),
            ("original-layers-negative", original(**{layers: -1})),
            ("original-heads-huge", original(**{heads: 1 << 20})),
            ("original-model_type-other", original(model_type="bert")),
            ("original-not-an-object", meta(original_config=[1, 2]))]


def _config_variants() -> list:
    return [
        ("vocab-40M", config(vocab_size=40_000_000)), ("layers-200000", config(num_hidden_layers=200_000)),
        ("layers-string", config(num_hidden_layers="2")), ("hidden-huge", config(hidden_size=1 << 20)),
        ("intermediate-huge", config(intermediate_size=1 << 28)), ("heads-0", config(num_attention_heads=0)),
        ("positions-huge", config(max_position_embeddings=1 << 40)), ("model_type-bert", config(model_type="bert")),
        ("tie-word-embeddings", config(tie_word_embeddings=True)), ("sharded", shard),
        ("not-json", write("config.json", "{")), ("nested", write("config.json", "[" * 200_000)),
        ("missing", remove("config.json")), ("fifo", replace("config.json", os.mkfifo)),
        ("shard-index-escape", write("model.safetensors.index.json", json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "../../../etc/passwd"}}))),
    ]


def _other_variants() -> list:
    return [
        ("t5", "original-decoder-layers-200000", original(num_decoder_layers=200_000)),
        ("t5", "original-heads-1M", original(num_heads=1_000_000)),
        ("t5", "original-buckets-huge", original(relative_attention_num_buckets=1 << 30)),
        ("bert", "no-pooler-weights", tensors("model.safetensors", drop=["pooler.dense.weight", "pooler.dense.bias"])),
        ("bert", "vocab-40M", config(vocab_size=40_000_000)),
        ("bert", "positions-huge", config(max_position_embeddings=1 << 40)),
    ]


def _hf_variants(markers: Path) -> list:
    cfg_code = {"AutoConfig": "evil_cfg.EvilConfig", "AutoModel": "evil_cfg.EvilModel"}
    return [
        ("no-weights", remove("model.safetensors")),
        ("pickle-instead-of-weights", both(remove("model.safetensors"), pickle_payload(
            "pytorch_model.bin", markers / "hf-instead"))),
        ("model_type-unknown", config(model_type="evilformer")),
        ("model_type-unknown-auto_map", both(config(model_type="evilformer"), remote_code(
            "config.json", cfg_code, "evil_cfg", markers / "hf-cfg-code"))),
        ("config-auto_map", remote_code("config.json", cfg_code, "evil_cfg", markers / "hf-cfg-code2")),
        ("missing-tensor", tensors("model.safetensors", drop=["encoder.layer.0.attention.self.query.weight"])),
        ("vocab-40M", config(vocab_size=40_000_000)),
        ("layers-200000", config(num_hidden_layers=200_000)),
        ("no-tokenizer", remove("tokenizer.json", "tokenizer_config.json")),
        ("weights-garbage", write("model.safetensors", os.urandom(4096))),
        ("dir-symlink", "symlink"),  # the directory itself reached through a symlink: loads
    ]
