"""Where headprune's records of a pruning and of masks live: on the module pruned or masked, which
every later call must be given (a call on a module inside it, or on one holding it, would not
see them)."""

from __future__ import annotations

import weakref

from ..core.modules import uncompiled
from ..prune.mask import MASKS_ATTR

__all__ = ["STATE_ATTR", "record_holder", "refuse_records_elsewhere"]

#: the attribute of a pruned model holding its pruning record (original heads kept, config)
STATE_ATTR = "_headprune_state"

#: each attention module pruned or masked -> the module whose records describe it (the one passed)
_HOLDERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _holds_records(module) -> bool:
    return STATE_ATTR in module.__dict__ or MASKS_ATTR in module.__dict__


def record_holder(model, sites) -> None:
    """``model`` holds the records of its ``sites``' pruning or masks (see :func:`refuse_records_elsewhere`)."""
    for s in sites:
        _HOLDERS[s.module] = weakref.ref(model)


def refuse_records_elsewhere(model) -> None:
    """headprune's records (a pruning's, a mask's) live on the module pruned or masked. A module
    inside ``model`` that holds them was pruned or masked on its own, and a model holding
    ``model`` was pruned or masked as a whole: a call on ``model`` would not see those records (a
    save would describe the unpruned config, a restore miss the mask, head indices be positions)."""
    model = uncompiled(model)
    for name, module in model.named_modules():
        if name and _holds_records(module):
            raise ValueError(f"model: its module {name!r} was pruned or masked on its own (headprune keeps the "
                             "record there); pass that module, as it was pruned or masked")
        ref = _HOLDERS.get(module)
        holder = None if ref is None else ref()
        if holder is not None and holder is not model and _holds_records(holder):  # (inside: refused above)
            raise ValueError(f"model: is part of a {type(holder).__name__} that was pruned or masked as a whole "
                             "(headprune keeps the record there); pass that model")
