"""What :func:`headprune.save_pruned` writes for a model's layout, decided once for the save and
for the counts that describe the saved model: the pruning record (with the output-projection
biases a compensated mask added), the config switch it sets to declare those biases, and
whether plain ``from_pretrained`` can read the directory."""

from __future__ import annotations

from ..prune.mask import added_bias
from .adapters import get_adapter, head_counts, resolve_sites
from .configs import layout_fields
from .prune import STATE_ATTR, new_state

__all__ = ["saved_layout", "declared_bias_parameters", "original_config"]


def saved_layout(model, adapter, sites) -> tuple:
    """``(state, declare, plain)``: the record saved (``None`` for a model never pruned nor
    compensated), the family's config switch for attention biases the save sets (``None``
    where it sets none) and whether the directory is plain-loadable."""
    state = getattr(model, STATE_ATTR, None)
    masked_bias = [s.index for s in sites if added_bias(model, s.o)]
    if masked_bias:  # a compensated mask created o biases: record them like pruning does
        state = new_state(model, [head_counts(s, adapter) for s in sites])
        state["o_bias"] = sorted({*state.get("o_bias", []), *masked_bias})
        state.setdefault("uniform", True)  # never pruned: masks keep the shapes its config describes
    # an output-projection bias the family's config cannot declare would be dropped by
    # from_pretrained (with only a warning): such a model is not plain-loadable
    uniform, o_bias = state is not None and bool(state.get("uniform")), state is not None and bool(state.get("o_bias"))
    declare = adapter.config_bias if uniform and o_bias else None
    return state, declare, state is None or (uniform and (not o_bias or declare is not None))


def declared_bias_parameters(model) -> int:
    """The zero biases the save gives the q/k/v/o projections that have none where it declares
    attention biases (so the saved model holds, and loads with, that many more parameters)."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if saved_layout(model, adapter, sites)[1] is None:
        return 0
    return sum(lin.weight.shape[0] for s in sites for lin in map(s.sub, (s.block.q, s.block.k, s.block.v, s.block.o))
               if getattr(lin, "bias", None) is None)


def original_config(model, state: dict, adapter) -> dict:
    """The config a pruned model is rebuilt from: its own as it is now (what was set since the
    pruning, labels or token ids, is kept), with the head counts the pruning recorded as the
    original (a uniform layout wrote its own into the config; keys as the config's dict names
    them: GPT-2's ``n_head``)."""
    recorded, names = state["original_config"], getattr(model.config, "attribute_map", {})
    layout = {names.get(k, k) for k in layout_fields(adapter) if k}
    return {**model.config.to_dict(), **{k: recorded[k] for k in layout if k in recorded}}


def saves_offloaded(model, adapter, sites) -> bool:
    """Whether a save loads accelerate's offloaded weights itself: a plain layout, written by
    transformers' ``save_pretrained``, which does for a model whose device map offloads to the
    CPU or disk (not for ``cpu_offload``'s or ``disk_offload``'s hooks alone)."""
    where = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    return bool({"cpu", "disk"} & where) and saved_layout(model, adapter, sites)[2]
