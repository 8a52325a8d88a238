"""PyTorch's rule for tensors on two devices, on a machine without a second one: tensors tagged
as on ``cuda:0`` may meet others of that tag, copies between devices and 0-dim CPU tensors (as
scalars), and any other operation that mixes a tagged floating tensor with a CPU one raises as
CUDA does. Enough to find code that mixes a CUDA model's weights with statistics kept on the
CPU, where no GPU is at hand."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.lift_fresh.default}


class DeviceRule(TorchDispatchMode):
    """``with DeviceRule() as rule: rule.tag(t, ...)``; results of tagged tensors stay tagged
    (``rule.device(t)``); ``.to(...)`` moves nothing, so a result's tag is where it would be."""

    def __init__(self):
        super().__init__()
        self.tags = WeakTensorKeyDictionary()

    def tag(self, *tensors) -> None:
        for t in tensors:
            self.tags[t] = "cuda:0"

    def device(self, t) -> str:
        return self.tags.get(t, "cpu")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _COPIES:  # the result is where its destination, or ``device=``, puts it
            out = func(*args, **kwargs)
            to = kwargs.get("device")
            dev = self.device(args[0]) if to is None else "cpu" if torch.device(to).type == "cpu" else "cuda:0"
        else:  # CPU index tensors and scalars go with CUDA ones
            devs = {self.device(t) for t in tensors if t.dim() > 0 and t.is_floating_point() or self.device(t) != "cpu"}
            if len(devs) > 1:
                raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {sorted(devs)}")
            out = func(*args, **kwargs)
            dev = devs.pop() if devs else "cpu"
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                if dev == "cpu":
                    self.tags.pop(o, None)
                else:
                    self.tags[o] = dev
        return out
