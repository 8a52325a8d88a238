"""Per-head attention entropies of a Hugging Face model, measured during its ordinary forward.

The hook is an attention function registered in transformers' ``AttentionInterface`` under
``headprune_<impl>``: it calls the implementation the model would have used (``sdpa``, the
family's own ``eager_attention_forward``, ...) with the untouched arguments, so outputs are
bit-identical, and feeds ``query``/``key``/mask/``scaling`` to the streaming entropy op. The
mask factory registered under the same name is the original one, so the mask the model
builds is exactly the one it would have built.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.integrations.sdpa_attention import create_position_bias_mask
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..scores import HeadScores, NUM_STATS, accumulate_probs_, accumulate_qk_
from .adapters import get_adapter, head_counts, head_dim, resolve_sites

__all__ = ["collect", "METHODS"]

PREFIX = "headprune_"
METHODS = ("qk", "eager")

# id(attention module) -> recorder; the registered function is shared by every model, so
# it only records for modules inside an active collection.
_RECORDERS: dict = {}

# Softcapped logits cannot be expressed as q.k plus a mask; they are formed per chunk of
# queries of at most this many elements.
_SOFTCAP_CHUNK = 1 << 24


def _inner_function(impl: str, module):
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str):
    def headprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        out = _inner_function(impl, module)(module, query, key, value, attention_mask, *args, **kwargs)
        recorder = _RECORDERS.get(id(module))
        if recorder is not None:
            recorder(module, query, key, attention_mask, args, kwargs, out)
        return out

    return headprune_attention


def registered_name(impl: str) -> str:
    """Register (once) the recording wrapper of ``impl`` and its mask factory."""
    name = PREFIX + impl
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(impl))
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
    if mask_fn is not None and name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, mask_fn)
    return name


def _configs(model) -> list:
    """Every distinct config object the model's modules read (T5's stacks hold copies)."""
    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        c = todo.pop()
        if isinstance(c, PreTrainedConfig) and id(c) not in found:
            found[id(c)] = c
            todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}))
    return list(found.values())


@contextmanager
def attention_implementation(model, impl: Optional[str] = None):
    """Switch every config of ``model`` to the recording wrapper of its implementation (or
    of ``impl``); restores the originals on any exit."""
    configs = _configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for c, orig in saved:
            target = impl or orig or "eager"
            if target.startswith(PREFIX):
                raise RuntimeError("model: a headprune collection is already active on this model")
            c._attn_implementation_internal = registered_name(target)
        yield
    finally:
        for c, orig in saved:
            c._attn_implementation_internal = orig


def _fix_half_mask(mask):
    """Half-precision additive masks use ``finfo.min`` (-65504 in fp16), which the op would
    read as a finite logit: turn masked entries into ``-inf``."""
    if mask is not None and mask.dtype in (torch.float16, torch.bfloat16):
        mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))
    return mask


def _effective_mask(impl, module, query, key, mask, kwargs):
    """``(key, attn_mask, is_causal)`` exactly as ``impl`` applies them."""
    q_len, k_len = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
        raise NotImplementedError(
            f"attention implementation {impl!r} hands a {getattr(mask, 'dim', lambda: '?')()}-D or non-tensor mask; "
            "collect with the model in 'sdpa' or 'eager'"
        )
    if impl == "eager":  # eager adds its (always explicit) mask and bias, nothing implicit
        if bias is not None:
            mask = bias if mask is None else (torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask)
        return key, _fix_half_mask(mask), False
    # mirrors transformers.integrations.sdpa_attention.sdpa_attention_forward
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(q_len > 1 and mask is None and is_causal)
    if is_causal and k_len > q_len:  # SDPA aligns is_causal top-left; transformers crops keys
        key = key[:, :, :q_len]
        bias = None if bias is None else bias[..., :q_len]
    if bias is not None:
        mask = create_position_bias_mask(bias, mask, is_causal, query, key)
        is_causal = False
    return key, _fix_half_mask(mask), is_causal


def _softcapped_stats(stats, query, key, scale, mask, softcap, query_mask):
    """Gemma-2 style ``tanh`` soft-capping, formed per chunk of queries and handed to the op
    as an additive mask over zero-dimensional q/k (exact; memory bounded by the chunk)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    b, h, q_len, _ = query.shape
    step = max(1, _SOFTCAP_CHUNK // max(1, b * h * k.shape[2]))
    for s in range(0, q_len, step):
        qc = query[:, :, s : s + step]
        z = torch.matmul(qc, k.transpose(-1, -2)) * scale
        z = torch.tanh(z / softcap) * softcap
        if mask is not None:
            mc = mask[..., s : s + step, :] if mask.shape[-2] > 1 else mask
            z = z.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else z + mc
        zq = query.new_zeros(b, h, qc.shape[2], 1)
        zk = query.new_zeros(b, h, k.shape[2], 1)
        qm = None if query_mask is None else query_mask[:, s : s + step]
        accumulate_qk_(stats, zq, zk, 1.0, _fix_half_mask(z), False, qm)


class _Collection:
    """Accumulators of one collection; ``record`` is called from inside the attention call."""

    def __init__(self, model, method: str):
        self.model = model
        self.method = method
        self.adapter = get_adapter(model)
        self.sites = resolve_sites(model, self.adapter)
        self.counts = [head_counts(s, self.adapter) for s in self.sites]
        self.stats = [None] * len(self.sites)
        self.padding: dict = {}
        self.impl = {id(c): c._attn_implementation_internal for c in _configs(model)}

    def _query_mask(self, site, query):
        key = site.block.padding_key
        mask = self.padding.get(key) if key else None
        if mask is None:
            return None
        q_len = query.shape[2]
        if mask.shape[0] != query.shape[0] or mask.shape[1] < q_len:
            raise ValueError(
                f"batches: {key!r} has shape {tuple(mask.shape)} but site {site.name} attends with "
                f"{query.shape[0]} sequences of {q_len} queries"
            )
        return mask[:, mask.shape[1] - q_len :].to(device=query.device, dtype=torch.bool)

    def recorder(self, site):
        def record(module, query, key, mask, args, kwargs, out):
            if self.stats[site.index] is None:
                self.stats[site.index] = torch.zeros(query.shape[1], NUM_STATS, dtype=torch.float64, device=query.device)
            stats = self.stats[site.index]
            qm = self._query_mask(site, query)
            if self.method == "eager":
                if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                    raise RuntimeError(f"site {site.name}: the eager attention returned no probabilities")
                accumulate_probs_(stats, out[1].detach(), qm)
                return
            if "scaling" not in kwargs and args:
                raise NotImplementedError(f"site {site.name}: attention called with positional options {args!r}")
            impl = self.impl[id(module.config)]
            scale = kwargs.get("scaling")
            scale = query.shape[-1] ** -0.5 if scale is None else scale
            key, eff_mask, causal = _effective_mask(impl, module, query, key, mask, kwargs)
            if kwargs.get("softcap") is not None:
                _softcapped_stats(stats, query, key, scale, eff_mask, kwargs["softcap"], qm)
            else:
                accumulate_qk_(stats, query.detach(), key.detach(), scale, eff_mask, causal, qm)

        return record

    @contextmanager
    def active(self):
        ids = [id(s.module) for s in self.sites]
        if any(i in _RECORDERS for i in ids):
            raise RuntimeError("model: a headprune collection is already active on this model")
        try:
            _RECORDERS.update({id(s.module): self.recorder(s) for s in self.sites})
            with attention_implementation(self.model, "eager" if self.method == "eager" else None):
                yield self
        finally:
            for i in ids:
                _RECORDERS.pop(i, None)

    def scores(self) -> HeadScores:
        hq = [c[0] for c in self.counts]
        out = HeadScores.empty(
            hq, [c[1] for c in self.counts], [head_dim(s, self.adapter) for s in self.sites],
            [s.name for s in self.sites], [s.block.kind for s in self.sites],
            model_type=self.adapter.model_type, method=self.method,
        )
        for i, st in enumerate(self.stats):
            if st is not None:
                out.stats[i, : st.shape[0]] = st.cpu()
        return out


def _forward_kwargs(model, batch) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches: expected dicts of tensors (e.g. a tokenizer's output), got {type(batch).__name__}")
    if not any(k in batch for k in ("input_ids", "pixel_values", "inputs_embeds")):
        raise ValueError(f"batches: a batch needs input_ids, inputs_embeds or pixel_values; got keys {sorted(batch)}")
    device = next(model.parameters()).device
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and "use_cache" not in kw:
        kw["use_cache"] = False  # a KV cache would only cost memory here
    return kw


def _progress(batches, enabled):
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches
    return tqdm(batches, desc="headprune: collecting", unit="batch")


def collect(model, batches: Iterable, *, method: str = "qk", progress: bool = True) -> HeadScores:
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

    Returns ``HeadScores`` (entropies in nats). The model's outputs are unchanged and, on
    any exit (including ``KeyboardInterrupt``), its attention implementation is restored.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(batches, Mapping) or isinstance(batches, torch.Tensor):
        raise TypeError("batches: expected an iterable of batches (e.g. a list of dicts), got a single batch")
    if not hasattr(model, "config"):
        from ..torch_modules import collect_modules

        return collect_modules(model, batches, method=method, progress=progress)
    session = _Collection(model, method)
    with session.active(), torch.no_grad():
        for batch in _progress(batches, progress):
            kw = _forward_kwargs(model, batch)
            session.padding = {k: kw.get(k) for k in ("attention_mask", "decoder_attention_mask")}
            model(**kw)
    if all(s is None for s in session.stats):
        raise ValueError("batches: no attention call was recorded (empty iterable?)")
    return session.scores()
