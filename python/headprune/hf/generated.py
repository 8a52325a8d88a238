"""Calibration text sampled from the causal LM itself.

A least-squares refit fits the second moments of the text it is given; on text of another kind
the correlations between heads differ and part of the refit's gain is lost. Sequences the
model samples from its own start token (temperature 1, no truncation of the distribution)
cover what the model does in general rather than one kind of text, so mixing some into the
calibration batches trades a little quality on the calibration text's own kind for more on
others (``benchmarks/bench_generated.py``, docs/quality.md).

Sampling is a plain loop over one-token decode steps with a ``DynamicCache``, drawn from a
seeded ``torch.Generator``: the same model, seed and kernels give the same tokens.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..core.modules import check_module, input_device
from ..ranking.units import as_index, count_arg
from .adapters import get_adapter
from .speed import _cache_arg, position_limit

__all__ = ["generated_batches"]

#: sequences sampled together (one decode step of this many rows at a time)
_SAMPLE_ROWS = 32


def _start_token(model, start: Optional[int]) -> int:
    vocab = getattr(model.config, "vocab_size", None) or getattr(model.get_output_embeddings(), "out_features", None)

    def valid(t) -> bool:
        return isinstance(t, int) and not isinstance(t, bool) and 0 <= t and (not vocab or t < vocab)

    if start is not None:
        if not valid(start):
            raise ValueError(f"start: expected a token id in [0, {vocab}), got {start!r}")
        return start
    named = []
    for source in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if valid(value):
                return value
            if value is not None:
                named.append(f"{name}={value!r}")
    raise ValueError("model: its config names no bos_token_id or eos_token_id inside its vocabulary of "
                     f"{vocab} to start sampling from ({', '.join(named) or 'none set'}); pass start=")


def _seed(value) -> int:
    """A seed ``torch.Generator.manual_seed`` takes (negative ones too, as it does), as an int."""
    try:
        seed = None if isinstance(value, torch.Tensor) and (value.dim() or value.dtype == torch.bool) \
            else as_index(value)
    except TypeError:
        seed = None
    if seed is None or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {value!r}")
    return seed


@torch.no_grad()
def generated_batches(model, *, samples: int, seq_len: int, batch_size: int = 8, seed: int = 0,
                      start: Optional[int] = None, keep_start: bool = False,
                      progress: Union[bool, Callable] = False) -> list:
    """``samples`` sequences of ``seq_len`` tokens sampled from ``model`` (a causal LM), as
    calibration batches ``{"input_ids", "attention_mask"}`` of ``batch_size`` sequences on the
    model's device, ready to join other batches for :func:`headprune.hf.collect`.

    Each sequence starts after ``start`` (default: the config's BOS token, else its EOS) and
    every token is drawn from the model's full next-token distribution at temperature 1; the
    start token itself is not part of the sequence, unless ``keep_start`` (a tokenizer that
    starts every text with BOS: the sequence is the start token and ``seq_len - 1`` sampled
    tokens, as a calibration window of text is). ``progress``: ``True`` for a progress bar
    or a callable ``progress(done, samples)`` called after each group of sequences. The model
    is left as it was (its training flag included).
    """
    check_module(model, meta=True)
    if not isinstance(keep_start, bool):
        raise TypeError(f"keep_start: expected a bool, got {type(keep_start).__name__}")
    seed = _seed(seed)
    samples, seq_len, batch_size = (count_arg(n, v) for n, v in
                                    (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)))
    adapter = get_adapter(model)
    if adapter.kind != "causal":
        raise ValueError(f"model: sampling calibration text needs a causal LM, not {adapter.model_type} "
                         f"({adapter.kind})")
    limit = position_limit(model)
    if limit is not None and seq_len > limit:  # positions 0 .. seq_len - 1 are fed (the start token first)
        raise ValueError(f"seq_len: {seq_len} tokens are more than the {limit} learned positions of this "
                         f"{adapter.model_type} model")
    token = _start_token(model, start)
    device = input_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    from transformers import DynamicCache

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=samples, desc="headprune: sampling calibration text", unit="seq")
    was_training = model.training
    model.eval()
    arg = _cache_arg(model)
    rows = []
    try:
        for first in range(0, samples, _SAMPLE_ROWS):
            n = min(_SAMPLE_ROWS, samples - first)
            ids = torch.full((n, 1), token, dtype=torch.long, device=device)
            cache = DynamicCache(config=model.config)
            out = torch.full((n, seq_len), token, dtype=torch.long)
            for t in range(int(keep_start), seq_len):
                logits = getattr(model(input_ids=ids, **{arg: cache}, use_cache=True), "logits", None)
                if logits is None:
                    raise ValueError(f"model: {type(model).__name__} has no language-model head to sample from "
                                     f"(load it with AutoModelForCausalLM)")
                logits = logits[:, -1].float()
                nxt = torch.multinomial(F.softmax(logits.cpu(), -1), 1, generator=generator)
                out[:, t] = nxt[:, 0]
                ids = nxt.to(device)
            rows.append(out)
            if bar is not None:
                bar.update(n)
            elif callable(progress):
                progress(first + n, samples)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    ids = torch.cat(rows).to(device)
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, samples, batch_size)]
