"""Comparing float32 computations of one function without a fixed tolerance.

Two float32 computations of the same function with different GEMM shapes (a masked and a
physically pruned model, a fused and an unfused path) round differently, and by how much
depends on the CPU's instruction set and thread count: 1e-5 holds on one machine and fails
on the next. Instead, both are compared with the same function computed in float64, and
each one's error must be within a small factor of the other's (plus a floor of a few float32
roundings of the output's magnitude, so two near-exact results are not judged by noise).
A layout error is many orders of magnitude above either bound.
"""

from __future__ import annotations

import copy

import torch

#: how much worse one float32 path may be than the other
FACTOR = 8.0
#: floor, in float32 epsilons of the reference's largest magnitude
FLOOR_EPS = 16


def float64_output(model, batch: dict, run):
    """``run(model, batch)`` on a float64 copy of ``model`` (float inputs widened too)."""
    ref = copy.deepcopy(model).double()
    wide = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        return run(ref, wide)


def errors(outputs: dict, reference: torch.Tensor) -> dict:
    """Max abs error of each output where the reference is finite (a float64 model can give
    NaN at fully masked padding positions whose float32 values are arbitrary)."""
    ref = reference.double()
    finite = torch.isfinite(ref)
    assert finite.float().mean() > 0.5, "the float64 reference is mostly NaN/inf"
    out = {}
    for name, x in outputs.items():
        x = x.double()
        assert torch.isfinite(x[finite]).all(), f"{name}: not finite where the float64 reference is"
        out[name] = (x - ref)[finite].abs().max().item()
    return out


def assert_same_function(outputs: dict, reference: torch.Tensor, *, factor: float = FACTOR,
                         floor_eps: float = FLOOR_EPS) -> dict:
    """``outputs``: name -> float32 tensor, all computing the function whose float64 value
    is ``reference``. Each one's max abs error against ``reference`` must be at most
    ``factor`` times every other one's, plus the floor. Returns the errors."""
    errs = errors(outputs, reference)
    for out in outputs.values():
        assert out.shape == reference.shape, f"shape {tuple(out.shape)} != reference {tuple(reference.shape)}"
    ref = reference.double()
    floor = floor_eps * torch.finfo(torch.float32).eps * max(1.0, ref[torch.isfinite(ref)].abs().max().item())
    for a, ea in errs.items():
        for b, eb in errs.items():
            assert ea <= factor * eb + floor, (
                f"{a}: error {ea:.3g} against float64 is more than {factor:g}x {b}'s ({eb:.3g}) + {floor:.2g}; "
                f"all errors: {errs}")
    return errs
