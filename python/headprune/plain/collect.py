"""Generic PyTorch support: ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` models.

Every ``nn.MultiheadAttention`` is an attention site, in ``named_modules`` order. Queries and
keys are recomputed from the module's input projection inside a forward pre-hook and fed
to the streaming entropy op; the forward itself is untouched. ``nn.TransformerEncoderLayer``
is hooked at the layer, because its inference fast path never calls its attention module; an
``nn.TransformerDecoderLayer`` too, for the target padding its cross-attention's query rows have
(that attention's own key padding is the memory's).
Pruning is by masking (:mod:`.mask`), since ``nn.MultiheadAttention`` requires
``num_heads * head_dim == embed_dim``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import ops
from ..core.modules import compiled_over, eval_mode, ordinary_tensors
from ..core.schema import NUM_STATS
from ..stats.scores import HeadScores, refuse_all_padding

__all__ = ["attention_modules", "collect_modules", "empty_scores"]


def _torch_layer(m: nn.Module) -> bool:
    """A ``TransformerEncoderLayer`` whose forward is torch's own (it may take the fast path,
    which never calls its attention module). A subclass with its own ``forward`` or
    ``_sa_block`` may feed the attention other queries and keys than the layer's input (a
    DETR-style position embedding): its attention module is hooked instead. A hook on any
    submodule keeps torch's fast path off, so such a subclass calling torch's own forward still
    calls its attention module."""
    cls, base = type(m), nn.TransformerEncoderLayer
    return isinstance(m, base) and cls.forward is base.forward and cls._sa_block is base._sa_block


def attention_modules(model: nn.Module) -> list:
    """``[(name, nn.MultiheadAttention, owning TransformerEncoderLayer or None)]``."""
    owners = {id(m.self_attn): m for m in model.modules() if _torch_layer(m)}
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
        m = ~attn_mask if attn_mask.dtype == torch.bool else _additive(attn_mask)
        out = m.view(batch, heads, *m.shape[-2:]) if m.dim() == 3 else m
    if key_padding_mask is not None:  # bool: True pads; float: added, its values at the floor pad (as its rows)
        kp = key_padding_mask[:, None, None, :]
        kp = ~kp if kp.dtype == torch.bool else _additive(kp)
        if out is None:
            out = kp
        elif out.dtype == torch.bool and kp.dtype == torch.bool:
            out = out & kp
        else:
            to_add = lambda m: m if m.dtype != torch.bool else torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))  # noqa: E731
            out = to_add(out) + to_add(kp)
    return out


#: an additive mask's value at or below which a key is masked (its probability is zero in
#: float32 and float64 softmax alike): -1e4, -1e9 and a type's minimum mask as -inf does.
#: A row of an attention mask with every key at or below it counts as masked (a padded
#: query), though torch computes its softmax shifted; values above it are biases, added
MASKED_FLOOR = -1e4


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """An additive float mask with the keys it masks (:data:`MASKED_FLOOR`) at -inf, so the op
    leaves them out of a row's key count and first visible key, as it does -inf's."""
    return mask.masked_fill(mask <= MASKED_FLOOR, float("-inf"))


def _unnest(x: torch.Tensor) -> tuple:
    """A nested ``[B, *, E]`` tensor as a zero-padded one and its padding ``[B, L]`` (True = padded)."""
    lengths = torch.tensor([t.shape[0] for t in x.unbind()], device=x.device)
    dense = x.to_padded_tensor(0.0)
    return dense, torch.arange(dense.shape[1], device=x.device)[None] >= lengths[:, None]


def _padded(padding: torch.Tensor) -> torch.Tensor:
    """The positions a key padding mask pads: True ones of a bool mask; a float mask's ones at
    or below :data:`MASKED_FLOOR` (torch adds a float mask to the keys' logits, so -1e9 masks a
    key as -inf does, and its query row is padding too; a smaller value is a bias, added, as the
    module path adds it: the collection's hooks keep torch's fused encoder layer, which pads every
    non-zero position, from running). Where the encoder folds the padding into a nested tensor
    (dropping every non-zero position), the nested tensor's own lengths say which it kept."""
    return padding if padding.dtype == torch.bool else padding <= MASKED_FLOOR


