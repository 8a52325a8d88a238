"""Edges of the instruction-set kernels and of the head mask's arguments: no code built for a
wider instruction set runs when the library loads, the AVX-512 logarithm covers the whole float
range eps may reach, and head-mask sizes and gates that would wrap or poison the weights are
refused by name."""

import re
import shutil
import subprocess

import pytest
import torch

import headprune
from headprune.core import ops

from test_ops_contract import _isas, _run_on_isa


def _initializers(disassembly: str) -> dict:
    """``{function: [instruction, ...]}`` of the instruction-set units' static initializers."""
    out, name = {}, None
    for line in disassembly.splitlines():
        head = re.match(r"^[0-9a-f]+ <(_GLOBAL__sub_I_rows_\w+\.cpp)>:$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif not line.strip():
            name = None
        elif name is not None and "\t" in line:
            out[name].append(line.split("\t", 1)[1].strip())
    return out


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_loading_runs_no_wider_instruction_set():
    """The AVX-512 unit's logarithm table was built by a constructor compiled with AVX-512 and
    FMA, which ran when the library loaded, on any CPU (``vcvtsi2sd``, ``vfmadd132sd``)."""
    library = headprune.core.build.load_extension().__file__
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout
    found = _initializers(text)
    assert found, "no instruction-set unit's initializer found to check"
    for name, code in found.items():
        wide = [i for i in code if re.match(r"v\w+\s", i + " ") or re.search(r"%[yz]mm|%k[0-7]", i)]
        assert not wide, (name, wide[:5])


@pytest.mark.parametrize("isa", _isas())
def test_eps_up_to_the_largest_float(isa):
    """The AVX-512 logarithm took the exponent of x * 4/3, which is infinite from 0.75 FLT_MAX
    on: such an eps was refused there (blamed on the probabilities) and not elsewhere."""
    _run_on_isa(isa, """
import torch
from headprune.core import ops, reference as R
for K in (16, 64, 70):
    p = torch.full((1, 2, 3, K), 1.0 / K)
    for eps in (2.5e38, 2.553e38, 3.4e38, float(torch.finfo(torch.float32).max)):
        s = torch.zeros(2, 6, dtype=torch.float64)
        ops.entropy_stats_from_probs_accumulate_(s, p, None, eps)
        w = R.entropy_stats_from_probs(p, eps=eps)
        assert torch.allclose(s, w, rtol=1e-6, atol=0), (K, eps, s, w)
print("ok")
""")


def test_a_head_size_whose_product_wraps_is_refused():
    x = torch.ones(4)
    with pytest.raises(ValueError, match=r"^x: size 4 along dim 0 does not equal num_heads \* head_dim = 4 \* "):
        ops.apply_head_mask_(x, torch.ones(4), 2**62 + 1, 0)
    assert torch.equal(x, torch.ones(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gates_that_are_not_finite_are_refused(bad):
    x = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"^mask: expected finite gates, got NaN or infinite values"):
        ops.apply_head_mask_(x, torch.tensor([bad, 1.0]), 2, 1)
    assert torch.equal(x, torch.ones(2, 4))
