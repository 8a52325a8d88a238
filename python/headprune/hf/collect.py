"""Per-head attention entropies of a Hugging Face model, measured during its ordinary forward.

The hook is an attention function registered in transformers' ``AttentionInterface`` under
``headprune_<impl>``: it calls the implementation the model would have used (``sdpa``, the
family's own ``eager_attention_forward``, ...) with the untouched arguments, so outputs are
bit-identical, and feeds ``query``/``key``/mask/``scaling`` to the streaming entropy op. The
mask factory registered under the same name is the original one, so the mask the model
builds is exactly the one it would have built.

On CPU, a model in ``sdpa`` is by default (``fused=True``) served by the fused op instead:
one streaming pass over the logits yields the attention output and the statistics, so the
statistics cost little more than the attention itself. It mirrors
``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (masks, causality, key
cropping, position bias, grouped-query attention); its outputs equal SDPA's to float
rounding rather than bit for bit.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from typing import Iterable, Optional, Union

import torch

from ..core.modules import check_module, ordinary_tensors
from ..ranking.units import count_arg
from ..stats.scores import HeadScores, refuse_all_padding
from .adapters import get_adapter, head_counts, head_dim, resolve_sites
from .batches import check_batches, forward_kwargs, progress as _progress, sequence_digests, skip
from .checkpoint import BatchesDigest, Checkpoint, canonical, weights_digest
from .collection import METHODS, Collection, padding_of
from .gates import refuse_gated

__all__ = ["collect", "METHODS"]


_END = object()


def _collect_modules(model, batches, method, progress, allow_empty):
    from ..plain import collect_modules, empty_scores

    it = iter(batches)
    first = next(it, _END)
    if first is _END and allow_empty and method == "qk":
        return empty_scores(model, method)
    return collect_modules(model, itertools.chain([] if first is _END else [first], it), method=method,
                           progress=progress, allow_empty=allow_empty)


@ordinary_tensors  # updated in place later, even when called in inference mode
def collect(
    model,
    batches: Iterable,
    *,
    method: str = "qk",
    progress: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    fingerprint: Union[str, Mapping] = "",
    allow_empty: bool = False,
    fused: bool = True,
    moments: Union[bool, str, torch.dtype] = False,
) -> HeadScores:
    """Mean attention entropy per attention site and query head over ``batches``.

    Args:
        model: a ``transformers`` model of a supported family (any head: ``AutoModel``,
            ``...ForCausalLM``), or a plain ``torch.nn`` model with ``nn.MultiheadAttention``.
        batches: iterable of dicts with ``input_ids`` + ``attention_mask`` (and
            ``decoder_input_ids`` / ``decoder_attention_mask`` for T5) or ``pixel_values``.
            Padded query positions (mask 0) are excluded.
        method: ``"qk"`` streams from query/key through the model's own attention
            implementation; ``"eager"`` is the reference: the family's eager attention and
            its probabilities (materialised, slower).
        progress: show a progress bar.
        checkpoint: a JSON file (transformers models only) rewritten atomically after every
            ``checkpoint_every`` batches and at the end, with the state so far.
        resume: continue from ``checkpoint`` if it exists (else start afresh): its first
            ``batches_done`` batches are skipped unread by the model. The result equals an
            uninterrupted run's exactly. Refused (``ValueError``) when the file is corrupt or
            was written for another model layout, method or ``fingerprint``, or when the
            batches it holds are not the first of these (their contents are digested).
        fingerprint: the caller's description of the calibration settings (data, samples,
            sequence length, model name and revision, ...); a dict is canonicalised as JSON.
        allow_empty: return all-zero scores instead of raising when nothing was recorded (no
            attention call, or every query position padding): a data-parallel rank with an
            empty shard.
        fused: with ``method="qk"``, serve a CPU model's ``sdpa`` attention calls with the
            fused op (``headprune.ops.attention_stats_accumulate_``): the attention output
            and the statistics from one pass over the logits, instead of the attention
            followed by a second pass. Its outputs equal SDPA's to float rounding (the
            statistics likewise); ``False`` keeps the model's own attention, bit for bit.
        moments: also gather the second moments of every output projection's input
            (``scores.moments``, :class:`~headprune.stats.moments.OutputMoments`), which the
            least-squares refit (``reconstruct=`` of ``mask_heads``/``prune_heads``) and the
            ``reconstruction`` score need: ``True`` or ``"float64"``, or ``"float32"`` for
            half the memory, ``(heads x head_dim + 1)^2`` values per site.

    Returns ``HeadScores`` (entropies in nats). The model's outputs are those of its forward
    with ``use_cache=False``, which collection runs (up to float rounding where ``fused``
    applies; transformers tells packed sequences, ``position_ids`` restarting without a mask,
    apart only without a cache) and, on any exit (including ``KeyboardInterrupt``), its
    attention implementation is restored.

    Concurrency: only the forwards of the calling thread are recorded. Forwards of the same
    model in other threads while a collection runs are not counted and run the model's own
    attention (their outputs are bit-identical), but they see the model in eval mode, which
    the collection sets for its duration. A second collection on the same model at the same
    time is refused.
    """
    check_module(model)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    check_batches(batches)
    for name, flag in (("fused", fused), ("allow_empty", allow_empty)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    checkpoint_every = count_arg("checkpoint_every", checkpoint_every)
    if resume and checkpoint is None:
        raise ValueError("resume: needs a checkpoint path")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a file path, got {type(checkpoint).__name__}")
    if hasattr(model, "config"):  # a refit or compensation would take them for the ungated model's
        refuse_gated(model, "collect", why=", whose gates would scale the output statistics and moments collected")
    if not hasattr(model, "config"):
        if checkpoint is not None:
            raise ValueError("checkpoint: resumable collection needs a transformers model")
        if moments:  # nothing downstream would say why the refit has no moments
            raise ValueError("moments: output statistics and second moments need a transformers model")
        return _collect_modules(model, batches, method, progress, allow_empty)
    moments = moments_dtype(moments)
    session = Collection(model, method, fused=fused, moments=moments)
    ckpt, done = _open_checkpoint(session, checkpoint, fingerprint, resume, model)
    _run(model, session, batches, progress, ckpt, checkpoint_every, done)
    if not session.recorded and not allow_empty:
        raise ValueError("batches: no attention call was recorded (empty iterable?)")
    return refuse_all_padding(session.scores(), allow_empty, "their attention_mask is all zero")


def _as_dict(fingerprint) -> dict:
    """A caller's fingerprint (a dict, or a string) as a dict: canonical JSON's object where it
    is one (so a refusal names the keys that differ), else ``{"fingerprint": fingerprint}``."""
    try:
        parsed = json.loads(canonical(fingerprint))
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"fingerprint": fingerprint}


def moments_dtype(moments) -> Optional[torch.dtype]:
    """The accumulation dtype ``collect(moments=...)`` asks for (``None``: no moments)."""
    table = {False: None, None: None, True: torch.float64, "float64": torch.float64, torch.float64: torch.float64,
             "float32": torch.float32, torch.float32: torch.float32}
    try:
        return table[moments]
    except (KeyError, TypeError):
        raise ValueError(f"moments: expected True, False, 'float64' or 'float32', got {moments!r}") from None


def moments_like(scores: HeadScores):
    """``collect``'s ``moments=`` that gathers second moments as ``scores`` holds them: their float
    type (``True``, float64, where no site saw a token), ``False`` where it holds none."""
    return False if scores.moments is None else (scores.moments.dtype or True)


def moments_size(model, moments=True) -> tuple:
    """``(bytes, sites)``: the second moments ``collect(model, ..., moments=moments)`` holds,
    ``(heads x head_dim + 1) ** 2`` numbers for each site with heads (``(0, 0)`` without moments,
    or for a model with no output projections to refit)."""
    dtype = moments_dtype(moments)
    if dtype is None or not hasattr(model, "config"):
        return 0, 0
    adapter = get_adapter(model)
    widths = [w for w in (head_counts(s, adapter)[0] * head_dim(s, adapter) for s in resolve_sites(model, adapter)) if w]
    return sum((w + 1) ** 2 for w in widths) * dtype.itemsize, len(widths)


def _open_checkpoint(session, path, fingerprint, resume, model) -> tuple:
    """``(checkpoint or None, batches already done)``; a resumed state goes into ``session``.
    The checkpoint's fingerprint is the caller's and the digest of ``model``'s weights and config."""
    if path is None:
        return None, 0
    fingerprint = _as_dict(fingerprint)
    fingerprint["weights and config"] = weights_digest(model)
    ckpt = Checkpoint(path, canonical(fingerprint), session.scores())
    state = ckpt.load() if resume else ckpt.check_replaceable()
    if state is None:
        return ckpt, 0
    kept = None if state[0].moments is None else next((g.dtype for g in state[0].moments.gram if g is not None), None)
    if state[1] and kept != session.moments_dtype:  # the sums would cover only the batches after the resume
        name = lambda t: "no" if t is None else str(t).replace("torch.", "")  # noqa: E731
        raise ckpt._refuse(f"holds {name(kept)} second moments, and this collection asks for "
                           f"{name(session.moments_dtype)} (moments=)")
    session.initial, done = state
    return ckpt, done


