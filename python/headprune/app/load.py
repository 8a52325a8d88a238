"""Resolving the CLI's MODEL argument: bundled names, ``.gguf`` files, local directories."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .locate import locate

#: any of these makes a directory's tokenizer loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    kind: str  # "causal" or "encoder"
    source: str
    pruned: Optional[dict] = None  # headprune.json of a pruned directory
    checkpoint_dtype: Optional[str] = None  # the float type the weights were stored in ("gguf": a GGUF's)
    input_bytes: Optional[int] = None  # the size of the weight files read
    gguf_float: Optional[str] = None  # a GGUF's matrices' float type where none is quantised (F16: "float16")


def _bytes(files) -> int:
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def weight_bytes(directory: Path) -> int:
    """The size of a model directory's weight files (``*.safetensors``)."""
    return _bytes(directory.glob("*.safetensors"))


def a_kind(kind: str) -> str:
    """``"an encoder"``, ``"a causal"``: a model kind with its article, for messages."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


#: families whose inputs are no text: the command line calibrates and evaluates on text alone
IMAGE_TYPES = ("vit",)


def _refuse_kind(kind: str, accept, spec, model_type=None, check=None, config=None) -> None:
    """The CLI handles text causal LMs and encoders; refused before any weight is read, as is what
    a command's ``check(kind, model_type, config)`` refuses from the config (:func:`load_model`)."""
    if accept is not None and model_type in IMAGE_TYPES:
        raise ValueError(f"MODEL: {spec} is an image model ({model_type}); the command line handles text models "
                         "(the Python API prunes image models, on batches of pixel_values)")
    if accept is not None and kind not in accept:
        api = f" (the Python API handles {kind} models too)" if "encoder" in accept else ""  # not a GGUF export
        raise ValueError(f"MODEL: {spec} is {a_kind(kind)} model; this command "
                         f"handles {' and '.join(accept)} models{api}")
    if check is not None:
        check(kind, model_type, config)


def _kind(config) -> str:
    """"causal", "encoder" or "seq2seq", from the family's adapter record (GGUF configs carry
    no ``architectures`` to go by), else from the config."""
    from ..hf.adapters import ADAPTERS

    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None:
        return adapter.kind
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"


def load_model(spec: str, *, device: str = "cpu", dtype: Optional[str] = None, accept=None,
               bundled: bool = False, tokenizer: bool = True, check=None) -> Loaded:
    """Loads MODEL (bundled name, ``.gguf`` file, Hugging Face directory, or a directory
    written by ``headprune prune``) with its tokenizer, from local files only. A directory is
    checked before its weights are read (see :func:`headprune.hf.load_pruned`): a damaged one
    raises ``ValueError`` or ``FileNotFoundError`` naming what is wrong. ``accept``: the model
    kinds wanted (``"causal"``, ``"encoder"``, ``"seq2seq"``), checked from the config before
    the weights are read. A bundled name that is also a path here is refused as ambiguous,
    unless ``bundled`` (the name is known to mean the bundled model, e.g. from a report).
    ``tokenizer=False``: a directory's tokenizer is neither needed nor read (``tokenizer`` None).
    ``check(kind, model_type, config)``: a command's refusals that need the model's config (a dict;
    a pruned directory's original one), run with ``accept``'s, before any weight is read."""
    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype]
    path, gguf, pruned = locate(spec, bundled=bundled)
    if pruned:
        return _load_pruned_dir(path, device, torch_dtype, accept, tokenizer, check)
    if gguf is None:
        return _load_hf_dir(path, device, torch_dtype, accept, tokenizer, check)
    return _load_gguf(path, gguf, spec, device, torch_dtype, accept, check)


