"""The masks, causality and scale an attention call applies, exactly as transformers' own
implementations do: the one file that mirrors transformers internals
(``transformers.integrations.sdpa_attention.sdpa_attention_forward`` and the families'
``eager_attention_forward``), so the one file a transformers upgrade should touch.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import create_position_bias_mask

from ..core import ops

__all__ = ["effective_mask", "fix_half_mask", "logit_scale", "softcapped_stats"]

# Softcapped logits cannot be expressed as q.k plus a mask; they are formed per chunk of
# queries of at most this many elements.
_SOFTCAP_CHUNK = 1 << 24


def fix_half_mask(mask, like=None):
    """Half-precision additive masks use ``finfo.min`` (-65504 in fp16), which the op would
    read as a finite logit: turn masked entries into ``-inf``. ``like``: the keys' dtype, for a
    wider mask filled at the keys' minimum (T5's position-bias mask under float16 autocast is
    float32, filled at float16's)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    half = [t for t in (mask.dtype, like) if t in (torch.float16, torch.bfloat16)]
    if half:
        mask = mask.masked_fill(mask <= max(torch.finfo(t).min for t in half) / 2, float("-inf"))
    return mask


def effective_mask(impl, module, query, key, mask, kwargs):
    """``(key, attn_mask, is_causal)`` exactly as ``impl`` applies them."""
    q_len, k_len = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
        what = f"a {mask.dim()}-D mask" if isinstance(mask, torch.Tensor) else f"a mask of type {type(mask).__name__}"
        raise NotImplementedError(f"attention implementation {impl!r} hands {what}, not the 4-D tensor headprune "
                                  "reads; collect with the model in 'sdpa' or 'eager'")
    if impl == "eager":  # eager adds its (always explicit) mask and bias, nothing implicit
        if bias is not None:
            mask = bias if mask is None else (torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask)
        return key, fix_half_mask(mask, key.dtype), False
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
    return key, fix_half_mask(mask, key.dtype), is_causal


def logit_scale(query, kwargs) -> float:
    """The logit scale an attention call uses: its ``scaling``, else ``head_dim ** -0.5``."""
    scale = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scale is None else scale


def softcapped_stats(stats, query, key, scale, mask, softcap, query_mask):
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
        ops.entropy_stats_from_qk_accumulate_(stats, zq, zk, 1.0, fix_half_mask(z), False, qm)
