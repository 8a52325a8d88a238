"""Where headprune's records of a pruning and of masks live: on the module pruned or masked, which
every later call must be given (a call on a module inside it, or on one holding it, would not
see them). So that a part of the model knows a whole holds its records, each attention module a
pruning describes refers to the pruning's record (a deepcopy maps the reference onto the copy's
own record), and each one masked is entered, weakly, against the model holding the masks (a
restored mask leaves the module as it was)."""

from __future__ import annotations

import weakref

from ..core.modules import uncompiled
from ..prune.mask import MASKS_ATTR

__all__ = ["STATE_ATTR", "link_masks", "link_state", "refuse_records_elsewhere", "set_record"]

#: the attribute of a pruned model holding its pruning record (original heads kept, config)
STATE_ATTR = "_headprune_state"
#: on each attention module a pruning describes: that pruning's record
_STATE_OF = "_headprune_state_of"
#: each attention module masked -> the model holding the masks
_MASKED_IN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def link_state(model, sites, undo) -> None:
    """Each of ``sites``' modules refers to ``model``'s pruning record, set through ``undo`` (a
    rollback takes the references back too)."""
    for s in sites:
        undo.set(s.module, _STATE_OF, model.__dict__.get(STATE_ATTR))


def set_record(model, state: dict, sites) -> None:
    """``model``'s pruning record is ``state`` (``load_pruned``'s rebuilt model), linked from ``sites``."""
    model.__dict__[STATE_ATTR] = state
    for s in sites:
        s.module.__dict__[_STATE_OF] = state


def link_masks(model, sites) -> None:
    """``model`` holds the masks of ``sites``."""
    for s in sites:
        _MASKED_IN[s.module] = weakref.ref(model)


def refuse_records_elsewhere(model) -> None:
    """headprune's records (a pruning's, a mask's) live on the module pruned or masked. A module
    inside ``model`` that holds them was pruned or masked on its own, and a model holding
    ``model`` was pruned or masked as a whole: a call on ``model`` would not see those records (a
    save would describe the unpruned config, a restore miss the mask, head indices be positions)."""
    model = uncompiled(model)
    state = model.__dict__.get(STATE_ATTR)
    for name, module in model.named_modules():
        if name and (STATE_ATTR in module.__dict__ or MASKS_ATTR in module.__dict__):
            raise ValueError(f"model: its module {name!r} was pruned or masked on its own (headprune keeps the "
                             "record there); pass that module, as it was pruned or masked")
        record = module.__dict__.get(_STATE_OF)
        ref = _MASKED_IN.get(module)
        holder = None if ref is None else ref()
        if (record is not None and record is not state) or (
                holder is not None and holder is not model and MASKS_ATTR in holder.__dict__):
            raise ValueError("model: is part of a model pruned or masked as a whole (headprune keeps the record "
                             "on that model); pass that model")
