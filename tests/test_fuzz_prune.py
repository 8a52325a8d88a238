"""Property tests over random head selections (hypothesis).

- mask/prune equivalence: the physically pruned model's output equals the masked model's;
- save -> load round trips over random uneven selections are bit-exact.

``derandomize=True``: examples come from a fixed seed (derived from the test), so every run,
here or in CI, draws the same selections and a failure replays as is; ``database=None``
keeps hypothesis from writing a ``.hypothesis`` directory.
"""

import copy
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from hf_tiny import tiny_batch, tiny_model
from numerics import assert_same_function, float64_output

from headprune.hf import kept_heads, load_pruned, mask_heads, prune_heads, resolve_sites, save_pruned

# one family per layout: conv1d fused (gpt2), split GQA (llama), fused GQA + config copies
# (phi3), encoder-decoder with shared position bias and cross-attention (t5), BERT's
# output projection outside the attention module (bert)
FAMILIES = ("gpt2", "llama", "phi3", "t5", "bert")
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# 25 + 25 examples of five families: tens of seconds
pytestmark = pytest.mark.slow

_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = (tiny_model(family), len(resolve_sites(tiny_model(family))))
    return _MODELS[family]


@st.composite
def selections(draw, families=FAMILIES):
    """``(family, {site: [heads]})``: any subset of each site's 4 heads, including none
    and all (an emptied layer)."""
    family = draw(st.sampled_from(families))
    n = _model(family)[1]
    heads = {}
    for site in range(n):
        keep = draw(st.lists(st.booleans(), min_size=4, max_size=4))
        removed = [h for h, k in enumerate(keep) if not k]
        if removed:
            heads[site] = removed
    return family, heads


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@FUZZ
@given(selections(), st.integers(0, 3))
def test_masked_output_equals_pruned_output(selection, seed):
    family, heads = selection
    model = _model(family)[0]
    batch = tiny_batch(family, seed=seed)
    with torch.no_grad():
        with mask_heads(model, heads):
            masked = _first(model(**batch))
        pruned = copy.deepcopy(model)
        prune_heads(pruned, heads)
        out = _first(pruned(**batch))
    assert out.shape == masked.shape
    assert_same_function({"masked": masked, "pruned": out}, float64_output(pruned, batch, lambda m, b: _first(m(**b))))
    removed = sum(map(len, heads.values()))
    assert sum(len(k) for k in kept_heads(pruned).values()) == 4 * _model(family)[1] - removed


@st.composite
def staged(draw):
    """A selection pruned in one or two calls (both in original head indices; the second call
    names every head of the selection, the ones the first removed included)."""
    family, heads = draw(selections())
    split = draw(st.booleans())
    first = {k: v[: len(v) // 2] for k, v in heads.items() if len(v) > 1} if split else heads
    return family, heads, first


def _prune_staged(model, heads, first):
    prune_heads(model, first)
    report = prune_heads(model, heads)  # what the first call removed is ignored
    assert report.already_removed == {k: v for k, v in first.items() if v}


@FUZZ
@given(staged())
# found by this test: KV heads repeated by a first pruning were kept repeated by a second one,
# so the model no longer matched the one-shot layout load_pruned rebuilds (prune.py _kv_layout)
@example(("llama", {0: [0, 1, 2, 3], 1: [0, 1]}, {0: [0, 1], 1: [0]}))
@example(("phi3", {0: [1, 2, 3], 1: [1, 3]}, {0: [1], 1: [1]}))
def test_save_load_round_trip_is_bit_exact(case):
    family, heads, first = case
    model = copy.deepcopy(_model(family)[0])
    _prune_staged(model, heads, first)
    batch = tiny_batch(family)
    with torch.no_grad():
        ref = _first(model(**batch))
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, tmp)
        again = load_pruned(tmp)
    assert kept_heads(again) == kept_heads(model)
    assert kept_heads(model) == {i: [h for h in range(4) if h not in heads.get(i, [])] for i in kept_heads(model)}
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.equal(_first(again(**batch)), ref)

