"""How the native extension is loaded, what an accumulator's state must be to load, and what the fake kernels refuse."""

import subprocess
import sys

import pytest
import torch

from headprune import EntropyAccumulator


def test_a_compiled_first_use_traces_in_a_fresh_process():
    """The loader's lock stopped Dynamo (fullgraph) where the compiled call was the first use."""
    code = """
import torch
from headprune.core import ops
from headprune.core.schema import NUM_STATS
@torch.compile(backend="aot_eager", fullgraph=True)
def f(stats, q, k):
    ops.entropy_stats_from_qk_accumulate_(stats, q, k, 0.5, None, True, None)
    return stats * 1
assert f(torch.zeros(2, NUM_STATS, dtype=torch.float64), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))[0, 0] == 6  # rows counted
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_an_accumulator_state_is_checked_as_the_cpp_accumulator_checks_it():
    """A service's state (C++ load_stats refuses these) loaded here with a NaN mean or a count of
    -3, and integer stats were taken as they came."""
    a, c = EntropyAccumulator(3), EntropyAccumulator(3)
    a.entropy_stats_from_qk(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), 0.4, is_causal=True)
    for bad, says in ((float("nan"), "finite"), (-3.0, "non-negative counts")):
        stats = a.state_dict()["stats"]
        stats[1, 0] = bad
        with pytest.raises(ValueError, match=f"state: expected {says}"):
            c.load_state_dict({"stats": stats})
    with pytest.raises(TypeError, match="state: expected floating 'stats', got torch.int64"):
        c.load_state_dict({"stats": a.state_dict()["stats"].long()})
    assert not c.stats.any()  # unchanged by the refusals
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.stats, a.stats)


def test_an_accumulator_of_the_wrong_type_and_shape_raises_alike_on_meta_and_cpu():
    """The fake (meta) kernel checked the shape first: ValueError there, TypeError on the CPU."""
    from headprune.core import ops

    for device in ("cpu", "meta"):
        sums, counts = torch.zeros(3, device=device), torch.zeros(3, dtype=torch.long, device=device)
        with pytest.raises(TypeError, match="^sums: expected"):
            ops.entropy_from_probs_accumulate_(sums, counts, torch.rand(2, 4, 3, 3, device=device))
