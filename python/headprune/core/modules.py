"""Temporary changes to a model's modules that put back exactly what was there: every
module's own training flag, and a ``forward`` set on the instance (accelerate's hooks, for
example, live there); and :func:`retype`, the one loop that gives a model's tensors types one
by one (``model.to(dtype)`` also narrows buffers kept wider, such as rotary frequencies)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

__all__ = ["check_module", "eval_mode", "execution_device", "input_device", "instance_forward", "ordinary_tensors", "retype",
           "uncompiled"]

_MISSING = object()


@contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; every module's training flag as it was after
    (``model.train(flag)`` would set one flag for all of them)."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in training.items():
            m.training = flag


@contextmanager
def instance_forward(module, forward):
    """``module.forward`` replaced by ``forward`` inside the block; after it, the instance's
    own ``forward`` (if it had one) is back, else the class's."""
    old = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    try:
        yield module
    finally:
        if old is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = old


def retype(model, dtype_of) -> None:
    """Each parameter and buffer ``t`` of ``model`` cast to ``dtype_of(module name, module,
    tensor name, t)`` where that gives a type other than ``t``'s (``None``: left as it is), asked
    of every name that holds it. Parameters keep their identity (their ``.data`` is replaced), so
    an optimizer or a dict holding them still does; a tied parameter is cast once; a buffer held
    under several names (several modules, or one module twice) that they want in one type stays
    one tensor (cast once, given to each)."""
    import torch

    cast = {}  # (id of a buffer, type) -> (the buffer, its cast)
    with torch.no_grad():
        for m, module in model.named_modules():
            for n, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is None:
                    continue
                want = dtype_of(m, module, n, t)
                if want is None or t.dtype == want:
                    continue
                if n in module._parameters:
                    t.data = t.data.to(want)
                    continue
                key = (id(t), want)
                if key not in cast:
                    cast[key] = (t, t.to(want))  # t held: its id stays its own until the end
                module._buffers[n] = cast[key][1]


def uncompiled(model):
    """The module a ``torch.compile`` wrapper compiles (it shares its parameters), else ``model``:
    what a file should record (the wrapper's class and its ``_orig_mod.`` keys name no model)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else model


def refuse_meta(params, name: str = "model") -> None:
    """``ValueError`` naming ``name`` if one of ``params`` (the weights a mask or a pruning edits, or
    a model's) is on the meta device (offloaded by accelerate, or never loaded): a mask could not
    write it, a pruning would slice the placeholder and leave the offloaded weights their old
    shape, and nothing can be computed with it."""
    if any(p.is_meta for p in params):
        raise ValueError(f"{name}: parameters are on the meta device (offloaded by accelerate, or not loaded); "
                         "load the weights onto a device first (device_map='cpu', say)")


def check_module(model, name: str = "model", *, meta: bool = False) -> None:
    """``TypeError`` naming ``name`` unless ``model`` is a ``torch.nn.Module`` (``None`` or a model's
    name failed deep inside); with ``meta`` (for what computes with its weights), :func:`refuse_meta`
    of its parameters too, unless accelerate offloaded them (its hooks load them for each forward)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if meta:
        refuse_meta(unloaded_parameters(model), name)


def unloaded_parameters(model) -> list:
    """``model``'s parameters on the meta device that no accelerate hook loads for the forward
    (one that offloads its module's weights, or a module's above it): never loaded, where those
    offloaded to disk or the CPU by ``device_map`` or ``cpu_offload`` are."""
    out = []

    def walk(module, loaded: bool):
        loaded = loaded or _offloads(getattr(module, "_hf_hook", None))
        out.extend(p for p in module.parameters(recurse=False) if p.is_meta and not loaded)
        for child in module.children():
            walk(child, loaded)

    walk(model, False)
    return out


def input_device(model):
    """Where ``model``'s inputs go: its first loaded parameter's device (the first parameter's,
    unless accelerate offloaded it to the meta device), else the device accelerate's hooks run
    the forward on (``cpu_offload`` leaves no parameter loaded), else the CPU."""
    import torch

    loaded = next((p for p in model.parameters() if not p.is_meta), None)
    if loaded is not None:
        return loaded.device
    for module in model.modules():
        device = _execution_device(getattr(module, "_hf_hook", None))
        if device is not None:
            return torch.device(device)
    return torch.device("cpu")


def execution_device(model, module):
    """Where ``module`` (a submodule of ``model``) computes: its first loaded parameter's device,
    else the device the accelerate hook nearest to it runs the forward on (its own, or an
    enclosing module's), else :func:`input_device`."""
    import torch

    loaded = next((p for p in module.parameters() if not p.is_meta), None)
    if loaded is not None:
        return loaded.device
    name = next((n for n, m in model.named_modules() if m is module), "")
    chain = [model]
    for part in name.split(".") if name else ():
        chain.append(getattr(chain[-1], part))
    for m in reversed(chain):
        device = _execution_device(getattr(m, "_hf_hook", None))
        if device is not None:
            return torch.device(device)
    return input_device(model)


def _execution_device(hook):
    if hook is None:
        return None
    if hasattr(hook, "hooks"):
        return next((d for d in map(_execution_device, hook.hooks) if d is not None), None)
    device = getattr(hook, "execution_device", None)
    if isinstance(device, int):  # an accelerator's index, as accelerate reads it (cuda, xpu, npu, ...)
        try:
            from accelerate.utils.modeling import normalize_device
        except ImportError:
            return f"cuda:{device}"
        device = normalize_device(device)
        return f"cuda:{device}" if isinstance(device, int) else device
    return device


def _offloads(hook) -> bool:
    """Whether an accelerate hook (or one of a sequence of them) loads its module's weights."""
    if hook is None:
        return False
    if hasattr(hook, "hooks"):
        return any(_offloads(h) for h in hook.hooks)
    return bool(getattr(hook, "offload", False)) or getattr(hook, "weights_map", None) is not None


def compiled_over(model, hooked) -> list:
    """``(name, in place)`` of each module of ``model`` (``""``: itself) that runs a graph
    ``torch.compile`` compiled (a wrapper, or compiled in place by ``module.compile()``) and is or
    holds one of the ``hooked`` modules: a graph compiled before a hook was added never calls it
    (torch does not guard on hooks, ``torch._dynamo.config.skip_nnmodule_hook_guards``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    ids = {id(m) for m in hooked}
    return [(name, not isinstance(m, OptimizedModule)) for name, m in model.named_modules()
            if (isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None)
            and any(id(sub) in ids for sub in m.modules())]


def ordinary_tensors(fn):
    """``fn`` run outside ``torch.inference_mode()`` with the caller's grad mode (off inside
    inference mode): what it returns is ordinary tensors, which in-place updates outside
    inference mode can touch. (``torch.inference_mode(False)`` alone turns grad mode on.)"""
    import inspect

    import torch

    if inspect.isgeneratorfunction(fn):  # its body would run at each next(), in the caller's mode
        raise TypeError(f"ordinary_tensors: {fn.__name__} is a generator function")

    @functools.wraps(fn)
    def run(*args, **kwargs):
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return run
