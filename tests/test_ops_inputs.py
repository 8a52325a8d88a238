"""What the ops refuse, and that a refusal leaves the accumulators as they were: negative
probabilities."""

import pytest
import torch

from headprune import NUM_STATS
from headprune.core import ops


NEGATIVE = {  # name: (index of the negative entry in a [2, 3, 4, 40] tensor, value)
    "first entry": ((1, 2, 3, 0), -0.5),
    "first non-zero": ((0, 1, 2, 6), -0.5),  # entries 0..5 of that row are zero
    "vector body": ((1, 0, 1, 17), -1e-3),
    "row tail": ((0, 2, 0, 39), -1e-3),
    "subnormal": ((1, 1, 1, 20), -1e-45),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NEGATIVE)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_negative_probability_is_refused(dtype, name, strided):
    index, value = NEGATIVE[name]
    p = torch.softmax(torch.randn(2, 3, 4, 40, generator=torch.Generator().manual_seed(3)), -1).to(dtype)
    p[0, 1, 2, :6] = 0.0
    p[index] = value
    if strided:
        p = p.transpose(-1, -2).contiguous().transpose(-1, -2)
    if p[index] == 0:  # -1e-45 in float16 / bfloat16
        pytest.skip(f"{value} rounds to 0 in {dtype}")
    stats = torch.ones(3, NUM_STATS, dtype=torch.float64)
    sums, counts = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.int64)
    where = r"at \[" + ", ".join(map(str, index)) + r"\]"
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -.* " + where):
        ops.entropy_stats_from_probs_accumulate_(stats, p)
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -.* " + where):
        ops.entropy_from_probs_accumulate_(sums, counts, p, None, 0.0)
    assert torch.equal(stats, torch.ones_like(stats))
    assert torch.equal(sums, torch.ones_like(sums)) and torch.equal(counts, torch.ones_like(counts))


def test_negative_zero_is_a_zero():
    p = torch.softmax(torch.randn(1, 2, 3, 20, generator=torch.Generator().manual_seed(4)), -1)
    p[..., 3::4] = 0.0
    q = p.clone()
    q[..., 3::4] = -0.0
    assert torch.equal(stats_of(q), stats_of(p))


def stats_of(p, eps=1e-8):
    s = torch.zeros(p.shape[1], NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_probs_accumulate_(s, p, None, eps)
    return s