def _load_gguf(path: Path, gguf: str, spec: str, device: str, torch_dtype, accept, check=None) -> Loaded:
    """A ``.gguf`` file of a family transformers reads, with the tokenizer it holds; refused
    before its weights are read when it lacks the fields that give the model's shape, and after
    when transformers found a weight missing (it would have filled it with random values)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..hf import ADAPTERS, supported_model_types
    from ..hf.gguf_export import GGUFHeader, gguf_header

    try:
        arch, bias, missing, ffn_bias, unread, floats = gguf_header(path / gguf)
    except Exception:  # noqa: BLE001 - not a GGUF: transformers' reading below says so
        arch, bias, missing, ffn_bias, unread, floats = GGUFHeader()
    if missing:
        raise ValueError(f"MODEL: {str(path / gguf)!r} lacks {', '.join(missing)}, which say the model's shape; "
                         "a GGUF without them cannot be read (transformers would build a default-size model)")
    if unread and arch != "deci":
        raise ValueError(f"MODEL: {str(path / gguf)!r} holds {'; '.join(unread)}")
    if arch == "deci":
        raise ValueError(f"MODEL: {spec!r} is a GGUF of llama.cpp's deci architecture (per-layer head counts, as "
                         "headprune writes a pruned model for llama.cpp), which transformers does not read; load "
                         "the pruned model's directory (the model/ beside it) instead")
    config = _gguf_config(path, gguf)
    if config.model_type not in ADAPTERS:  # before its weights are read (and dequantised)
        raise ValueError(f"MODEL: {str(path / gguf)!r} is a GGUF of {config.model_type!r}, which headprune does not "
                         f"prune; it prunes {', '.join(supported_model_types())}")
    if bias:  # written by headprune with a refit's output biases
        config.attention_bias = True
    if ffn_bias:  # a model with feed-forward biases: transformers' GGUF config does not declare them
        config.mlp_bias = True
    kind = _kind(config)
    _refuse_kind(kind, accept, path / gguf, config.model_type, check, config.to_dict())
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:  # before the model: a file without a tokenizer fails in a second, not after the weights
        tok = _pad(AutoTokenizer.from_pretrained(path, gguf_file=gguf))
    except Exception as e:  # noqa: BLE001 - transformers' GGUF tokenizers fail as KeyError and others too
        raise ValueError(f"MODEL: transformers cannot read a tokenizer from {str(path / gguf)!r} ({e})") from e
    try:  # (mismatched shapes: refused below, naming them, rather than by transformers' RuntimeError)
        model, info = cls.from_pretrained(path, config=config, dtype=torch_dtype or torch.float32,
                                          attn_implementation=_attention(_model_class(config, kind)), gguf_file=gguf,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except NotImplementedError as e:  # a tensor type the gguf package does not dequantise (F64, Q8_1, ...)
        raise ValueError(f"MODEL: {str(path / gguf)!r} holds a tensor type that cannot be read here ({e})") from None
    absent = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if absent:  # transformers fills them with random values and only warns
        raise ValueError(f"MODEL: {str(path / gguf)!r} lacks weights its model needs, or holds them in another "
                         f"shape ({len(absent)}: {', '.join(map(str, absent[:3]))}{', ...' if len(absent) > 3 else ''})")
    _dequantized(model)
    model.config._name_or_path = str(path / gguf)  # the file, not its folder (which may hold a pruned model's record)
    return Loaded(model.to(device).eval(), tok, kind, str(path / gguf), checkpoint_dtype="gguf", gguf_float=floats,
                  input_bytes=_bytes([path / gguf]))


def _gguf_config(path: Path, gguf: str):
    """The config transformers reads from a GGUF (once: each read costs seconds), or a
    ``ValueError`` saying it cannot build one."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' config validation (e.g. hidden size vs head count)
        raise ValueError(f"MODEL: transformers cannot build a model from {str(path / gguf)!r} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[-1][:300]}); for a GGUF headprune wrote, load the pruned "
                         "model's directory (the model/ beside it) instead") from e


def _load_pruned_dir(path: Path, device: str, torch_dtype, accept=None, tokenizer: bool = True,
                     check=None) -> Loaded:
    """A directory written by ``headprune prune`` (see :func:`headprune.hf.load_pruned`)."""
    from ..hf import load_pruned
    from ..hf.metadata import read_metadata
    from ..hf.migrate import is_transformers4_pruned, transformers4_metadata

    meta = (transformers4_metadata(path, "MODEL") if is_transformers4_pruned(path)
            else read_metadata(path, "MODEL"))  # cheap checks first, the weights last
    from ..hf import ADAPTERS

    adapter = ADAPTERS.get(meta.get("model_type"))
    if adapter is not None:
        _refuse_kind(adapter.kind, accept, path, meta["model_type"], check, meta.get("original_config") or {})
    tok = _tokenizer(path) if tokenizer else None
    model = cast_weights(load_pruned(path, device=device), torch_dtype or torch.float32)  # as an HF directory is
    return Loaded(model.eval(), tok, _kind(model.config), str(path), meta, checkpoint_dtype=meta.get("dtype"),
                  input_bytes=weight_bytes(path))


