"""Generic PyTorch support: ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` models.

Every ``nn.MultiheadAttention`` is an attention site, in ``named_modules`` order. Queries and
keys are recomputed from the module's input projection inside a forward pre-hook and fed
to the streaming entropy op; the forward itself is untouched. ``nn.TransformerEncoderLayer``
is hooked at the layer, because its inference fast path never calls its attention module.
Pruning is by masking (``out_proj`` input columns), since ``nn.MultiheadAttention`` requires
``num_heads * head_dim == embed_dim``.
"""

from __future__ import annotations

import operator
import weakref
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .scores import NUM_STATS, HeadScores, accumulate_qk_

__all__ = ["attention_modules", "collect_modules", "mask_modules", "MaskHandle", "normalize_heads"]


def normalize_heads(heads, counts: list, arg: str = "heads") -> dict:
    """``{layer: sorted unique heads}`` after checking types and ranges."""
    if not isinstance(heads, dict):
        raise TypeError(f"{arg}: expected a dict {{layer: [heads]}}, got {type(heads).__name__}")
    out = {}
    for layer, hs in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(counts):
            raise ValueError(f"{arg}: layer {layer!r} is not an index in [0, {len(counts)})")
        try:
            # operator.index refuses floats (1.7 is no head index) but takes numpy / 0-d tensor ints
            hs = sorted({_index(h) for h in hs})
        except (TypeError, ValueError) as e:
            raise TypeError(f"{arg}: layer {layer}: expected a list of head indices, got {hs!r}") from e
        bad = [h for h in hs if not 0 <= h < counts[layer]]
        if bad:
            raise ValueError(f"{arg}: layer {layer} has {counts[layer]} heads, got indices {bad}")
        if hs:
            out[layer] = hs
    return out


def _index(h) -> int:
    if isinstance(h, bool):
        raise TypeError("bool is not a head index")
    return operator.index(h)


def head_index(heads, d: int, offset: int = 0) -> torch.Tensor:
    """Row/column indices of ``heads`` in a dimension laid out as ``heads x d``."""
    return torch.tensor([offset + h * d + j for h in heads for j in range(d)], dtype=torch.long)


def apply_head_mask_(w: torch.Tensor, mask: torch.Tensor, d: int, dim: int) -> None:
    ops.apply_head_mask_(w, mask.to(device=w.device, dtype=w.dtype), d, dim)


