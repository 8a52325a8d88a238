"""Moments for the joint value/output refit (:mod:`headprune.prune.values`) of a selection.

For every site with heads to remove, one forward of the unpruned model over the calibration
batches sums, over the valid tokens, ``[z_K, 1][z_K, 1]^T`` and ``y [z_K, 1]^T``: ``z_h = A_h x``
is head ``h``'s attention applied to the value projection's input (``[hidden]`` per token),
``K`` the heads the selection keeps, ``y`` the output projection's output. ``z`` comes from
the model's own attention function called a second time with the value projection's input as
the values, so masks, scaling and windows are the model's. Memory: ``(|K| hidden + 1)^2``
float64 per site (all-MiniLM-L6-v2 keeping 8 of 12 heads: 75 MB a layer), which is what limits
the refit to small models; ``max_bytes`` refuses more before anything runs.

Supported where a site has its own value projection (``nn.Linear``) and as many KV heads as
query heads (BERT, RoBERTa, DistilBERT, ViT, OPT, T5; not GPT-2's fused ``Conv1D`` nor grouped-query
models, whose shared value heads would tie the kept heads' refits together).
"""

from __future__ import annotations

import numbers
import threading
import types
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .adapters import get_adapter, head_counts, resolve_sites
from .attention import RECORDERS, _inner_function, attention_implementation, config_of, model_configs
from .batches import check_batches, forward_kwargs
from .gates import refuse_gated
from ..core.modules import eval_mode, ordinary_tensors
from ..stats.moments import check_finite
from .prune import kept_heads, positions
from .removal import PROJECTION_RTOL, projection_change

__all__ = ["ValueMoments", "collect_values", "DEFAULT_MAX_BYTES", "refits_values_by_default", "supports_values"]

#: refuse value moments larger than this in all (float64 sums)
DEFAULT_MAX_BYTES = 4 << 30

_CHUNK = 1024  # token rows multiplied at a time (see _accumulate)


@dataclass
class ValueMoments:
    """Per site of ``heads`` (current positions, as ``mask_heads`` takes them): the kept heads,
    ``gram`` (sums of ``[z_K, 1][z_K, 1]^T``) and ``cross`` (sums of ``y [z_K, 1]^T``)."""

    heads: dict
    kept: dict
    gram: dict
    cross: dict
    layout: Optional[dict] = None  # {site: original ids of its heads} when collected (positions name them)
    weights: Optional[dict] = None  # {site: (output projection, value projection) weights} when collected

    def check(self, heads: dict, layout: Optional[dict] = None, sites: Optional[list] = None) -> None:
        """``ValueError`` unless these moments were collected for exactly ``heads``, on a model
        whose heads were ``layout`` (``{site: original ids}``, where given) and whose sites
        (``sites``, where given) have the output and value projections they were collected with."""
        want = {int(k): sorted(v) for k, v in heads.items() if v}
        have = {int(k): sorted(v) for k, v in self.heads.items() if v}
        if want != have:
            raise ValueError(f"values: collected for heads {have}, but the removal is of {want}; collect_values "
                             "with the heads being removed")
        other = [k for k in self.layout or {} if layout is not None and list(layout[k]) != list(self.layout[k])]
        if other:
            raise ValueError(f"values: collected when site {other[0]} held heads {self.layout[other[0]]}, it now holds "
                             f"{list(layout[other[0]])}; collect_values again")
        for layer, pair in (self.weights or {}).items() if sites is not None else ():
            site = sites[layer]
            for what, then, now in zip(("output", "value"), pair, (site.o.weight, site.sub(site.block.v).weight)):
                change = projection_change(now.detach(), then)
                if change is None or change > PROJECTION_RTOL:
                    how = "another shape" if change is None else f"a relative change of {change:.3g}"
                    raise ValueError(f"values: site {layer}'s {what} projection differs from the one the value "
                                     f"moments were collected with ({how}): moments of another model or of these "
                                     "weights before they changed; collect_values on the model as it is")


def _supported(site, adapter) -> str:
    """Why a site cannot take the value refit, or ``""``."""
    hq, hkv = head_counts(site, adapter)
    if site.block.v is None or adapter.conv1d:
        return f"{adapter.model_type} has a fused q/k/v projection"
    if hq != hkv:
        return f"site {site.name} shares {hkv} value heads among {hq} query heads"
    if not isinstance(site.sub(site.block.v), nn.Linear):
        return f"site {site.name}'s value projection is not an nn.Linear"
    return ""


