"""Recovery of a half-precision student: trained in float32 and cast back, as the command
line did; the library trained the float16 weights themselves (AdamW's state in float16) and
turned them into NaN, and left bfloat16 steps below the weights' rounding."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402

import headprune  # noqa: E402
from headprune.hf.recover import recover, trainable_parameters  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_student_trains_in_float32_and_keeps_its_types(dtype):
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0)
    student = copy.deepcopy(teacher)
    headprune.prune_heads(student, {0: [0, 1], 1: [2, 3]})
    student.to(dtype)
    types = {n: t.dtype for n, t in [*student.named_parameters(), *student.named_buffers()]}
    reference = copy.deepcopy(student).float()  # the same start, trained in float32
    batches = [tiny_batch("llama", seed=i) for i in range(3)]
    recover(student, teacher, batches, steps=4, lr=1e-3)
    recover(reference, teacher, batches, steps=4, lr=1e-3)
    assert {n: t.dtype for n, t in [*student.named_parameters(), *student.named_buffers()]} == types
    trained = trainable_parameters(student)
    want = trainable_parameters(reference)
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert all(torch.equal(trained[n], want[n].to(dtype)) for n in trained)