def _run(model, session, batches, progress, ckpt, every, done) -> None:
    """Forward the batches after the first ``done``, saving ``ckpt`` every ``every`` batches
    and at the end; the model is restored on any exit."""
    saved, total = done, (len(batches) if hasattr(batches, "__len__") else None)
    seen = BatchesDigest()  # of the batches so far, which a checkpoint records and a resume compares
    with session.active(), torch.no_grad():
        it = iter(batches)
        if ckpt is not None:
            skip(it, done, ckpt.path, seen.update)
            if done:
                ckpt.check_batches(seen.hexdigest(), done)
        for batch in _progress(it, progress, done, total):
            kw = forward_kwargs(model, batch)
            _check_mask(kw)
            session.padding = padding_of(kw)
            model(**kw)
            if ckpt is not None:
                seen.update(batch)
            if session.moments_dtype is not None:  # which sequences the moments hold (see layer_costs)
                session.sequences += sequence_digests(kw)
            done += 1
            if ckpt is not None and done % every == 0:
                ckpt.save(session.scores(), done, seen.hexdigest())
                saved = done
    if ckpt is not None and saved != done:
        ckpt.save(session.scores(), done, seen.hexdigest())


def _check_mask(kw: dict) -> None:
    """Padding masks of ``[batch, tokens]``: which query rows count is read from them (a 4-D mask,
    a packed batch's blocks, was refused midway as a shape the site does not attend with)."""
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = kw.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ValueError(f"batches: {key!r} has {mask.dim()} dimensions; collection reads the padding mask "
                             "[batch, tokens] (a 4-D mask, as for packed sequences, is not supported)")