class MaskHandle:
    """Undo record of a head masking: ``restore()`` (or leaving the ``with`` block) puts the
    original output-projection columns back bit-exactly.

    Handles not yet restored are tracked (weakly: a handle that is dropped unrestored leaves
    a permanent mask), so masking a masked head again, or physically pruning a model under
    an active mask, is refused instead of making ``restore`` order-dependent or a no-op.
    """

    _active: "weakref.WeakSet" = weakref.WeakSet()

    def __init__(self, heads: dict):
        self.heads = heads
        self._saved = []  # (weight, dim, index, original columns, heads)
        self._biases = []  # (module, original bias values, or None where the bias was added)

    @classmethod
    def masked(cls, w: torch.Tensor) -> set:
        """Heads of weight ``w`` zeroed by handles not yet restored."""
        return {h for handle in list(cls._active) for x, *_, hs in handle._saved if x is w for h in hs}

    def zero_(self, w: torch.Tensor, heads, num_heads: int, d: int, dim: int) -> None:
        idx = head_index(heads, d)
        self._saved.append((w, dim, idx, w.index_select(dim, idx.to(w.device)).clone(), tuple(heads)))
        MaskHandle._active.add(self)
        gate = torch.ones(num_heads)
        gate[heads] = 0
        apply_head_mask_(w, gate, d, dim)

    @classmethod
    def added_bias(cls, module: nn.Module) -> bool:
        """Whether an active handle created ``module.bias`` (the module had none)."""
        return any(m is module and old is None for handle in list(cls._active) for m, old in handle._biases)

    def add_bias_(self, module: nn.Module, b: torch.Tensor) -> None:
        """Add ``b`` to ``module.bias`` in place (creating the bias if the module has none)."""
        MaskHandle._active.add(self)
        bias = getattr(module, "bias", None)
        if bias is None:
            self._biases.append((module, None))
            module.bias = nn.Parameter(b.to(module.weight.dtype), requires_grad=False)
        else:
            self._biases.append((module, bias.detach().clone()))
            bias.add_(b.to(bias.device, bias.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            while self._biases:
                module, old = self._biases[-1]
                if old is None:
                    module.bias = None
                else:
                    module.bias.copy_(old)
                self._biases.pop()
            while self._saved:
                w, dim, idx, cols, _ = self._saved[-1]
                w.index_copy_(dim, idx.to(w.device), cols)
                self._saved.pop()
        MaskHandle._active.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def refuse_masked_again(heads: dict, weights: list) -> None:
    """``ValueError`` if a head of ``heads`` is already zeroed by an active handle."""
    for layer, hs in heads.items():
        again = sorted(set(hs) & MaskHandle.masked(weights[layer]))
        if again:
            raise ValueError(
                f"heads: layer {layer} head(s) {again} are already masked by an active mask_heads handle; restore it first"
            )


def attention_modules(model: nn.Module) -> list:
    """``[(name, nn.MultiheadAttention, owning TransformerEncoderLayer or None)]``."""
    owners = {id(m.self_attn): m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)}
    found = [(n, m, owners.get(id(m))) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no nn.MultiheadAttention and no transformers config")
    return found


def _project(mha: nn.MultiheadAttention, x: torch.Tensor, which: int) -> torch.Tensor:
    """``[B, H, L, D]`` query (``which=0``) or key (``1``) heads of batch-first input ``x``."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight[which * e : (which + 1) * e]
    else:
        w = mha.q_proj_weight if which == 0 else mha.k_proj_weight
    b = None if mha.in_proj_bias is None else mha.in_proj_bias[which * e : (which + 1) * e]
    y = F.linear(x, w, b)
    return y.view(x.shape[0], x.shape[1], mha.num_heads, mha.head_dim).transpose(1, 2)


def _attend_mask(attn_mask, key_padding_mask, batch, heads):
    """Combine torch's masks (bool True = *blocked*, or additive float) into one mask for
    the op (bool True = attend, or additive float), broadcastable to ``[B, H, Q, K]``."""
    out = None
    if attn_mask is not None:
        m = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        out = m.view(batch, heads, *m.shape[-2:]) if m.dim() == 3 else m
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        kp = ~kp if kp.dtype == torch.bool else kp
        if out is None:
            out = kp
        elif out.dtype == torch.bool and kp.dtype == torch.bool:
            out = out & kp
        else:
            to_add = lambda m: m if m.dtype != torch.bool else torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))  # noqa: E731
            out = to_add(out) + to_add(kp)
    return out


class _Session:
    def __init__(self, model):
        self.sites = attention_modules(model)
        self.stats = [None] * len(self.sites)
        self.padding = None  # key padding mask captured at nn.TransformerEncoder level

    def record(self, i, mha, query, key, attn_mask=None, key_padding_mask=None):
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError(f"{self.sites[i][0]}: add_bias_kv / add_zero_attn are not supported")
        if not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        q, k = _project(mha, query, 0), _project(mha, key, 1)
        if self.stats[i] is None:
            self.stats[i] = torch.zeros(mha.num_heads, NUM_STATS, dtype=torch.float64, device=q.device)
        qm = None
        if key_padding_mask is not None and query.shape[1] == key.shape[1]:
            # torch canonicalises bool padding masks to additive floats (-inf = padded)
            kpm = key_padding_mask
            qm = ~kpm if kpm.dtype == torch.bool else ~torch.isneginf(kpm)
        mask = _attend_mask(attn_mask, key_padding_mask, q.shape[0], q.shape[1])
        accumulate_qk_(self.stats[i], q, k, mha.head_dim**-0.5, mask, False, qm)

    def mha_hook(self, i):
        def hook(mha, args, kwargs):
            names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
            a = dict(zip(names, args), **kwargs)
            self.record(i, mha, a["query"], a["key"], a.get("attn_mask"), a.get("key_padding_mask"))

        return hook

    def layer_hook(self, i):
        def hook(layer, args, kwargs):
            a = dict(zip(("src", "src_mask", "src_key_padding_mask", "is_causal"), args), **kwargs)
            x, kpm = a["src"], a.get("src_key_padding_mask")
            if x.is_nested:  # the encoder folded the padding into a nested tensor
                x = x.to_padded_tensor(0.0)
                kpm = None if self.padding is None else self.padding[:, : x.shape[1]]
                x = x if layer.self_attn.batch_first else x.transpose(0, 1)
            x = layer.norm1(x) if layer.norm_first else x
            self.record(i, layer.self_attn, x, x, a.get("src_mask"), kpm)

        return hook

    def encoder_hook(self, enc, args, kwargs):
        a = dict(zip(("src", "mask", "src_key_padding_mask", "is_causal"), args), **kwargs)
        kpm = a.get("src_key_padding_mask")
        self.padding = kpm if kpm is None or kpm.dtype == torch.bool else torch.isneginf(kpm)

    @contextmanager
    def hooks(self, model):
        handles = []
        try:
            for enc in (m for m in model.modules() if isinstance(m, nn.TransformerEncoder)):
                handles.append(enc.register_forward_pre_hook(self.encoder_hook, with_kwargs=True))
            for i, (_, mha, owner) in enumerate(self.sites):
                target, fn = (owner, self.layer_hook(i)) if owner is not None else (mha, self.mha_hook(i))
                handles.append(target.register_forward_pre_hook(fn, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def scores(self, method) -> HeadScores:
        mhas = [s[1] for s in self.sites]
        out = HeadScores.empty(
            [m.num_heads for m in mhas], [m.num_heads for m in mhas], [m.head_dim for m in mhas],
            [s[0] for s in self.sites], ["self"] * len(mhas), model_type="torch", method=method,
        )
        for i, st in enumerate(self.stats):
            if st is not None:
                out.stats[i, : st.shape[0]] = st.cpu()
        return out


def collect_modules(model: nn.Module, batches: Iterable, *, method: str = "qk", progress: bool = False) -> HeadScores:
    """Entropies of every ``nn.MultiheadAttention`` of ``model``. Each batch is a tensor,
    a tuple of positional arguments, or a dict of keyword arguments for ``model``."""
    if method != "qk":
        raise ValueError(f"method: plain torch models support only 'qk', got {method!r}")
    session = _Session(model)
    with session.hooks(model), torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            elif isinstance(batch, torch.Tensor):
                model(batch)
            else:
                raise TypeError(f"batches: expected tensors, tuples or dicts, got {type(batch).__name__}")
    if all(s is None for s in session.stats):
        raise ValueError("batches: no attention call was recorded (empty iterable?)")
    return session.scores(method)


def mask_modules(model: nn.Module, heads: dict):
    """Zero the pruned heads' ``out_proj`` input columns (see ``headprune.hf.mask_heads``)."""
    sites = attention_modules(model)
    heads = normalize_heads(heads, [s[1].num_heads for s in sites])
    refuse_masked_again(heads, [s[1].out_proj.weight for s in sites])
    handle = MaskHandle(heads)
    try:
        with torch.no_grad():
            for layer, hs in heads.items():
                mha = sites[layer][1]
                handle.zero_(mha.out_proj.weight, hs, mha.num_heads, mha.head_dim, 1)
    except BaseException:
        handle.restore()
        raise
    return handle
