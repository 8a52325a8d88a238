"""The source GGUF of an export (:func:`headprune.hf.gguf_export.export_gguf`'s ``source``):
read, and refused where it is not the GGUF of the model being written."""

from __future__ import annotations

import os
import struct

import torch

#: the largest relative difference ``||model - source|| / ||source||`` accepted in a tensor the
#: export copies from the source GGUF (norms, embeddings, feed-forward), beyond which it is another model's:
#: the source's own quantisation keeps the model it was read from well below it (none at all
#: for the values read from the file, about 1e-1 between float weights and their Q4 blocks),
#: another model's weights are about 1 to 1.4 apart
SOURCE_RTOL = 0.5


def read_source(gguf, source) -> tuple:
    """``(reader, architecture)`` of the source GGUF, or a ``ValueError`` naming ``source``."""
    try:
        reader = gguf.GGUFReader(os.fspath(source))
        return reader, reader.fields["general.architecture"].contents()
    except (KeyError, ValueError, IndexError, struct.error) as e:
        raise ValueError(f"source: {source} is not a readable GGUF ({type(e).__name__}: {e})") from e
    except OSError as e:  # named as the source's, not the output's
        raise OSError(e.errno, f"source: cannot read {source} ({e.strerror or e})") from e


def check_source(gguf, reader, model, family: str, layers: int, source, ours: dict, tied: bool) -> dict:
    """Refuse a source GGUF of another model: its fields and tensors are copied beside the
    model's attention, so its layer count, widths and every tensor it shares with the model
    must match the model's (what pruning changes, the attention, aside), and it must hold every
    tensor of the model's that the export copies (``ours``: ``{GGUF name: tensor}``; ``tied``:
    its output head is its embeddings). Returns ``{name: tensor}`` of those whose values the
    model no longer holds (:func:`_changed`), which the export writes from the model."""
    config = model.config
    for key, want in (("block_count", layers), ("embedding_length", getattr(config, "hidden_size", None)),
                      ("feed_forward_length", getattr(config, "intermediate_size", None))):
        field = reader.fields.get(f"{family}.{key}")
        if field is not None and want is not None and int(field.contents()) != int(want):
            raise ValueError(f"source: {source} is a GGUF of another model: its {family}.{key} is "
                             f"{int(field.contents())}, the model's is {int(want)}")
    theirs = {t.name for t in reader.tensors}
    if missing := sorted(n for n in ours if n not in theirs and not (n == "output.weight" and tied)):
        raise ValueError(f"source: {source} lacks the model's tensor {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + ", which the export "
                         "copies from it (without it the file would be another model); pass the GGUF the model was "
                         "read from, or no source")
    for t in reader.tensors:
        want = ours[t.name].numel() if t.name in ours else None
        if want is not None and int(t.n_elements) != want:
            raise ValueError(f"source: {source} is a GGUF of another model: its tensor {t.name} holds "
                             f"{int(t.n_elements)} values, the model's {want}")
    return {name: ours[name] for name in _changed(gguf, reader, ours, source)}


def _changed(gguf, reader, ours: dict, source) -> list:
    """The names of the copied tensors whose values the model no longer holds (a fine-tune, an
    edit after loading), which the export writes from the model; a source whose tensors are
    another model's (of the same shapes) is refused. Each tensor is compared whole, dequantised,
    with the model's: the same values are those the model read from it (equal in the model's
    dtype, or rounded to bfloat16 or float16 as a saved directory holds them), or the model's
    float values that the source rounded or quantised (to its very blocks); beyond
    :data:`SOURCE_RTOL` of its norm it is another model's."""
    import numpy as np

    changed = []
    for t in reader.tensors:
        value = ours.get(t.name)
        if value is None:  # the attention, which the export writes from the model
            continue
        mine = value.detach().cpu()
        try:
            theirs = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type),
                                               dtype=np.float32)).reshape(mine.shape)
        except (NotImplementedError, ValueError):  # a type the gguf package does not read
            changed.append(t.name)
            continue
        if _same_values(mine, theirs) or _quantises_to(gguf, mine, theirs, t):
            continue
        theirs, ours64 = theirs.double().reshape(-1), mine.double().reshape(-1)
        scale = max(float(theirs.norm()), float(ours64.norm()))
        change = float((ours64 - theirs).norm()) / scale if scale > 0 else 0.0
        if not change <= SOURCE_RTOL:  # a NaN is refused too
            raise ValueError(f"source: {source} is a GGUF of another model: its tensor {t.name} differs from the "
                             f"model's by {change:.2f} of its norm (the source's quantisation stays below "
                             f"{SOURCE_RTOL}); pass the GGUF the model was read from")
        changed.append(t.name)
    return changed


def _same_values(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """The source's values as the model holds them: read from the file (in the model's dtype),
    or saved since in a narrower float type (``prune`` saves a model read from a quantised GGUF
    in bfloat16) and read back wider."""
    return any(torch.equal(theirs.to(dt).to(mine.dtype), mine) for dt in (mine.dtype, torch.bfloat16, torch.float16))


def _quantises_to(gguf, mine: torch.Tensor, theirs: torch.Tensor, t) -> bool:
    """The model's values quantise (or round) to the source tensor's own blocks (values ``theirs``)."""
    T = gguf.GGMLQuantizationType
    floats = {T.F16: torch.float16, T.BF16: torch.bfloat16}
    if t.tensor_type in floats:  # the model's values rounded to the source's float type
        return torch.equal(mine.to(floats[t.tensor_type]), theirs.to(floats[t.tensor_type]))
    if t.tensor_type == T.F32 or mine.dim() == 1:
        return False
    try:
        return bytes(gguf.quants.quantize(mine.float().numpy(), t.tensor_type)) == bytes(t.data)
    except (NotImplementedError, gguf.quants.QuantError, ValueError):
        return False
