"""The ops' accumulators and the head mask's x: ones that share memory are refused by name before
anything is written."""

import pytest
import torch

from headprune import NUM_STATS
from headprune.core import ops


def test_sums_and_counts_sharing_memory_are_refused():
    """One buffer viewed as both accumulators made the counts garbage, silently."""
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="counts: expected an accumulator apart from sums"):
        ops.entropy_from_qk_accumulate_(buf, buf.view(torch.int64), torch.randn(1, 2, 3, 4, generator=g),
                                        torch.randn(1, 2, 5, 4, generator=g), 1.0)
    assert torch.equal(buf, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("op", ["entropy_stats_from_probs_accumulate_", "entropy_stats_from_qk_accumulate_",
                                "attention_stats_accumulate_"])
def test_an_expanded_stats_accumulator_is_refused_by_name(op):
    """ATen refused the write after the kernel had run, in words that did not name stats."""
    g = torch.Generator().manual_seed(0)
    stats = torch.ones(1, NUM_STATS, dtype=torch.float64).expand(2, NUM_STATS)
    q, k = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    args = {"entropy_stats_from_probs_accumulate_": (torch.softmax(q, -1),), "entropy_stats_from_qk_accumulate_":
            (q, k, 1.0), "attention_stats_accumulate_": (q, k, k, 1.0)}[op]
    with pytest.raises(ValueError, match="stats: expected an accumulator whose elements do not share memory"):
        getattr(ops, op)(stats, *args)
    assert torch.equal(stats, torch.ones(2, NUM_STATS, dtype=torch.float64))


def test_an_expanded_view_is_refused_by_the_head_mask_by_name():
    """ATen refused it in words that did not name x ("more than one element of the written-to
    tensor refers to a single memory location"); nothing is written either way."""
    x = torch.ones(4).expand(3, 4)
    with pytest.raises(ValueError, match="^x: expected a tensor whose elements do not share memory"):
        ops.apply_head_mask_(x, torch.tensor([0.0, 1.0]), 2, -1)
    assert torch.equal(x, torch.ones(3, 4))