def supports_values(model) -> bool:
    """Whether every attention site of ``model`` can take the value refit."""
    adapter = get_adapter(model)
    return not any(_supported(s, adapter) for s in resolve_sites(model, adapter))


def refits_values_by_default(model) -> bool:
    """Whether ``headprune prune`` refits value rows without being asked: on encoders (where it
    was measured, see docs/quality.md) that support it."""
    return get_adapter(model).kind == "encoder" and supports_values(model)


def plan_sites(model, heads: dict) -> tuple:
    """``(adapter, sites, heads at current positions)``, or ``ValueError`` naming ``values``
    for a site the refit does not support."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    heads, _ = positions(model, sites, adapter, heads)
    heads = {k: v for k, v in heads.items() if v}
    for layer in heads:
        why = _supported(sites[layer], adapter)
        if why:
            raise ValueError(f"values: the value refit needs a separate value projection per query head; {why}")
    return adapter, sites, heads


def _check_memory(model, sites, adapter, kept: dict, max_bytes: int) -> None:
    need = 0
    for layer, k in kept.items():
        site = sites[layer]
        width = len(k) * site.sub(site.block.v).in_features + 1
        need += 8 * width * (width + site.o.out_features)
    if need > max_bytes:
        raise ValueError(f"values: the value refit's moments need {need:,} bytes ({need / 2**20:,.1f} MiB; max_bytes="
                         f"{max_bytes:,}); it is meant for small models, pass a larger max_bytes to go on")


def _kept_heads(t, kept: list, heads: int):
    """A ``[batch, heads, q, k]`` tensor argument of the attention cut to the kept heads; others as given."""
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == heads > 1:
        return t[:, kept]
    return t


class _Collection:
    """The accumulators of one value-moment collection and the hooks that fill them."""

    def __init__(self, model, sites, kept: dict):
        self.sites, self.kept = sites, kept
        self.gram, self.cross, self.inputs, self.pending, self.padding = {}, {}, {}, {}, {}
        self.impl = {id(c): c._attn_implementation_internal or "eager" for c in model_configs(model)}
        self.thread = threading.get_ident()

    def value_input(self, layer):
        def hook(module, args):
            if threading.get_ident() == self.thread:
                self.inputs[layer] = args[0].detach()
        return hook

    def recorder(self, layer):
        def attend(module, query, key, value, mask, args, kwargs):
            x = self.inputs.pop(layer, None)
            if x is None or x.dim() != 3 or x.shape[1] != key.shape[2]:
                raise RuntimeError(f"values: site {self.sites[layer].name}: the value projection's input does not "
                                   "match the keys (a cache, or an attention this collection does not follow)")
            k, h = self.kept[layer], query.shape[1]
            xs = x[:, None].expand(x.shape[0], len(k), x.shape[1], x.shape[2])
            mask = _kept_heads(mask, k, h)  # per-head biases (T5's relative positions) go with their heads
            kwargs = {name: _kept_heads(v, k, h) for name, v in kwargs.items()}
            inner = _inner_function(self.impl[id(config_of(module))], module)
            z = inner(module, query[:, k], key[:, k], xs, mask, *args, **kwargs)[0]
            self.pending[layer] = z.detach().reshape(z.shape[0], z.shape[1], -1)  # [B, S, |K| hidden]
            return None  # the model's own attention runs as usual
        return types.SimpleNamespace(attend=attend, record=lambda *a, **kw: None, thread=self.thread)

    def output(self, layer):
        key = self.sites[layer].block.padding_key

        def hook(module, args, out):
            if threading.get_ident() != self.thread:
                return
            z = self.pending.pop(layer)
            y, z = out.detach().reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1])
            mask = self.padding.get(key)
            if mask is not None:
                valid = mask[:, mask.shape[1] - out.shape[1]:].reshape(-1).to(z.device, torch.bool)
                z, y = z[valid], y[valid]
            if layer not in self.gram:
                w = z.shape[1] + 1
                self.gram[layer] = torch.zeros(w, w, dtype=torch.float64, device=z.device)
                self.cross[layer] = torch.zeros(y.shape[1], w, dtype=torch.float64, device=z.device)
            _accumulate(self.gram[layer], self.cross[layer], z, y, len(self.kept[layer]))
        return hook

    def moments(self) -> tuple:
        """``(gram, cross)`` by site, on the CPU, each gram's lower blocks mirrored from the upper."""
        for g in self.gram.values():
            upper = torch.triu(g)
            g.copy_(upper + upper.t() - torch.diag(g.diagonal()))
        return ({k: v.cpu() for k, v in self.gram.items()}, {k: v.cpu() for k, v in self.cross.items()})


