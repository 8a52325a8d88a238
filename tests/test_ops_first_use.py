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


def _run(code: str, env=None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    return out.stdout


def test_the_loaders_warning_waits_for_the_first_call():
    """Under a CUDA torch a CPU-only build's warning came at import, so `python -W error -c
    'import headprune'` failed; it is said at the first op call, as before the loading moved."""
    _run("""
import warnings, torch
torch.version.cuda = "12.4"  # what the loader reads of a CUDA torch
warnings.simplefilter("error")
import headprune
from headprune.core import ops
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ops.apply_head_mask_(torch.ones(4), torch.ones(2), 2, 0)
assert any("built without CUDA kernels" in str(w.message) for w in seen), seen
print("ok")
""")


def test_a_build_whose_fakes_fail_still_imports_and_the_first_call_says_why(tmp_path):
    """A stale build (an op added to fakes.py after the extension was built) failed `import headprune`."""
    import os
    import shutil
    from pathlib import Path

    import headprune

    copy = tmp_path / "headprune"
    shutil.copytree(Path(headprune.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    fakes = copy / "core" / "fakes.py"
    fakes.write_text(fakes.read_text().replace(
        '    """Shape-checking fake kernels so ``torch.compile`` can trace the ops."""',
        '    """Shape-checking fake kernels so ``torch.compile`` can trace the ops."""\n'
        '    raise RuntimeError("operator headprune::newer_op does not exist")'))
    _run("""
import torch
import headprune
from headprune.core import ops
for _ in range(2):
    try:
        ops.apply_head_mask_(torch.ones(4), torch.ones(2), 2, 0)
    except RuntimeError as e:
        assert "headprune::newer_op does not exist" in str(e), e
print("ok")
""", env={**os.environ, "PYTHONPATH": str(tmp_path)})
