"""Shape-checking fake kernels of the native ops, so ``torch.compile`` can trace them;
registered by :func:`headprune.core.build.load_extension` once the ops exist.

They are the ops' Meta kernels too: a call with any tensor on the ``meta`` device runs them
instead of the CPU or CUDA kernel, so they check what those kernels check about devices
(every tensor on the device of the input, as named by the C++ checks) and accumulators, with
the same exception types."""

from __future__ import annotations

import torch

from .schema import NUM_STATS


def _check_acc(t, shape, dtype, name):
    """The type first, then the shape: the order the native kernels check them in, so an
    accumulator wrong in both raises the same exception on every device."""
    torch._check_type(t.dtype == dtype, lambda: f"{name}: expected {dtype}, got {t.dtype}")
    torch._check_value(tuple(t.shape) == tuple(shape),
                       lambda: f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_devices(like_name, like, **tensors):
    """Every tensor of ``tensors`` (None: absent) on ``like``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")


def register_fakes() -> None:
    """Shape-checking fake kernels so ``torch.compile`` can trace the ops."""

    @torch.library.register_fake("headprune::entropy_from_probs_accumulate_")
    def _(sums, counts, probs, query_mask=None, eps=1e-8):
        _check_devices("probs", probs, sums=sums, counts=counts, query_mask=query_mask)
        _check_acc(sums, (probs.shape[1],), torch.float64, "sums")
        _check_acc(counts, (probs.shape[1],), torch.int64, "counts")

    @torch.library.register_fake("headprune::entropy_from_qk_accumulate_")
    def _(sums, counts, query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_devices("query", query, key=key, sums=sums, counts=counts, query_mask=query_mask, attn_mask=attn_mask)
        _check_acc(sums, (query.shape[1],), torch.float64, "sums")
        _check_acc(counts, (query.shape[1],), torch.int64, "counts")

    @torch.library.register_fake("headprune::entropy_stats_from_probs_accumulate_")
    def _(stats, probs, query_mask=None, eps=1e-8):
        _check_devices("probs", probs, stats=stats, query_mask=query_mask)
        _check_acc(stats, (probs.shape[1], NUM_STATS), torch.float64, "stats")

    @torch.library.register_fake("headprune::entropy_stats_from_qk_accumulate_")
    def _(stats, query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_devices("query", query, key=key, stats=stats, query_mask=query_mask, attn_mask=attn_mask)
        _check_acc(stats, (query.shape[1], NUM_STATS), torch.float64, "stats")

    @torch.library.register_fake("headprune::attention_stats_accumulate_")
    def _(stats, query, key, value, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_devices("query", query, key=key, value=value, stats=stats, query_mask=query_mask, attn_mask=attn_mask)
        _check_acc(stats, (query.shape[1], NUM_STATS), torch.float64, "stats")
        return query.new_empty(query.shape[0], query.shape[1], query.shape[2], value.shape[3])

    # apply_head_mask_ is CompositeImplicitAutograd: it decomposes into ATen ops when traced.
