"""How an encoder's sentence embedding is pooled from its last hidden states, as the
sentence-transformers pipeline beside its weights says (``modules.json`` and its ``Pooling``
module's ``config.json``), and keeping that pipeline when a pruned model is saved.

Fidelity, the encoders' distillation loss (recovery, learned gates) and the measured
allocation compare pooled embeddings: a model served with its first token's state (BGE, say)
compared by the mean of its tokens' was measured on an embedding it never serves. Without a
pipeline beside the weights (a model built in Python, a plain transformers directory) the
pooling is the mean over the valid tokens, sentence-transformers' default.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Optional

import torch

__all__ = ["pool", "pooling_of", "sentence_files"]

#: sentence-transformers' pooling modes, in the order its ``Pooling`` module concatenates them
MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
#: the files of the pipeline beside the weights (its modules' folders besides)
PIPELINE_FILES = ("modules.json", "config_sentence_transformers.json",
                  *(f"sentence_{kind}_config.json" for kind in ("bert", "roberta", "distilbert", "camembert", "albert",
                                                                 "xlm-roberta", "xlnet")))
_POOLING = "sentence_transformers.models.Pooling"
#: the modules whose output the comparisons here equal up to a scale (a cosine ignores the normalisation)
_COMPARED = (_POOLING, "sentence_transformers.models.Normalize")


def _modules(path) -> Optional[list]:
    """The pipeline's modules listed in a directory's ``modules.json``, else ``None``."""
    file = os.path.join(path, "modules.json") if isinstance(path, (str, os.PathLike)) else None
    if file is None or not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            modules = json.load(f)
    except (OSError, ValueError):
        return None
    return modules if isinstance(modules, list) and modules and all(isinstance(m, dict) for m in modules) else None


def _pipeline(model) -> tuple:
    """``(root, modules, at_root)``: the directory holding the pipeline of the folder ``model``
    was loaded from (a cached hub repository's snapshot for an id), its modules, and whether the
    model's weights are its first module at the root (else in a subfolder: ``0_Transformer``,
    an older layout); ``(None, None, False)`` without one."""
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", None)
    if isinstance(path, str) and path and not os.path.isdir(path) and path.count("/") == 1:  # a hub id: its cache
        path = _cached_snapshot(path)
    if not isinstance(path, str) or not os.path.isdir(path):
        return None, None, False
    modules = _modules(path)
    if modules is not None and modules[0].get("path", "") in ("", "."):
        return path, modules, True
    parent = os.path.dirname(os.path.abspath(path))
    modules = _modules(parent)
    if modules is not None and os.path.normpath(modules[0].get("path", "")) == os.path.basename(os.path.abspath(path)):
        return parent, modules, False
    return None, None, False


def _cached_snapshot(repo: str) -> Optional[str]:
    """The one snapshot of ``repo`` in the local hub cache (the config does not say which
    revision a model was read from: with several cached, none is guessed, and that is said)."""
    try:
        from huggingface_hub import constants

        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"), "snapshots")
        snapshots = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    except (ImportError, OSError):
        return None
    if len(snapshots) > 1:
        warnings.warn(f"pooling: {len(snapshots)} revisions of {repo} are in the hub cache and the model does not say "
                      "which it was read from; its sentence-transformers pipeline is not read (the mean pools its "
                      "embeddings): load the model from its snapshot's folder to use it", stacklevel=3)
    return os.path.join(folder, snapshots[0]) if len(snapshots) == 1 else None


#: ``pooling_mode`` strings, as sentence-transformers' ``Pooling`` takes them, by mode
_NAMED = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
          "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}


def pooling_of(model) -> tuple:
    """The pooling modes of ``model``'s sentence-transformers pipeline (:data:`MODES` names,
    in order; several are concatenated), read from the directory it was loaded from as
    sentence-transformers reads them (``Pooling(**config)``: a ``pooling_mode`` name, else the
    flags, the mean on unless set off); ``("mean_tokens",)`` where there is none."""
    root, modules, _ = _pipeline(model)
    after = [str(m.get("type")).rsplit(".", 1)[-1] for m in (modules or [])[1:] if m.get("type") not in _COMPARED]
    if after:  # Dense (LaBSE, sentence-T5) and the like: their weights are not the model's
        warnings.warn(f"pooling: {root}'s pipeline applies {', '.join(after)} after pooling, which headprune does "
                      "not: fidelity and distillation compare the pooled embeddings before it", stacklevel=2)
    for m in modules or ():
        if m.get("type") != _POOLING:
            continue
        try:
            with open(os.path.join(root, m.get("path", ""), "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError, TypeError):
            break  # its folder unread: sentence-transformers' default
        named = config.get("pooling_mode") if isinstance(config, dict) else None
        if named is not None:
            names = [named] if isinstance(named, str) else named if isinstance(named, list) else []
            chosen = {_NAMED.get(str(n).lower()) for n in names}
            if None in chosen or not chosen:
                warnings.warn(f"pooling: {root}'s pipeline names pooling_mode {named!r}, which headprune does not "
                              "compute; embeddings are pooled by the mean", stacklevel=2)
                return ("mean_tokens",)
            return tuple(mode for mode in MODES if mode in chosen)
        flags = {mode: bool(config.get(f"pooling_mode_{mode}", mode == "mean_tokens")) for mode in MODES}
        return tuple(mode for mode in MODES if flags[mode]) or ("mean_tokens",)
    return ("mean_tokens",)


def pool(h: torch.Tensor, mask: Optional[torch.Tensor], modes: tuple = ("mean_tokens",)) -> torch.Tensor:
    """``[B, S, hidden]`` -> ``[B, hidden x len(modes)]`` float32, as sentence-transformers'
    ``Pooling`` computes each mode over the valid positions (``mask``; ``None``: all)."""
    h = h.float()
    m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device).float()
    n = m.sum(1, keepdim=True).clamp_min(1)
    out = []
    for mode in modes:
        if mode == "cls_token":
            out.append(h[:, 0])
        elif mode == "max_tokens":
            out.append(h.masked_fill(m.unsqueeze(-1) == 0, -1e9).max(1).values)
        elif mode in ("mean_tokens", "mean_sqrt_len_tokens"):
            out.append((h * m.unsqueeze(-1)).sum(1) / (n if mode == "mean_tokens" else n.sqrt()))
        elif mode == "weightedmean_tokens":  # position i (from 1) weighs i
            w = m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
            out.append((h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1))
        elif mode == "lasttoken":  # the last valid position, padded on either side
            last = (m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)).argmax(1)
            out.append(h[torch.arange(h.shape[0], device=h.device), last])
        else:
            raise ValueError(f"pooling: expected modes among {MODES}, got {mode!r}")
    return torch.cat(out, -1)


def sentence_files(model, path) -> None:
    """Copy the sentence-transformers pipeline of the directory ``model`` was loaded from (its
    files and its modules' folders inside it, not the weights) into ``path``, where its model
    is saved: without it, sentence-transformers serves the pruned model with other pooling and
    no normalisation. Nothing where ``model`` came from no such directory, or from one that
    keeps its weights in a subfolder (whose layout the save does not write)."""
    root, modules, at_root = _pipeline(model)
    if not at_root or os.path.realpath(root) == os.path.realpath(path):
        return
    for name in PIPELINE_FILES:
        if os.path.isfile(os.path.join(root, name)):
            shutil.copyfile(os.path.join(root, name), os.path.join(path, name))
    inside, target = os.path.realpath(root) + os.sep, os.path.realpath(path) + os.sep
    for m in modules[1:]:
        sub = m.get("path")
        folder = os.path.realpath(os.path.join(root, sub)) + os.sep if isinstance(sub, str) and sub else None
        if folder and folder.startswith(inside) and os.path.isdir(folder):  # inside the pipeline's folder only
            # a cache's links as their files; not the folder the save writes into, where it lies in this one
            shutil.copytree(folder, os.path.join(path, sub), dirs_exist_ok=True, ignore=lambda at, names: [
                n for n in names if target.startswith(os.path.realpath(os.path.join(at, n)) + os.sep)])
