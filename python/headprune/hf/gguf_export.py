"""Pruned Llama-family models as GGUF files for llama.cpp.

llama.cpp's ``llama`` architecture reads one query and one KV head count for every layer, so a
uniform layout (``select_heads(..., uniform=True)``, ``--uniform``) is written as ``llama``. A
model whose layers keep different head counts (the default layouts) is written as llama.cpp's
``deci`` architecture (the one Llama-3.1-Nemotron models use): the same tensors, norms, rotary
embedding and feed-forward as ``llama``, with ``deci.attention.head_count`` and
``head_count_kv`` as per-layer arrays, each layer's attention sized from its own counts.
transformers' GGUF loader does not read ``deci``; llama.cpp does. The output-projection bias
of the least-squares refit is kept: both architectures have optional attention biases. It is
written as ``attn_output.bias``, in a ``llama`` file with zero ``attn_q/k/v.bias`` beside it,
in a ``deci`` file alone (see :func:`_attention_tensors`). transformers' GGUF loader builds a
``llama`` file's model without attention biases and drops them without a word unless
``from_pretrained(..., gguf_file=..., attention_bias=True)`` asks for them; headprune's loader
does that where the file holds them (:func:`gguf_attention_bias`).

With the GGUF the model was read from (``source``), every field and every tensor other than
the attention projections is copied byte for byte (the tokenizer, the quantised MLPs and
embeddings; a ``deci`` file's fields renamed from ``llama.*``) where the model still holds its
values (a tensor it no longer does, changed after loading, is written from the model, with a
warning; values the model read from the file, or those rounded to bfloat16 or float16 as a
saved directory holds them, are its own); the attention projections are written from the
pruned model, in the source tensor's quantisation where the ``gguf`` package can write it,
else in float16. Kept q/k/v rows of a Q4_1 or Q8_0 tensor re-quantise to exactly their
original blocks when the model holds the values read from the file (``headprune prune``
writes its GGUF so, from the float32 model); from a directory saved in bfloat16, as ``prune``
saves a model read from a quantised GGUF, ``headprune export`` re-quantises values rounded to
bfloat16, whose blocks can differ from the original ones by about that rounding. The refit
output projection carries the quantisation's error either way.
Without a source, every tensor is written from the model in float32 or float16, with the
architecture's fields and no tokenizer.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import NamedTuple, Optional, Sequence

import torch

from .. import atomic
from ..core.modules import compiled_over, uncompiled
from .adapters import get_adapter, head_counts, head_dim, resolve_sites
from .gates import refuse_gated
from .gguf_source import check_source, read_source

__all__ = ["export_gguf", "export_architecture", "gguf_architecture", "gguf_attention_bias", "gguf_header", "drop_gguf_quantizer", "unpermute"]

#: families written as llama.cpp's ``llama`` architecture (``deci`` for uneven layouts)
ARCHITECTURES = {"llama": "llama"}
#: ``export_gguf``'s ``architecture``: ``auto`` writes ``llama`` where every layer keeps the
#: same head counts and ``deci`` where they differ
GGUF_ARCHITECTURES = ("auto", "llama", "deci")
FLOAT_TYPES = ("float32", "float16")
def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's rotary embedding expects for q and k (convert_hf_to_gguf's
    ``LlamaModel.permute``): each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_permute`: a GGUF q or k tensor back in transformers' row order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layout(adapter, sites, architecture: str) -> tuple:
    """``(arch, [(query, KV) heads per layer])`` for ``architecture`` (one of GGUF_ARCHITECTURES)."""
    counts = [head_counts(s, adapter) for s in sites]
    if any(hq == 0 for hq, _ in counts):
        raise ValueError("model: a layer without heads cannot be written as GGUF")
    uneven = len(set(counts)) > 1
    if architecture == "llama" and uneven:
        raise ValueError(f"architecture: llama.cpp's llama architecture reads one head count for every layer, and "
                         f"this model's layers keep {sorted(set(counts))} (query, KV) heads; prune it with "
                         "uniform=True (--uniform), or write architecture='deci' (--architecture deci: per-layer head "
                         "counts)")
    return ("deci" if uneven or architecture == "deci" else "llama"), counts


def export_architecture(model, architecture: str = "auto") -> str:
    """The llama.cpp architecture :func:`export_gguf` writes ``model`` as (``llama`` or ``deci``);
    ``ValueError`` for a family it does not write."""
    adapter = get_adapter(model)
    _family(adapter)
    return _layout(adapter, resolve_sites(model, adapter), architecture)[0]


def _check_model(model) -> tuple:
    """``(model, adapter, family)`` of the model a GGUF describes: a ``torch.compile`` wrapper's
    own (a wrapper inside it is refused: its weights' ``_orig_mod.`` names map to no GGUF
    tensor), of a family it writes, with an LM head."""
    model = uncompiled(model)
    if nested := [n for n, in_place in compiled_over(model, model.modules()) if n and not in_place]:
        raise ValueError(f"model: {nested[0]} is a torch.compile wrapper inside the model; export the model whose "
                         "layers are not wrapped (compile in place with module.compile(), or export before compiling)")
    refuse_gated(model, "export_gguf", why=", whose gates the written weights do not hold")
    adapter = get_adapter(model)
    family = _family(adapter)  # a family it writes first
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get) or get() is None:
        raise ValueError(f"model: expected a causal LM with its LM head (e.g. LlamaForCausalLM), got "
                         f"{type(model).__name__}; a GGUF without the head would be read with the embeddings as one")
    return model, adapter, family


def _family(adapter) -> str:
    family = ARCHITECTURES.get(adapter.model_type)
    if family is None:
        raise ValueError(f"model: GGUF export writes {', '.join(ARCHITECTURES)} models, got {adapter.model_type}")
    return family


def _metadata(config, d: int) -> dict:
    """The architecture's fields for a model without a source GGUF (``<arch>.*``; the head
    counts are written apart). RoPE scaling has no such field here, so it is refused."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"model: its RoPE is scaled (rope_type {kind!r}), which a GGUF written without a source "
                         "would drop; pass source= the GGUF the model was read from, whose fields and tensors "
                         "say how")
    return {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
            "attention.key_length": d, "attention.value_length": d, "rope.dimension_count": d,
            "vocab_size": config.vocab_size,
            "rope.freq_base": float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
            "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps)}


def export_gguf(model, path, *, source=None, dtype: str = "auto", architecture: str = "auto",
                overwrite: bool = False) -> dict:
    """Write ``model`` (a Llama-family causal LM, pruned or not) to the GGUF file ``path``;
    returns ``{tensor name: GGML type name}`` of what was written.

    ``architecture``: ``"auto"`` writes llama.cpp's ``llama`` where every layer keeps the same
    head counts and ``deci`` (per-layer head counts) where they differ; ``"llama"`` refuses an
    uneven model, ``"deci"`` writes per-layer counts even for an even one.

    ``source``: the GGUF the model was loaded from (fields, tokenizer and the tensors pruning
    did not touch are copied from it). ``dtype``: ``"auto"`` (the source tensor's type where
    the gguf package writes it, else float16; float32 without a source), ``"float32"`` or
    ``"float16"`` for the tensors written from the model. The file is written beside ``path``
    and moved into place only when complete; an existing ``path`` is refused unless
    ``overwrite``.
    """
    try:
        import gguf
    except ImportError as e:
        raise ImportError("export_gguf needs the gguf package: pip install gguf") from e
    atomic.check_replace(overwrite, "overwrite")
    if dtype not in ("auto", *FLOAT_TYPES):
        raise ValueError(f"dtype: expected one of auto, {', '.join(FLOAT_TYPES)}, got {dtype!r}")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"architecture: expected one of {', '.join(GGUF_ARCHITECTURES)}, got {architecture!r}")
    model, adapter, family = _check_model(model)
    sites = resolve_sites(model, adapter)
    arch, counts = _layout(adapter, sites, architecture)
    d = head_dim(sites[0], adapter)
    reader, found = (None, family) if source is None else read_source(gguf, source)
    edited = {}
    if reader is not None:
        if found != family:
            raise ValueError(f"source: {source} is a {found!r} GGUF, the model is {family!r}")
        copied = _untouched(gguf, model, "llama", len(sites))
        edited = check_source(gguf, reader, model, family, len(sites), source, copied, _tied(model))
        if edited:  # what was evaluated is what is written
            names = ", ".join(list(edited)[:3]) + (", ..." if len(edited) > 3 else "")
            warnings.warn(f"model: {len(edited)} of the tensors the export copies from source= hold other values in "
                          f"the model ({names}); they are written from the model, in the source's type where the gguf "
                          "package writes it, else float16", stacklevel=2)
    path = os.fspath(path)
    if os.path.islink(path):  # as save_pruned and --out: a link is refused, not followed or replaced
        raise FileExistsError(f"path: {path} is a symbolic link (to {os.readlink(path)}); give the file itself")
    if os.path.isdir(path):  # before the whole file is written beside it
        raise IsADirectoryError(f"path: {path} is a directory; expected the GGUF file's path")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"path: {path} exists; pass overwrite=True to replace it")
    tmp = atomic.temp_sibling(path)
    try:
        written = _write(gguf, model, adapter, sites, arch, counts, d, reader, dtype, tmp, edited)
        atomic.commit_file(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return written


def _write(gguf, model, adapter, sites, arch, counts, d, reader, dtype, tmp, edited) -> dict:
    T = gguf.GGMLQuantizationType
    family = ARCHITECTURES[adapter.model_type]  # the source's architecture, whose fields are renamed
    writer = gguf.GGUFWriter(tmp, arch)
    heads = counts[0] if arch == "llama" else tuple(map(list, zip(*counts)))  # one count, or one per layer
    changed = {f"{arch}.attention.head_count": heads[0], f"{arch}.attention.head_count_kv": heads[1],
               f"{arch}.attention.key_length": d, f"{arch}.attention.value_length": d}
    if reader is None:
        writer.add_name(type(model).__name__)
        for key, value in _metadata(model.config, d).items():
            if f"{arch}.{key}" not in changed:
                (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    else:
        for name, field in reader.fields.items():
            if name.startswith(f"{family}."):  # the architecture's fields, under its name
                name = f"{arch}.{name[len(family) + 1:]}"
            if name.startswith("GGUF.") or name == "general.architecture" or name in changed:
                continue
            if name == "general.alignment":  # the writer pads the tensor data to it too
                writer.add_custom_alignment(int(field.contents()))
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for key, value in changed.items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_array)(key, value)
    ours = _attention_tensors(model, adapter, sites, counts, zero_qkv_bias=arch == "llama")
    source = {t.name: t for t in reader.tensors} if reader is not None else {}
    written = {}

    def put(name, value: torch.Tensor, like):
        kind = _type(T, gguf, like, value, dtype)
        data = value.detach().to(torch.float32).cpu().numpy()
        if kind in (T.F32, T.F16):
            writer.add_tensor(name, data.astype("float32" if kind == T.F32 else "float16"))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        written[name] = kind.name

    if reader is None:
        for name, value in _untouched(gguf, model, arch, len(sites)).items():
            if not (name == "output.weight" and _tied(model)):
                put(name, value, None)
    for t in (reader.tensors if reader is not None else []):
        if _attention_name(t.name):
            continue
        if t.name in edited:  # values the model no longer holds as the source has them
            put(t.name, edited[t.name], t)
            continue
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        written[t.name] = t.tensor_type.name
    for name, value in ours.items():
        put(name, value, source.get(name) or source.get(name.replace(".bias", ".weight")))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _untouched(gguf, model, arch: str, layers: int) -> dict:
    """``{GGUF name: tensor}`` of the model's tensors that ``arch`` names, the attention
    projections aside (:func:`_attention_tensors` writes those)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI if arch == "deci" else gguf.MODEL_ARCH.LLAMA, layers)
    out = {}
    for hf_name, value in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is not None and not _attention_name(name):
            out[name] = value
    return out


def _attention_name(name: str) -> bool:
    """A layer's q/k/v/o weight or bias, which :func:`_attention_tensors` writes from the model."""
    return re.fullmatch(r"blk\.\d+\.attn_(q|k|v|output)\.(weight|bias)", name) is not None


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def _type(T, gguf, like, value: torch.Tensor, dtype: str):
    """The GGML type a tensor written from the model gets (biases and norms: float32)."""
    if value.dim() == 1:
        return T.F32
    if dtype != "auto":
        return T.F32 if dtype == "float32" else T.F16
    if like is None:
        return T.F32
    kind = like.tensor_type
    if kind in (T.F32, T.F16):
        return kind
    block = gguf.GGML_QUANT_SIZES[kind][0]
    try:
        if value.shape[-1] % block == 0:
            gguf.quants.quantize(value[:1].detach().float().cpu().numpy(), kind)
            return kind
    except (NotImplementedError, gguf.quants.QuantError):
        pass
    return T.F16


def _attention_tensors(model, adapter, sites, counts: list, zero_qkv_bias: bool = True) -> dict:
    """``{GGUF name: tensor}``: each layer's q/k/v/o weights in llama.cpp's layout (``counts``:
    its query and KV heads), and its biases where the o projection has one: the o bias of a
    refit, with the q/k/v biases beside it, zero where the model has none if ``zero_qkv_bias``
    (transformers' GGUF loader has one ``attention_bias`` for all four; llama.cpp reads each
    bias alone, and some of its versions size a ``deci`` q bias as the full width, so ``deci``
    files carry no zero biases)."""
    out = {}
    # transformers' one attention_bias: in a llama file every layer has the four or none (zero
    # where a layer has no o bias), as a per-layer gap would be a missing weight to its loader
    every = zero_qkv_bias and any(getattr(s.sub(s.block.o), "bias", None) is not None for s in sites)
    for s, (hq, hkv) in zip(sites, counts):
        b, i = s.block, s.index
        q, k, v, o = (s.sub(p) for p in (b.q, b.k, b.v, b.o))
        out[f"blk.{i}.attn_q.weight"] = _permute(q.weight.detach(), hq)
        out[f"blk.{i}.attn_k.weight"] = _permute(k.weight.detach(), hkv)
        out[f"blk.{i}.attn_v.weight"] = v.weight.detach()
        out[f"blk.{i}.attn_output.weight"] = o.weight.detach()
        if getattr(o, "bias", None) is not None or every:
            for name, lin, heads in (("attn_q", q, hq), ("attn_k", k, hkv), ("attn_v", v, None)):
                has = getattr(lin, "bias", None) is not None
                if not zero_qkv_bias and (not has or not bool(lin.bias.detach().any())):
                    continue  # deci: no zero biases, even where the model holds them (read from a llama GGUF)
                bias = lin.bias.detach() if has else lin.weight.new_zeros(lin.weight.shape[0])
                out[f"blk.{i}.{name}.bias"] = _permute(bias, heads) if heads else bias
            out[f"blk.{i}.attn_output.bias"] = o.bias.detach() if o.bias is not None else o.weight.new_zeros(
                o.weight.shape[0])
    return out


# what a GGUF must declare for its model's shape: without them transformers builds its
# config's default sizes (a 7B Llama's for ``llama``) and only then finds no weights
_SHAPE_FIELDS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")


class GGUFHeader(NamedTuple):
    """What :func:`gguf_header` reads (the defaults: a file it could not read as a GGUF)."""

    arch: Optional[str] = None
    bias: bool = False
    missing: Sequence[str] = ()
    ffn_bias: bool = False
    unread: Sequence[str] = ()
    floats: Optional[str] = None


def gguf_header(path) -> GGUFHeader:
    """``(architecture, attention bias, missing, feed-forward bias, unread, float type)`` of the GGUF file ``path``,
    from one read of it (a read costs seconds on a 100 MB file): what it declares as
    ``general.architecture`` (``llama``, ``deci``, ...), whether it holds attention biases
    (``attn_output.bias``), with which a ``llama`` file loads through transformers with
    ``config.attention_bias = True``, the names of the shape fields and the token embedding it
    lacks (empty for a complete file), and whether it holds feed-forward biases (``ffn_*.bias``:
    ``config.mlp_bias = True``; without it transformers drops them without a word), and what
    transformers would read otherwise than the file says (``unread``: scaled RoPE, which its GGUF
    loader drops; a block count other than the blocks the file holds, which builds another
    model, or one so large that building it takes hours), and the float type of its matrices
    where none is quantised (``"float16"`` for F16; ``None`` for a quantised file)."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    missing = [f"{arch}.{f}" for f in _SHAPE_FIELDS if f"{arch}.{f}" not in reader.fields]
    missing += [] if "token_embd.weight" in names else ["tensor token_embd.weight"]
    ffn = any(n.endswith(("ffn_up.bias", "ffn_down.bias", "ffn_gate.bias")) for n in names)
    unread, scaling = [], reader.fields.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in names or (scaling is not None and scaling.contents() not in ("none", "")):
        unread.append("scaled RoPE (" + ("a rope_freqs tensor" if "rope_freqs.weight" in names else
                                         f"{arch}.rope.scaling.type {scaling.contents()}") + "), which transformers' "
                      "GGUF loader drops: the model it builds would not be the file's; prune the model's Hugging Face "
                      "directory")
    blocks, declared = {int(n.split(".")[1]) for n in names if re.match(r"blk\.\d+\.", n)}, reader.fields.get(
        f"{arch}.block_count")
    if declared is not None and blocks != set(range(int(declared.contents()))):
        unread.append(f"{arch}.block_count {int(declared.contents())} against the {len(blocks)} blocks its tensors "
                      "hold (a damaged file)")
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1 and t.n_elements > 1}
    floats = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(next(iter(kinds)) if len(kinds) == 1 else "")
    return GGUFHeader(arch, any(n.endswith("attn_output.bias") for n in names), missing, ffn, unread, floats)


def gguf_attention_bias(path) -> bool:
    """Whether the GGUF file ``path`` holds attention biases (see :func:`gguf_header`)."""
    return gguf_header(path).bias


def gguf_architecture(path) -> str:
    """The architecture a GGUF file declares (see :func:`gguf_header`)."""
    return gguf_header(path).arch


def drop_gguf_quantizer(model) -> dict:
    """transformers reads a GGUF into plain float weights but keeps a GGUF quantizer on the model
    and in its config, which makes ``save_pretrained`` refuse the model and would make a saved
    config ask for a GGUF file: both dropped (the weights are what they were). Returns the model
    attributes dropped besides ``hf_quantizer``."""
    model.hf_quantizer = None
    held = {a: model.__dict__.pop(a) for a in ("is_quantized", "quantization_method") if a in model.__dict__}
    model.config.__dict__.pop("quantization_config", None)
    return held
