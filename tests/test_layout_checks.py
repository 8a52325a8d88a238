"""Statistics, value moments and measured costs name heads by position; taken on another head
layout (before or after a pruning, or after another pruning of the same counts) they were
applied to other heads. Each is refused now, naming what it was taken on."""

import pytest

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect, collect_values, mask_heads, prune_heads


def _bert(layers=3):
    model = tiny_model("bert", num_hidden_layers=layers)
    return model, [tiny_batch("bert", seed=i) for i in range(3)]


@pytest.mark.parametrize("how", ["compensate", "reconstruct"])
def test_statistics_of_another_pruning_of_the_same_counts_are_refused(how):
    a, batches = _bert()
    b, _ = _bert()
    prune_heads(a, {0: [1]})
    prune_heads(b, {0: [3]})
    theirs, ours = (collect(m, batches, progress=False, moments=True) for m in (a, b))
    with pytest.raises(ValueError, match=rf"{how}: the scores were collected on heads \[0, 2, 3\] of site 0, the "
                                         r"model keeps \[0, 1, 2\] \(the same counts, pruned otherwise\)"):
        mask_heads(b, {0: [2]}, **{how: theirs})
    with pytest.raises(ValueError, match=f"{how}: the scores were collected on heads"):
        prune_heads(b, {0: [2]}, **{how: theirs})
    with mask_heads(b, {0: [2]}, **{how: ours}):  # its own: accepted
        pass


def test_learned_gates_refuse_the_statistics_of_another_pruning():
    from headprune.hf.learned import learn_gates

    a, batches = _bert()
    b, _ = _bert()
    prune_heads(a, {0: [1]})
    prune_heads(b, {0: [3]})
    with pytest.raises(ValueError, match=r"scores: the scores were collected on heads \[0, 2, 3\] of site 0, the model keeps"):
        learn_gates(b, batches, ratio=0.3, steps=1, scores=collect(a, batches, progress=False))


def test_value_moments_of_another_layout_are_refused():
    """Moments collected before layer 0 was pruned passed the check and refit layer 1 from the
    old layout's activations."""
    model, batches = _bert()
    old = collect_values(model, batches, {1: [3]})
    prune_heads(model, {0: [1, 2]})
    scores = collect(model, batches, progress=False, moments=True)
    with pytest.raises(ValueError, match=r"values: collected when site 0 held heads \[0, 1, 2, 3\], it now holds "
                                         r"\[0, 3\]; collect_values again"):
        prune_heads(model, {1: [3]}, reconstruct=scores, values=old)
    prune_heads(model, {1: [3]}, reconstruct=scores, values=collect_values(model, batches, {1: [3]}))


def test_measured_costs_of_another_layout_are_refused():
    """Costs measured on the unpruned model chose heads the pruned one no longer has, and
    prune_heads dropped them: one head went instead of three."""
    from headprune.hf.allocation import layer_costs, select_measured

    model, batches = _bert()
    before = layer_costs(model, batches, collect(model, batches, progress=False, moments=True), sequences=5)
    prune_heads(model, {0: [1], 1: [0, 3]})
    scores = collect(model, batches, progress=False, moments=True)
    with pytest.raises(ValueError, match=r"costs: measured when site 0 held heads \[0, 1, 2, 3\], the scores' model "
                                         r"holds \[0, 2, 3\]; measure again"):
        select_measured(model, batches, scores, ratio=0.3, costs=before)
    heads, _ = select_measured(model, batches, scores, ratio=0.3)
    prune_heads(model, heads)  # measured on this layout: its heads are the model's
