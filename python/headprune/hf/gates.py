"""Differentiable head gates: each head's output times a gate, before the output projection.

transformers 4 took a ``head_mask`` argument in BERT's and GPT-2's forward and multiplied the
attention probabilities by it, head by head; transformers 5 dropped it. Scaling a head's
probabilities scales its output (the context is linear in them), so a gate on the head's slice
of the output projection's input computes the same function, for every family and attention
backend alike: the projection is the one place every head passes through, separately.

Unlike :func:`~headprune.hf.prune.mask_heads` (binary, edits the weights), the gates are a
tensor the caller owns: soft values, one row per example if wanted, and gradients. With a gate
at 0 the head is removed exactly: the output and every weight's gradient are those of the
masked model, except the removed head's output-projection columns, whose gradient is 0, as
if the head had been pruned (under a mask they still see the head's output).

The gate path is ``unflatten``, ``mul`` (and, with ``fill``, an ``add``) and ``flatten``, so it traces and differentiates
under ``torch.compile`` like the rest of the model. Compile inside the block: a model compiled
and run before it keeps the graph it compiled without the gates, because torch does not guard
on hooks added later (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by default), so a
``torch.compile`` wrapper, or a model or layer compiled in place (``module.compile()``) around
an output projection, is refused; modules compiled in place that hold none (a feed-forward
block) do not matter.
"""

from __future__ import annotations

import math
import numbers
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch

from .adapters import check_layout, get_adapter, head_counts, head_dim, resolve_sites
from ..core.modules import check_module, compiled_over, eval_mode, execution_device, uncompiled

__all__ = ["HeadGates", "frozen", "gates"]