def _load_hf_dir(path: Path, device: str, torch_dtype, accept=None, tokenizer: bool = True, check=None) -> Loaded:
    """A Hugging Face directory of a supported family, safetensors weights only, every tensor
    its config declares present with the declared shape."""
    import transformers

    from ..hf import ADAPTERS, supported_model_types
    from ..hf.files import read_header, read_json, safetensors_files, stored_float_type
    from ..hf.verify import config_from, from_pretrained_checked, optional_modules

    config_file = path / "config.json"
    raw = read_json(config_file, "MODEL")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise ValueError(f"MODEL: unsupported model_type {model_type!r} in {config_file}; "
                         f"headprune supports {', '.join(supported_model_types())}")
    _refuse_kind(ADAPTERS[model_type].kind, accept, path, model_type, check, raw)
    tok = _tokenizer(path) if tokenizer else None
    files = safetensors_files(path, "MODEL")
    header = read_header(files, "MODEL")
    config = config_from(transformers.CONFIG_MAPPING[model_type], raw, len(header), "MODEL", str(config_file))
    kind = _kind(config)
    cls = _model_class(config, kind)
    kw = dict(dtype=torch_dtype or torch.float32, attn_implementation=_attention(cls))
    kw.update(optional_modules(cls, ADAPTERS[model_type], header))
    weights = files[0] if len(files) == 1 else f"the {len(files)} weight shards in {path}"
    model = from_pretrained_checked(cls, str(path), config, header, "MODEL", str(config_file), weights, strict=False,
                                    **kw)
    stored = raw.get("torch_dtype") or raw.get("dtype")
    if not isinstance(stored, str):  # the config names none (sentence-transformers' do not): the weights say
        stored = stored_float_type(files)
    return Loaded(model.to(device).eval(), tok, kind, str(path), checkpoint_dtype=stored if isinstance(stored, str) else None,
                  input_bytes=_bytes(files))


def _model_class(config, kind: str):
    """The transformers class the command line builds for ``config`` (causal LM or base model),
    or ``None`` where the auto mapping has none."""
    import transformers

    mapping = transformers.MODEL_FOR_CAUSAL_LM_MAPPING if kind == "causal" else transformers.MODEL_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def _attention(cls) -> str:
    """``"sdpa"``, or ``"eager"`` for a model class without an SDPA path (Gemma 2:
    ``from_pretrained`` refused the directory)."""
    return "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"


def _dequantized(model) -> None:
    """A model read from a GGUF, without transformers' GGUF quantizer
    (:func:`headprune.hf.gguf_export.drop_gguf_quantizer`)."""
    from ..hf.gguf_export import drop_gguf_quantizer

    drop_gguf_quantizer(model)


def _tokenizer(path: Path):
    """The directory's tokenizer, local files and library code only."""
    from transformers import AutoTokenizer

    from ..hf.files import first_line

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"MODEL: directory {path} has no tokenizer files "
                                f"({', '.join(TOKENIZER_FILES[:2])})")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as e:  # tokenizers and transformers raise many types on a damaged file
        raise ValueError(f"MODEL: cannot read the tokenizer in {path} ({type(e).__name__}: {first_line(e)})") from e
    return _pad(tok)


#: set on a tokenizer that got a stand-in padding token here (for batches)
PAD_ADDED = "_headprune_pad_added"
#: a fast tokenizer's padding and truncation settings as read, which its file is saved with
BACKEND_AS_READ = "_headprune_backend_as_read"


def _pad(tok):
    """``tok`` with a padding token for the command line's batches (their masks hide it): its
    own, else its end-of-text, separator, unknown or classifier token (saved without it)."""
    backend = getattr(tok, "backend_tokenizer", None)  # its padding and truncation as read (calls change them)
    setattr(tok, BACKEND_AS_READ, None if backend is None else (backend.padding, backend.truncation))
    if tok.pad_token is None:
        stand_in = next((t for t in (tok.eos_token, tok.sep_token, tok.unk_token, tok.cls_token) if t is not None), None)
        if stand_in is not None:
            tok.pad_token = stand_in
            setattr(tok, PAD_ADDED, True)
    return tok