class _Session:
    def __init__(self, model):
        self.sites = attention_modules(model)
        self.stats = [None] * len(self.sites)
        self.targets = {}  # id(a decoder layer's cross-attention) -> its layer's target padding
        self.cross = {id(m.multihead_attn) for m in model.modules()  # a decoder-only subclass deletes it
                      if isinstance(m, nn.TransformerDecoderLayer) and getattr(m, "multihead_attn", None) is not None}

    def record(self, i, mha, query, key, attn_mask=None, key_padding_mask=None):
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError(f"{self.sites[i][0]}: add_bias_kv / add_zero_attn are not supported")
        # self-attention: the key padding also marks the padded queries (equal lengths alone do not
        # say so: a decoder's cross-attention to a memory as long as its queries)
        if query.is_nested or key.is_nested:  # batch-first only; the padding of the keys is the key padding
            itself = query is key
            query, qpad = _unnest(query) if query.is_nested else (query, None)
            key, kpad = (query, qpad) if itself else _unnest(key) if key.is_nested else (key, None)
            if kpad is not None:
                key_padding_mask = kpad if key_padding_mask is None else (kpad | _padded(key_padding_mask))
            if qpad is not None and not itself:
                self.targets[id(mha)] = qpad
        itself = query is key or (query.shape == key.shape and torch.equal(query, key))
        if query.dim() == 2:  # unbatched input ([L, E], key padding [S]), as torch accepts it
            query, key = query[None], key[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not mha.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        q, k = _project(mha, query, 0), _project(mha, key, 1)
        if self.stats[i] is None:
            self.stats[i] = torch.zeros(mha.num_heads, NUM_STATS, dtype=torch.float64, device=q.device)
        qm = None
        if key_padding_mask is not None and itself:
            qm = ~_padded(key_padding_mask)
        elif not itself and self.targets.get(id(mha)) is not None:  # a decoder's padded target rows
            tgt = self.targets[id(mha)]
            tgt = tgt[None] if tgt.dim() == 1 else tgt
            if tuple(tgt.shape) == tuple(q.shape[::2]):  # [B, target length]
                qm = ~_padded(tgt)
        mask = _attend_mask(attn_mask, key_padding_mask, q.shape[0], q.shape[1])
        ops.entropy_stats_from_qk_accumulate_(self.stats[i], q, k, mha.head_dim**-0.5, mask, False, qm)

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
                x, kpm = _unnest(x)  # its own lengths, whether the encoder or the caller nested it
                x = x if layer.self_attn.batch_first else x.transpose(0, 1)
            x = layer.norm1(x) if layer.norm_first else x
            self.record(i, layer.self_attn, x, x, a.get("src_mask"), kpm)

        return hook

    def decoder_hook(self, layer, args, kwargs):
        """The target padding of an ``nn.TransformerDecoderLayer``'s call, for its cross-attention,
        whose own key padding is the memory's: its padded query rows are the target's."""
        cross = getattr(layer, "multihead_attn", None)  # a decoder-only subclass deletes it
        if cross is not None:
            names = ("tgt", "memory", "tgt_mask", "memory_mask", "tgt_key_padding_mask")
            tgt = dict(zip(names, args), **kwargs).get("tgt_key_padding_mask")
            self.targets[id(cross)] = tgt if isinstance(tgt, torch.Tensor) else None

    def decoder_done(self, layer, args, output) -> None:  # None: the layer's output stays its own
        self.targets.pop(id(getattr(layer, "multihead_attn", None)), None)

    @contextmanager
    def hooks(self, model):
        handles = []
        try:
            for dec in (m for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)):
                handles.append(dec.register_forward_pre_hook(self.decoder_hook, with_kwargs=True))
                handles.append(dec.register_forward_hook(self.decoder_done))
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
            [s[0] for s in self.sites], ["cross" if id(m) in self.cross else "self" for m in mhas], model_type="torch",
            method=method,
        )
        for i, st in enumerate(self.stats):
            if st is not None:
                out.stats[i, : st.shape[0]] = st.cpu()
        return out


def empty_scores(model: nn.Module, method: str = "qk") -> HeadScores:
    """All-zero scores of ``model``'s layout (a data-parallel rank with an empty shard)."""
    return _Session(model).scores(method)


def _refuse_compiled(model: nn.Module, sites: list) -> None:
    """A compiled module around an attention of ``sites`` (:func:`attention_modules`) runs the graph
    it compiled, which never calls hooks added after it ran: its attention would record nothing (or
    part of its calls), silently."""
    for name, in_place in compiled_over(model, [m for _, m, _ in sites] + [o for _, _, o in sites if o is not None]):
        raise ValueError(f"model: {name or 'model'} is a torch.compile'd module, whose compiled graph the "
                         "collection's hooks do not reach; collect " + ("before compiling it in place" if in_place else
                                                                        "from the module it compiles (its _orig_mod)"))


@ordinary_tensors  # the statistics, even when called in inference mode
def collect_modules(model: nn.Module, batches: Iterable, *, method: str = "qk", progress: bool = False,
                    allow_empty: bool = False) -> HeadScores:
    """Entropies of every ``nn.MultiheadAttention`` of ``model``, in eval mode (dropout off;
    every module's training flag as it was afterwards). Each batch is a tensor, a tuple of
    positional arguments, or a dict of keyword arguments for ``model``. Batches that pad every
    query position are refused unless ``allow_empty`` (a data-parallel rank's share)."""
    if method != "qk":
        raise ValueError(f"method: plain torch models support only 'qk', got {method!r}")
    session = _Session(model)
    _refuse_compiled(model, session.sites)
    with session.hooks(model), torch.no_grad(), eval_mode(model):
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
    return refuse_all_padding(session.scores(method), allow_empty, "their key padding masks pad every position")