class HeadGates:
    """The gates of one model inside a :func:`gates` block.

    ``gate`` is the caller's tensor, read at every forward pass: ``[sites, max_heads]``, or
    ``[batch, sites, max_heads]`` for per-example gates. Row ``i`` is site ``i`` of
    :func:`~headprune.hf.adapters.resolve_sites` (the layer index of ``HeadScores``), column
    ``h`` its query head ``h``; columns past a site's head count are not read. Assign another
    tensor of the same rank at any time (``g.gate = t``): the next forward pass uses it.
    """

    def __init__(self, names: list, num_heads: list, per_example: bool):
        self.site_names = list(names)
        self.num_heads = list(num_heads)  # query heads of each site
        self.per_example = per_example
        self._gate: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple:
        """``(sites, max_heads)``: the trailing dimensions of ``gate``."""
        return len(self.num_heads), max(self.num_heads, default=0)

    @property
    def gate(self) -> Optional[torch.Tensor]:
        return self._gate

    @gate.setter
    def gate(self, value: torch.Tensor) -> None:
        self._gate = self._checked("gate", value)

    def _checked(self, name: str, value) -> torch.Tensor:
        s, h = self.shape
        want = f"[batch, {s}, {h}]" if self.per_example else f"[{s}, {h}]"
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor {want}, got {_describe(value)}")
        if value.dim() != (3 if self.per_example else 2) or tuple(value.shape[-2:]) != (s, h):
            per = "per_example=True" if self.per_example else "per_example=False"
            raise ValueError(f"{name}: expected shape {want} ({per}), got {list(value.shape)}")
        return value

    def factor(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Site ``index``'s gates shaped to multiply its heads' outputs ``x.unflatten(-1, (heads, d))``."""
        gate, hq = self._gate, self.num_heads[index]
        if gate is None:
            raise ValueError(f"gate: per-example gates need a [batch, {self.shape[0]}, {self.shape[1]}] "
                             "tensor; assign one to .gate before the forward pass")
        if gate.dim() == 2:
            return gate[index, :hq].to(device=x.device, dtype=x.dtype)[:, None]
        if gate.shape[0] != x.shape[0]:
            raise ValueError(f"gate: {gate.shape[0]} per-example rows for a batch of {x.shape[0]} "
                             f"at site {self.site_names[index]}")
        g = gate[:, index, :hq].to(device=x.device, dtype=x.dtype)
        return g.reshape(g.shape[0], *([1] * (x.dim() - 2)), hq, 1)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__


def _pre_hook(handle: HeadGates, index: int, d: int, fill: Optional[torch.Tensor]):
    def pre(module, args):
        x = args[0]
        heads = x.unflatten(-1, (handle.num_heads[index], d))
        if fill is None:
            gated = heads * handle.factor(index, x)
        else:  # g * x + (1 - g) * fill: exactly x at g = 1 and exactly fill at g = 0
            f = fill[index, : handle.num_heads[index], :d].to(device=x.device, dtype=x.dtype)
            g = handle.factor(index, x)
            gated = heads * g + f * (1 - g)
        return (gated.flatten(-2), *args[1:])

    pre.headprune_gate = True  # what gated() finds
    return pre


def gated(model) -> bool:
    """Whether a :func:`gates` block is active on ``model`` (its hooks are on an output projection)."""
    return any(getattr(hook, "headprune_gate", False) for m in model.modules() for hook in m._forward_pre_hooks.values())


def refuse_gated(model, call: str, name: str = "model", why: str = "", note: str = "") -> None:
    """``ValueError`` naming ``name`` while a :func:`gates` block is active on ``model``: what
    ``call`` would do there (collect, prune, train) would be of the gated model, or undone by the
    block's end; ``why`` and ``note`` go before and after the advice to ``call`` after it."""
    if gated(model):
        raise ValueError(f"{name}: is inside a headprune.gates block{why}; {call} after the block ends{note}")


def _check_fill(fill, num_heads: list, dims: list) -> None:
    want = [len(num_heads), max(num_heads, default=0), max(dims, default=0)]
    if not isinstance(fill, torch.Tensor) or not fill.is_floating_point():
        raise TypeError(f"fill: expected a floating-point tensor {want} [sites, heads, head_dim], got {_describe(fill)}")
    if fill.dim() != 3 or any(a < b for a, b in zip(fill.shape, want)):
        raise ValueError(f"fill: expected shape {want} [sites, heads, head_dim], got {list(fill.shape)}")
    for i, (h, d) in enumerate(zip(num_heads, dims)):
        if not torch.isfinite(fill[i, :h, :d]).all():
            raise ValueError(f"fill: site {i} has values that are not finite (NaN marks heads never seen: "
                             "fill them first, e.g. with torch.nan_to_num)")


@contextmanager
def frozen(model) -> Iterator:
    """``model`` with no parameter requiring grad and in eval mode (gradients reach gates and
    inputs only); every parameter's ``requires_grad`` and the train/eval mode are restored on
    every exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        with eval_mode(model):  # every module's own flag back after, not the top level's for all
            for p in flags:
                p.requires_grad_(False)
            yield model
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def _default_dtype(weight: torch.Tensor) -> torch.dtype:
    # float16/bfloat16 gates would round soft values and accumulate their gradients coarsely
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@contextmanager
def gates(model, init: float = 1.0, *, per_example: bool = False,
          values: Optional[torch.Tensor] = None, fill: Optional[torch.Tensor] = None) -> Iterator[HeadGates]:
    """Gate every attention head of ``model`` for the duration of the ``with`` block.

    Yields a :class:`HeadGates` whose ``gate`` multiplies each head's output (the heads' slice
    of the output projection's input; transformers 4's ``head_mask``). It is, by default, a
    new leaf ``[sites, max_heads]`` tensor filled with ``init`` that requires grad, float32
    (float64 for a float64 model) on the first output projection's device: after
    ``loss.backward()``, ``g.gate.grad`` holds dL/dgate. In a float16 or bfloat16 model the
    forward multiplies by the gate rounded to the activations' type (on bfloat16, 0.999 and 1.0
    give the same outputs); the gate itself and its gradient stay float32.

    ``values``: the caller's own gate tensor instead (used as given, gradients land on it
    if it requires grad). ``per_example=True``: the gates are ``[batch, sites, max_heads]``,
    one row per example; pass them as ``values`` or assign ``g.gate`` before the forward pass.

    ``fill``: what a closed gate leaves in the head's place, ``[sites, max_heads, head_dim]``
    (for example ``HeadScores.output_mean()``, so a closed head is replaced by its mean output
    as mean compensation does): a head gated by ``g`` outputs ``g * x + (1 - g) * fill``.
    Default: nothing (zero), transformers 4's ``head_mask``.

    The head layout is the model's at entry (do not mask or prune inside the block). The
    hooks are removed on every exit path; the model's weights are never touched.
    """
    check_module(model, meta=True)
    if not isinstance(per_example, bool):
        raise TypeError(f"per_example: expected a bool, got {type(per_example).__name__}")
    if isinstance(init, bool) or not isinstance(init, numbers.Real):
        raise TypeError(f"init: expected a real number, got {type(init).__name__}")
    if not math.isfinite(init) or abs(init) > torch.finfo(torch.float32).max:  # the gates are float32 or wider
        raise ValueError(f"init: expected a finite gate value within float32's range, got {init!r}")
    if uncompiled(model) is not model:  # its compiled graph, run before, never calls the hooks (module doc)
        raise ValueError("model: a torch.compile'd module runs the graph it compiled, which the gates' hooks do not "
                         "reach; pass the module it compiles (model._orig_mod) and compile inside the block")
    adapter = get_adapter(model)
    check_layout(model)
    sites = resolve_sites(model, adapter)
    if compiled := compiled_over(model, [s.o for s in sites]):  # compiled in place, the model or layers of it
        raise ValueError(f"model: {compiled[0][0] or 'the model'} was compiled in place (module.compile()); its "
                         "graph, once run, does not call the gates' hooks: gate a model not compiled in place and "
                         "compile inside the block (torch.compile(model))")
    handle = HeadGates([s.name for s in sites], [head_counts(s, adapter)[0] for s in sites], per_example)
    dims = [head_dim(s, adapter) for s in sites]
    if fill is not None:
        _check_fill(fill, handle.num_heads, dims)
    if values is not None:
        handle._gate = handle._checked("values", values)
    elif not per_example:
        handle._gate = torch.full(handle.shape, float(init), dtype=_default_dtype(sites[0].o.weight),
                                  device=execution_device(model, sites[0].o), requires_grad=True)
    with ExitStack() as stack:
        for site in sites:
            hook = _pre_hook(handle, site.index, dims[site.index], fill)
            stack.callback(site.o.register_forward_pre_hook(hook).remove)
        yield handle