@contextmanager
def tokenizer_as_loaded(tok):
    """``tok`` as it was read while the block runs (to be saved): without the padding token the
    command line gave it for its own batches, and with the padding and truncation its fast
    tokenizer file held (each call of the batches rewrote them)."""
    if tok is None:
        yield tok
        return
    added, stand_in = getattr(tok, PAD_ADDED, False), tok.pad_token
    backend, as_read = getattr(tok, "backend_tokenizer", None), getattr(tok, BACKEND_AS_READ, None)
    if added:
        tok.pad_token = None
    if backend is not None and as_read is not None:
        padding, truncation = as_read
        backend.no_padding() if padding is None else backend.enable_padding(**padding)
        backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
    try:
        yield tok
    finally:
        if added:
            tok.pad_token = stand_in


def cast_weights(model, dtype):
    """``model`` computing in ``dtype`` as ``from_pretrained(dtype=...)`` builds it: parameters and
    saved buffers cast, but not the buffers kept out of the weights (rotary frequencies stay
    float32; ``model.to(dtype)`` rounds them) nor the modules the class keeps in float32."""
    from ..core.modules import retype

    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16, torch.bfloat16) \
        else set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())

    def wanted(m, module, n, t):
        saved = n not in module._non_persistent_buffers_set
        return dtype if t.is_floating_point() and saved and not keep & set(m.split(".")) else None

    retype(model, wanted)
    return model


#: the float types a pruned model can be saved in (``--save-dtype``)
SAVE_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_type_name(loaded) -> str:
    """The float type a checkpoint's weights are kept in, as ``prune`` saves them by default:
    its own (an unquantised GGUF's too; bfloat16 for a quantised GGUF, float32 where unknown or
    wider)."""
    stored = loaded.checkpoint_dtype
    if stored == "gguf":  # an unquantised GGUF's own float type (F16 is exact in float16, not in bfloat16)
        return getattr(loaded, "gguf_float", None) or "bfloat16"
    return stored if stored in SAVE_TYPES else "float32"


def type_bits(name) -> Optional[int]:
    """The bits of a float type :data:`SAVE_TYPES` names (``None`` for another name: a GGUF's)."""
    return torch.finfo(SAVE_TYPES[name]).bits if name in SAVE_TYPES else None


def check_saved_type(args, loaded, saved_as: str, *, recovering: bool = False) -> None:
    """Refuse to compute in one 16-bit float type and save in the other: neither holds every
    value of the other (float16 has the precision, bfloat16 the range), so the model evaluated
    would not be the model saved (``prune`` and ``recover``, which saves in DIR's type)."""
    computes = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    narrow, wide = type_bits(computes), type_bits(saved_as)
    if recovering and None not in (narrow, wide) and narrow < wide:
        raise ValueError(f"--dtype: DIR's model is saved in {saved_as}; loaded in {computes}, every weight recovery "
                         f"leaves alone (embeddings, feed-forward layers) would be rounded to {computes} and saved so; "
                         f"leave --dtype out or pass --dtype {saved_as}")
    if {computes, saved_as} != {"float16", "bfloat16"}:
        return
    if recovering:
        raise ValueError(f"--dtype: DIR's model is saved in {saved_as}, and a model computed in {computes} would "
                         f"evaluate other weights than it saves; pass --dtype {saved_as} or float32")
    given = "--save-dtype" if args.save_dtype != "auto" else "the checkpoint's own type (--save-dtype auto)"
    raise ValueError(f"--save-dtype: saving {saved_as} ({given}) a model computed in {computes} (--dtype) would "
                     f"evaluate other weights than it saves; pass --save-dtype {computes}, or --dtype {saved_as} "
                     "or float32")


def round_to_saved(loaded, name: str) -> None:
    """Round the pruned model's floating weights through the type they are saved in, keeping
    the type it computes in, before the evaluation: the report describes the weights that are
    saved, computed as the unpruned model was (so the comparison is of the pruning, not of
    the arithmetic: bfloat16 matrix products on a CPU without bfloat16 instructions take
    several times as long, and a checkpoint saved in a narrow type is loaded in float32 by
    default). Writing then casts exactly (see prune_command._write)."""
    dtype = SAVE_TYPES[name]
    with torch.no_grad():
        for t in loaded.model.state_dict().values():  # what is saved (not, e.g., rotary frequencies)
            if t.is_floating_point() and t.dtype != dtype and torch.finfo(dtype).bits <= torch.finfo(t.dtype).bits:
                t.copy_(t.to(dtype))
