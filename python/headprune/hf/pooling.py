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
from typing import Optional

import torch

__all__ = ["pool", "pooling_of", "sentence_files"]

#: sentence-transformers' pooling modes, in the order its ``Pooling`` module concatenates them
MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
#: the files of the pipeline beside the weights (its modules' folders besides)
PIPELINE_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
_POOLING = "sentence_transformers.models.Pooling"


def _modules(path) -> Optional[list]:
    """The pipeline's modules in a directory whose first module is the model itself (``path``
    ""), else ``None`` (no pipeline, or one whose weights live elsewhere)."""
    file = os.path.join(path, "modules.json") if isinstance(path, (str, os.PathLike)) else None
    if file is None or not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            modules = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(modules, list) and modules and all(isinstance(m, dict) for m in modules)
    return modules if ok and modules[0].get("path", "") in ("", ".") else None


def pooling_of(model) -> tuple:
    """The pooling modes of ``model``'s sentence-transformers pipeline (:data:`MODES` names,
    in order; several are concatenated), read from the directory it was loaded from;
    ``("mean_tokens",)`` where there is none."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    modules = _modules(path) or []
    for m in modules:
        if m.get("type") == _POOLING:
            try:
                with open(os.path.join(path, m.get("path", ""), "config.json"), encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError, TypeError):
                break
            modes = tuple(mode for mode in MODES if config.get(f"pooling_mode_{mode}"))
            return modes or ("mean_tokens",)
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
    files and its modules' folders, not the weights) into ``path``, where its model is saved:
    without it, sentence-transformers serves the pruned model with other pooling and no
    normalisation. Nothing where ``model`` came from no such directory."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    modules = _modules(source)
    if modules is None or os.path.realpath(source) == os.path.realpath(path):
        return
    for name in PIPELINE_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    for m in modules[1:]:
        sub = m.get("path")
        if isinstance(sub, str) and sub and os.path.isdir(os.path.join(source, sub)) \
                and os.path.realpath(os.path.join(source, sub)).startswith(os.path.realpath(source) + os.sep):
            shutil.copytree(os.path.join(source, sub), os.path.join(path, sub), dirs_exist_ok=True)