def _accumulate(g: torch.Tensor, c: torch.Tensor, z: torch.Tensor, y: torch.Tensor, heads: int) -> None:
    """``g += [z, 1]^T [z, 1]`` (the blocks on and above the diagonal: the gram is symmetric),
    ``c += y^T [z, 1]``; float64 sums of float32 products over chunks of at most ``_CHUNK`` rows
    (the products dominate the cost, and a chunk's float32 sum is exact to about 1e-6 relative)."""
    w = z.shape[1] // heads
    for s in range(0, z.shape[0], _CHUNK):
        zz, yy = z[s:s + _CHUNK].float(), y[s:s + _CHUNK].float()
        for h in range(heads):
            g[h * w:(h + 1) * w, h * w:-1] += zz[:, h * w:(h + 1) * w].t() @ zz[:, h * w:]
        total = zz.double().sum(0)
        g[:-1, -1] += total
        g[-1, :-1] += total
        g[-1, -1] += zz.shape[0]
        c[:, :-1] += yy.t() @ zz
        c[:, -1] += yy.double().sum(0)


@ordinary_tensors  # the moments, even when called in inference mode
@torch.no_grad()
def collect_values(model, batches: list, heads: dict, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   progress: bool = False) -> ValueMoments:
    """The moments of the joint value/output refit of removing ``heads`` (``{site: [heads]}``),
    from one forward of ``model`` (unpruned, as for ``collect``) over ``batches``. The model is
    left as it was (eval mode during the forward, every module's training flag restored)."""
    from tqdm.auto import tqdm

    from ..prune.mask import active_masks

    check_batches(batches)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Real) or not max_bytes > 0:
        raise ValueError(f"max_bytes: expected a positive number of bytes, got {max_bytes!r}")
    if active_masks(model):  # the moments would be the masked model's, and the refit is of the unpruned one
        raise ValueError("model: a mask_heads handle is active on it; restore() it first (the value moments are "
                         "taken on the model the heads are removed from)")
    refuse_gated(model, "collect_values", note=" (the value moments are taken on the model the heads are removed "
                 "from)")  # likewise: the gates would scale what the moments hold
    adapter, sites, heads = plan_sites(model, heads)
    kept = {layer: [h for h in range(head_counts(sites[layer], adapter)[0]) if h not in set(hs)]
            for layer, hs in heads.items()}
    kept = {k: v for k, v in kept.items() if v}
    _check_memory(model, sites, adapter, kept, max_bytes)
    if any(id(sites[layer].module) in RECORDERS for layer in kept):
        raise RuntimeError("model: a headprune collection is already active on this model")
    run = _Collection(model, sites, kept)
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        for layer in kept:
            site = sites[layer]
            stack.callback(site.sub(site.block.v).register_forward_pre_hook(run.value_input(layer)).remove)
            stack.callback(site.o.register_forward_hook(run.output(layer)).remove)
            RECORDERS[id(site.module)] = run.recorder(layer)
            stack.callback(RECORDERS.pop, id(site.module), None)
        stack.enter_context(attention_implementation(model))
        for batch in tqdm(batches, desc="headprune: value moments", unit="batch", disable=not progress, leave=False):
            kw = forward_kwargs(model, batch)
            run.padding = {k: v for k, v in kw.items()
                           if k in ("attention_mask", "decoder_attention_mask") and isinstance(v, torch.Tensor)}
            model(**kw)
    missing = [sites[layer].name for layer in kept if layer not in run.gram]
    if missing:
        raise ValueError(f"batches: sites {missing} saw no calibration token")
    gram, cross = run.moments()
    for layer in kept:
        check_finite("batches", sites[layer].name, gram[layer], cross[layer])
    weights = {layer: tuple(w.detach().to("cpu", copy=True) for w in (sites[layer].o.weight,
                                                                       sites[layer].sub(sites[layer].block.v).weight))
               for layer in kept}
    return ValueMoments(heads={k: list(v) for k, v in heads.items()}, kept=kept, gram=gram, cross=cross,
                        layout=kept_heads(model), weights=weights)
