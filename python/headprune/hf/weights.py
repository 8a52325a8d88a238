"""Saved tensors into a rebuilt model: a safetensors file read as the user's damage, not the
reader's exception; a strict load that allows the names ``save_model`` leaves out of a tied
group, and unties a group whose saved tensors differ; the sampling settings saved beside them."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError

from .files import first_line
from .metadata import METADATA_FILE


def read_weights(file) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"path: {file} is not a readable safetensors file ({first_line(e)})") from None


def load_state(model, state: dict) -> None:
    """Strict load, except for weights tied to a loaded one (``save_model`` keeps one name)."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() if len(group) > 1 and any(g in state for g in group) for n in group}
    _untie_differing(model, [g for g in names.values() if len(g) > 1], state)
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, value in state.items():  # a float type the file holds is kept (T5's ``wo`` stays float32 in a
        p = own.get(name)              # float16 model, as from_pretrained keeps it); load_state_dict would cast
        if p is not None and p.dtype != value.dtype and p.is_floating_point() and value.is_floating_point():
            p.data = p.data.to(value.dtype)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: headprune.json's heads are not the weights' heads
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"path: saved weights do not match the heads in {METADATA_FILE} ({detail})") from None
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"path: saved weights do not match the rebuilt model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def _untie_differing(model, groups: list, state: dict) -> None:
    """Weights the config ties (``tie_word_embeddings``) that the file holds with different
    values (an output layer trained apart) each get their own parameter, and the config says so:
    loaded into one parameter, the last would silently replace the other."""
    for group in groups:
        held = [n for n in group if n in state]
        if len(held) < 2 or all(torch.equal(state[held[0]], state[n]) for n in held[1:]):
            continue
        for name in held[1:]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().clone()))
        for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def load_generation_config(model, path: str) -> None:
    """The sampling settings beside the weights, as ``from_pretrained`` reads them."""
    from transformers import GenerationConfig

    file = os.path.join(path, "generation_config.json")
    if os.path.isfile(file) and getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"path: {file} is not a generation config transformers reads ({first_line(e)})") from None


def own_memory(model, align: int = 64) -> None:
    """Moves float tensors ``from_pretrained`` left in the weights file's memory map at an
    address the file's header length decides into memory of their own: CPU matrix products
    round differently at addresses that are not 16-byte aligned (float64 always, float32 for a
    single row: one token's decoding step), so the loaded model was 1 ulp off the saved one with
    some headers. Only unaligned tensors are copied."""

    def moved(t):
        return t is not None and t.is_floating_point() and t.device.type == "cpu" and t.data_ptr() % align

    with torch.no_grad():
        for p in model.parameters():
            if moved(p):
                p.data = p.data.clone()
        for module in model.modules():
            for name, b in module._buffers.items():
                if moved(b):
                    module._buffers[name] = b.clone()


def check_device(device) -> None:
    """Before the load: a device this torch cannot use failed after it; ``meta`` holds no
    weights (the load read them all for nothing)."""
    try:
        meta = torch.device(device).type == "meta"
    except (RuntimeError, TypeError):
        meta = True
    if meta:
        raise ValueError(f"device: expected a torch device that holds weights, such as cpu or cuda:0, got {device!r}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device: {device!r} is not usable here ({first_line(e)})") from None
