"""What a model directory declares, checked against the weights it holds before anything is
allocated.

A config can declare any size (a 40-million-token vocabulary, 200,000 layers); a safetensors
header says what the files really hold, and the safetensors reader has checked that the files
hold that much data. The declared model is built on the meta device (no memory), its tensors
are compared with the header by name and shape, and only when they agree is it built for real,
so a directory can make headprune allocate no more than its own weights.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch.nn.modules.module import register_module_module_registration_hook

from .files import first_line

__all__ = ["config_from", "meta_model", "check_size", "expected_tensors", "compare", "refuse_differences",
           "optional_modules", "from_pretrained_checked"]

#: modules a model may build per tensor of its weights (the supported families build under 2)
MODULES_PER_TENSOR = 4
#: a pruned model's original (rebuilt before slicing) may be this many times larger than its
#: weights: attention is well under half of a layer, so even pruning every head stays far below
ORIGINAL_FACTOR = 8
#: elements any model may hold beyond that (buffers such as position ids of tiny models)
SIZE_SLACK = 1 << 22


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from(config_cls, raw, n_tensors: int, what: str, source: str):
    """``config_cls`` built from the dict ``raw`` (``source`` says where it was read), once the
    fields its own constructor loops over are bounded by the ``n_tensors`` of the weights."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: {source} is {type(raw).__name__}, expected a config object")
    model_type = raw.get("model_type", config_cls.model_type)
    if model_type != config_cls.model_type:
        raise ValueError(f"{what}: {source} has model_type {_short(model_type)}, expected {config_cls.model_type!r}")
    # configs build per-layer lists in their constructor (layer_types); every layer holds a tensor
    field = getattr(config_cls, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    layers = raw.get(field)
    if layers is not None and not (type(layers) is int and 0 <= layers <= n_tensors):
        raise ValueError(f"{what}: {source} declares {field} = {_short(layers)}; the weights hold {n_tensors} tensors")
    try:
        return config_cls.from_dict(raw)
    except Exception as e:  # the config classes validate with many exception types
        raise ValueError(f"{what}: {source} is not a valid {config_cls.__name__} ({first_line(e)})") from None


class _TooManyModules(Exception):
    pass


@contextmanager
def _module_budget(limit: int):
    """Raise once more than ``limit`` submodules are registered (a config declaring 200,000
    layers takes minutes to build even on the meta device)."""
    count = 0

    def hook(module, name, submodule):
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyModules

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def meta_model(build, n_tensors: int, what: str, source: str):
    """``build()`` run on the meta device, refused if it builds more modules than weights of
    ``n_tensors`` tensors could fill, or fails."""
    limit = MODULES_PER_TENSOR * n_tensors + 64
    try:
        with _module_budget(limit), torch.device("meta"):
            return build()
    except _TooManyModules:
        raise ValueError(f"{what}: {source} declares a model of more than {limit:,} modules; "
                         f"the weights hold {n_tensors:,} tensors") from None
    except Exception as e:  # transformers' constructors fail in many ways on a bad config
        raise ValueError(f"{what}: {source} does not build a model ({type(e).__name__}: {first_line(e)})") from None


def numel(model) -> int:
    """Elements of the distinct parameters and buffers (non-persistent ones included)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() for t in tensors.values())


def check_size(model, header: dict, what: str, source: str, factor: int = 1) -> None:
    """Refuse a (meta) model larger than ``factor`` times the weights in ``header``."""
    n, held = numel(model), sum(_prod(s) for s in header.values())
    if n > factor * held + SIZE_SLACK:
        raise ValueError(f"{what}: {source} declares a model of {n:,} elements; the weights hold {held:,}")


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def expected_tensors(model, *, saved_names: bool) -> tuple:
    """``({name: shape}, [groups of tied names])`` a weights file of ``model`` holds: its state
    dict, under the names ``save_pretrained`` writes if ``saved_names`` (transformers renames
    some families' tensors on saving). One name of each tied group is enough."""
    state = model.state_dict(keep_vars=True)
    if saved_names:
        try:
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(model, state)
        except Exception:  # an older transformers saves under the module names
            pass
    groups: dict = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    return {k: tuple(t.shape) for k, t in state.items()}, [g for g in groups.values() if len(g) > 1]


def compare(expected: dict, tied: list, header: dict, prefix: str = "") -> tuple:
    """``(missing, unexpected, mismatched)``: names the weights lack, names they hold that the
    model has not, and ``(name, saved shape, model shape)`` where shapes differ. ``prefix``: the
    base-model prefix a checkpoint of another class of the family adds or lacks."""

    def model_name(k):
        if k in expected or not prefix:
            return k
        if k.startswith(prefix + ".") and k[len(prefix) + 1:] in expected:
            return k[len(prefix) + 1:]
        return f"{prefix}.{k}" if f"{prefix}.{k}" in expected else k

    found = {model_name(k): shape for k, shape in header.items()}
    unexpected = [k for k in header if model_name(k) not in expected]
    mismatched = [(k, found[k], s) for k, s in expected.items() if k in found and found[k] != s]
    covered = {n for group in tied if any(g in found for g in group) for n in group}
    missing = [k for k in expected if k not in found and k not in covered]
    return missing, unexpected, mismatched


def refuse_differences(differences: tuple, what: str, file: str, source: str, *, strict: bool = True) -> None:
    """A ``ValueError`` for the first kind of difference found by :func:`compare` (unexpected
    names only if ``strict``)."""
    missing, unexpected, mismatched = differences
    if mismatched:
        first = mismatched[0]
        detail = (f"{first[0]} of shape {list(first[1])}, {source} declares {list(first[2])}"
                  if isinstance(first, tuple) and len(first) == 3 else f"{first} of another shape than {source} declares")
        raise ValueError(f"{what}: {file} holds {detail}"
                         + (f" ({len(mismatched)} tensors differ)" if len(mismatched) > 1 else ""))
    if missing:
        raise ValueError(f"{what}: {file} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} that {source} "
                         f"declares ({len(missing)} tensors; they would be initialised at random)")
    if unexpected and strict:
        raise ValueError(f"{what}: {file} holds {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} that "
                         f"{source} does not declare ({len(unexpected)} tensors)")


def optional_modules(cls, adapter, header: dict) -> dict:
    """Constructor arguments building exactly the optional parts (``adapter.optional``) the
    weights in ``header`` hold, for a class whose constructor takes them."""
    params = inspect.signature(cls.__init__).parameters
    prefix = getattr(cls, "base_model_prefix", "") + "."
    names = {k[len(prefix):] if k.startswith(prefix) else k for k in header}
    return {arg: any(n == path or n.startswith(path + ".") for n in names)
            for path, arg in adapter.optional if arg in params}


def from_pretrained_checked(cls, path, config, header: dict, what: str, source: str, weights: str, *, strict: bool,
                            **kw):
    """``cls.from_pretrained(path)`` with the ``config`` already read, once the model it
    declares matches the weights on the meta device; safetensors and local files only.

    ``strict`` (a directory written by headprune): the weights hold exactly the model's
    tensors. Otherwise names are matched across classes of the family (prefix, transformers'
    renames) and tensors the model has not are ignored, but a tensor it has and the weights
    lack is refused: transformers would initialise it at random and say so only in a log.
    ``source`` and ``weights`` name the config and the weight files in messages.
    """
    model = meta_model(lambda: cls._from_config(config, **kw), len(header), what, source)
    check_size(model, header, what, source)
    # the names this transformers saves under, or the module names (what earlier versions wrote)
    candidates = [expected_tensors(model, saved_names=s) for s in (True, False)]
    prefix = "" if strict else cls.base_model_prefix
    differences = [(compare(expected, tied, header, prefix), expected) for expected, tied in candidates]
    (missing, unexpected, mismatched), expected = min(differences, key=lambda d: sum(map(len, d[0])))
    lost = sum(_prod(expected[k]) for k in missing) > sum(_prod(header[k]) for k in unexpected)
    refuse_differences((missing if strict or lost else [], unexpected, mismatched), what, weights, source,
                       strict=strict)
    try:
        model, info = cls.from_pretrained(path, config=config, use_safetensors=True, local_files_only=True,
                                          trust_remote_code=False, output_loading_info=True, **kw)
    except MemoryError:
        raise
    except Exception as e:  # a damaged file reaches transformers' many readers
        raise ValueError(f"{what}: cannot load {path} ({type(e).__name__}: {first_line(e)})") from e
    info = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    refuse_differences((info["missing_keys"], info["unexpected_keys"] if strict else [], info["mismatched_keys"]),
                       what, weights, source, strict=strict)
    return model
