"""Everything headprune may touch on a model, recorded so a test can assert "exactly as before".

``ModelSnapshot(model)`` keeps: every state-dict tensor (cloned; compared bit for bit, so NaN
and -0.0 count), the identity of every parameter object (an optimizer holding them must
still see the model's weights), every config the modules read (``to_dict()`` and the
attention implementation), every module's hooks, its plain attributes (head counts,
``training``), its attribute names (an added ``forward`` or ``_headprune_state`` shows up)
and headprune's state record, torch's global module hooks, and the keys registered in
transformers' attention and mask interfaces.
"""

from __future__ import annotations

import copy

import torch
from torch.nn.modules import module as torch_module

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_module_registration_hooks", "_global_parameter_registration_hooks", "_global_buffer_registration_hooks",
)
_SCALARS = (bool, int, float, str, type(None))
STATE_ATTR = "_headprune_state"


def registry_keys() -> tuple:
    """Names registered in transformers' ``AttentionInterface`` and mask interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return tuple(sorted(AttentionInterface._global_mapping)), tuple(sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))


def configs_of(model) -> list:
    """Every distinct config object the modules read (T5's stacks hold copies)."""
    found = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "to_dict"):
            found.setdefault(id(c), c)
    return list(found.values())


def _hooks(m) -> dict:
    return {name: [(k, v) for k, v in getattr(m, name, {}).items()] for name in _HOOK_DICTS}


def _module_record(m) -> tuple:
    attrs = vars(m)
    scalars = {k: v for k, v in attrs.items() if isinstance(v, _SCALARS)}
    return type(m), sorted(attrs), scalars, attrs.get("forward"), _hooks(m)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


class ModelSnapshot:
    def __init__(self, model):
        self.model = model
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.configs = [(c, c.to_dict(), getattr(c, "_attn_implementation_internal", None)) for c in configs_of(model)]
        self.modules = {name: _module_record(m) for name, m in model.named_modules(remove_duplicate=False)}
        self.state = copy.deepcopy(getattr(model, STATE_ATTR, None))
        self.global_hooks = {n: list(getattr(torch_module, n, {}).items()) for n in _GLOBAL_HOOKS}
        self.registry = registry_keys()

    def differences(self) -> list:
        model, out = self.model, []
        now = model.state_dict(keep_vars=True)
        if now.keys() != self.tensors.keys():
            out.append(f"state_dict keys: -{sorted(self.tensors.keys() - now.keys())} +{sorted(now.keys() - self.tensors.keys())}")
        for k in self.tensors.keys() & now.keys():
            a, b = self.tensors[k], now[k].detach()
            if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
                out.append(f"{k}: {a.dtype} {tuple(a.shape)} {a.device} -> {b.dtype} {tuple(b.shape)} {b.device}")
            elif a.device.type != "meta" and not torch.equal(_bits(a), _bits(b)):
                out.append(f"{k}: values changed")
        params = dict(model.named_parameters(remove_duplicate=False))
        out += [f"parameter object {n} replaced" for n, p in self.params.items() if params.get(n) is not p]
        now_configs = {id(c) for c in configs_of(model)}
        for c, d, impl in self.configs:
            if id(c) not in now_configs:
                out.append(f"config {type(c).__name__} no longer used by the model")
            if c.to_dict() != d:
                diff = {k for k in set(d) | set(c.to_dict()) if d.get(k) != c.to_dict().get(k)}
                out.append(f"config {type(c).__name__} changed: {sorted(diff)}")
            if getattr(c, "_attn_implementation_internal", None) != impl:
                out.append(f"attention implementation {impl!r} -> {c._attn_implementation_internal!r}")
        modules = {name: _module_record(m) for name, m in model.named_modules(remove_duplicate=False)}
        if modules.keys() != self.modules.keys():
            out.append(f"modules: -{sorted(self.modules.keys() - modules.keys())} +{sorted(modules.keys() - self.modules.keys())}")
        fields = ("type", "attribute names", "plain attributes", "instance forward", "hooks")
        for name in self.modules.keys() & modules.keys():
            for field, a, b in zip(fields, self.modules[name], modules[name]):
                if a != b:
                    out.append(f"module {name or '<root>'}: {field} changed")
        if getattr(model, STATE_ATTR, None) != self.state:
            out.append(f"{STATE_ATTR} changed")
        if {n: list(getattr(torch_module, n, {}).items()) for n in _GLOBAL_HOOKS} != self.global_hooks:
            out.append("torch global module hooks changed")
        if registry_keys() != self.registry:
            out.append(f"AttentionInterface / mask interface keys: {self.registry} -> {registry_keys()}")
        return out

    def assert_same(self) -> None:
        diff = self.differences()
        assert not diff, "model changed:\n  " + "\n  ".join(diff[:20])
