"""Shape-checking fake kernels of the native ops, so ``torch.compile`` can trace them;
registered by :func:`headprune.core.build.load_extension` once the ops exist."""

from __future__ import annotations

import torch

from .schema import NUM_STATS


def register_fakes() -> None:
    """Shape-checking fake kernels so ``torch.compile`` can trace the ops."""

    def _check_acc(t, shape, dtype, name):
        torch._check(tuple(t.shape) == tuple(shape), lambda: f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        torch._check(t.dtype == dtype, lambda: f"{name}: expected {dtype}, got {t.dtype}")

    @torch.library.register_fake("headprune::entropy_from_probs_accumulate_")
    def _(sums, counts, probs, query_mask=None, eps=1e-8):
        _check_acc(sums, (probs.shape[1],), torch.float64, "sums")
        _check_acc(counts, (probs.shape[1],), torch.int64, "counts")

    @torch.library.register_fake("headprune::entropy_from_qk_accumulate_")
    def _(sums, counts, query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_acc(sums, (query.shape[1],), torch.float64, "sums")
        _check_acc(counts, (query.shape[1],), torch.int64, "counts")

    @torch.library.register_fake("headprune::entropy_stats_from_probs_accumulate_")
    def _(stats, probs, query_mask=None, eps=1e-8):
        _check_acc(stats, (probs.shape[1], NUM_STATS), torch.float64, "stats")

    @torch.library.register_fake("headprune::entropy_stats_from_qk_accumulate_")
    def _(stats, query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_acc(stats, (query.shape[1], NUM_STATS), torch.float64, "stats")

    @torch.library.register_fake("headprune::attention_stats_accumulate_")
    def _(stats, query, key, value, scale, attn_mask=None, is_causal=False, query_mask=None):
        _check_acc(stats, (query.shape[1], NUM_STATS), torch.float64, "stats")
        return query.new_empty(query.shape[0], query.shape[1], query.shape[2], value.shape[3])

    # apply_head_mask_ is CompositeImplicitAutograd: it decomposes into ATen ops when traced.

