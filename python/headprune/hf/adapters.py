"""Per-family attention layouts as data, keyed by ``config.model_type``.

An adapter says where each attention block lives (relative to ``model.base_model``), how its
projections are laid out (split q/k/v or one fused matrix), which module attributes hold the
head counts that the family's ``forward`` reads, and which config fields describe them. The
code in :mod:`collect`, :mod:`prune` and :mod:`io` is family-agnostic and only reads these
records. Paths were checked against the transformers 5 modeling files.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

__all__ = ["Adapter", "Site", "Block", "ADAPTERS", "get_adapter", "resolve_sites", "supported_model_types"]


@dataclass(frozen=True)
class Block:
    """One kind of attention block of a family (e.g. T5's decoder cross-attention).

    Paths are dotted, ``layers`` relative to the base model and the rest relative to one
    layer. ``module`` is the module handed to the attention interface (its attributes hold
    the head counts); ``o`` is the output projection whose input columns are the heads.
    """

    layers: str
    module: str
    o: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None  # fused projection, rows laid out q | k | v
    stack: str = ""  # "encoder" / "decoder" for encoder-decoders, "" otherwise
    kind: str = "self"  # "self" or "cross"
    padding_key: Optional[str] = "attention_mask"  # batch key masking this block's queries
    causal: bool = True  # queries attend only to earlier keys (decoder self-attention)
    name: str = "{i}"  # site name, {i} = the layer's index in its stack


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: tuple
    # what the family's models are: "causal" (a decoder-only LM, loaded with
    # AutoModelForCausalLM), "encoder" (AutoModel) or "seq2seq" (encoder-decoder)
    kind: str
    head_dim_attr: str
    # module attribute -> one of "heads", "kv_heads", "groups", "inner" (heads * head_dim)
    module_attrs: dict = field(default_factory=dict)
    kv_heads_attr: Optional[str] = None  # module attr with the KV head count (fused GQA)
    config_kv_heads: Optional[str] = None  # config field, GQA families only
    config_head_dim: Optional[str] = None  # set => a uniformly pruned config stays loadable
    # config flag that gives every q/k/v/o projection a bias (Llama's attention_bias): a
    # uniform layout with compensation biases saves with it set and zero q/k/v biases
    config_bias: Optional[str] = None
    conv1d: bool = False  # GPT-2 stores weights as [in, out]
    reads_config_heads: bool = False  # forward reads config.num_attention_heads (Phi-3)
    # what a block with no head left returns (see prune.empty_forward): "output" (its o
    # projection's bias), "context" (a zero-width context for an o projection outside the
    # block) or "output_position_bias" (the output and the position bias it was handed)
    empty: str = "output"
    # per-head weights other than q/k/v/o: (submodule of the attention module, weight dim)
    extras: tuple = ()
    shared_position_bias: bool = False  # T5: layer 0's bias is reused by the whole stack
    # parts the base model builds only if a constructor argument says so: (path relative to the
    # model, argument). A checkpoint without them (BERT saved with add_pooling_layer=False) is
    # rebuilt without them instead of with random ones, and one with them is rebuilt with them
    optional: tuple = ()


_LLAMA_LIKE = dict(
    kind="causal",
    blocks=(Block("layers", "self_attn", "self_attn.o_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    head_dim_attr="head_dim",
    module_attrs={"num_key_value_groups": "groups"},
    config_kv_heads="num_key_value_heads",
    config_head_dim="head_dim",
)

_BERT_LIKE = dict(
    kind="encoder",
    blocks=(
        Block(
            "encoder.layer", "attention.self", "attention.output.dense",
            "attention.self.query", "attention.self.key", "attention.self.value", causal=False,
        ),
    ),
    head_dim_attr="attention_head_size",
    module_attrs={"num_attention_heads": "heads", "all_head_size": "inner"},
    empty="context",
    optional=(("pooler", "add_pooling_layer"),),
)


def _t5_blocks():
    def attn(stack, idx, name, kind, padding_key, causal):
        p = f"layer.{idx}.{name}"
        return Block(f"{stack}.block", p, f"{p}.o", f"{p}.q", f"{p}.k", f"{p}.v", stack=stack, kind=kind,
                     padding_key=padding_key, causal=causal, name=f"{stack}.{{i}}.{kind}")

    return (
        attn("encoder", 0, "SelfAttention", "self", "attention_mask", causal=False),
        attn("decoder", 0, "SelfAttention", "self", "decoder_attention_mask", causal=True),
        attn("decoder", 1, "EncDecAttention", "cross", "decoder_attention_mask", causal=False),
    )


ADAPTERS = {
    a.model_type: a
    for a in [
        Adapter("bert", **_BERT_LIKE),
        Adapter("roberta", **_BERT_LIKE),
        Adapter(
            "distilbert",
            kind="encoder",
            blocks=(Block("transformer.layer", "attention", "attention.out_lin", "attention.q_lin", "attention.k_lin",
                          "attention.v_lin", causal=False),),
            head_dim_attr="attention_head_size",
            module_attrs={"n_heads": "heads"},
        ),
        Adapter(
            "gpt2",
            kind="causal",
            blocks=(Block("h", "attn", "attn.c_proj", qkv="attn.c_attn"),),
            head_dim_attr="head_dim",
            module_attrs={"num_heads": "heads", "split_size": "inner"},
            conv1d=True,
        ),
        Adapter(
            "opt",
            kind="causal",
            blocks=(
                Block("decoder.layers", "self_attn", "self_attn.out_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ),
            head_dim_attr="head_dim",
            module_attrs={"num_heads": "heads"},
        ),
        *[Adapter(t, **_LLAMA_LIKE) for t in ("mistral", "qwen2")],
        *[Adapter(t, **_LLAMA_LIKE, config_bias="attention_bias") for t in ("llama", "qwen3", "gemma2")],
        Adapter(
            "phi3",
            kind="causal",
            blocks=(Block("layers", "self_attn", "self_attn.o_proj", qkv="self_attn.qkv_proj"),),
            head_dim_attr="head_dim",
            module_attrs={"num_key_value_groups": "groups", "num_key_value_heads": "kv_heads"},
            kv_heads_attr="num_key_value_heads",
            config_kv_heads="num_key_value_heads",
            config_head_dim="head_dim",
            reads_config_heads=True,
        ),
        Adapter(
            "vit",
            kind="encoder",
            blocks=(
                Block(
                    "layers", "attention", "attention.o_proj", "attention.q_proj", "attention.k_proj",
                    "attention.v_proj", padding_key=None, causal=False,
                ),
            ),
            head_dim_attr="head_dim",
            module_attrs={"num_attention_heads": "heads"},
            config_head_dim="head_dim",
            optional=(("pooler", "add_pooling_layer"), ("embeddings.mask_token", "use_mask_token")),
        ),
        Adapter(
            "t5",
            kind="seq2seq",
            blocks=_t5_blocks(),
            head_dim_attr="key_value_proj_dim",
            module_attrs={"n_heads": "heads", "inner_dim": "inner"},
            config_head_dim="d_kv",
            empty="output_position_bias",
            extras=(("relative_attention_bias", 1),),
            shared_position_bias=True,
        ),
    ]
}


def supported_model_types() -> list:
    return sorted(ADAPTERS)


def get_adapter(model) -> Adapter:
    """The adapter for ``model`` (a ``PreTrainedModel``), or a ``ValueError`` naming the
    supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None and isinstance(model, nn.Module) and any(isinstance(m, nn.MultiheadAttention)
                                                                for m in model.modules()):
        raise ValueError(f"model: {type(model).__name__} has no transformers config; plain torch models are "
                         "collected and masked (collect, mask_heads), not pruned, saved or reloaded")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model: unsupported model_type {model_type!r} ({type(model).__name__}); "
            f"headprune supports {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]


@dataclass
class Site:
    """One resolved attention block of one layer: its site index (the index of scores,
    rankings and pruning), its layer's index within the stack (``depth``), and live
    references to the layer module its block paths start from (``parent``) and to the
    attention module."""

    index: int
    name: str  # e.g. "decoder.1.cross"
    block: Block
    depth: int
    parent: nn.Module
    module: nn.Module

    def sub(self, path: Optional[str]) -> Optional[nn.Module]:
        return None if path is None else self.parent.get_submodule(path)

    @property
    def o(self) -> nn.Module:
        return self.sub(self.block.o)


def encoder_decoder(model, adapter: Optional[Adapter] = None) -> bool:
    """Whether ``model`` has an encoder and a decoder (T5; not T5EncoderModel, whose one stack is
    an encoder)."""
    adapter = adapter or get_adapter(model)
    return adapter.kind == "seq2seq" and getattr(model.config, "is_encoder_decoder", True)


def o_column_norms(site: "Site", adapter: Adapter):
    """The squared norm of each input column of ``site``'s output projection (float64, ``[heads x
    head_dim]``): what the output statistics record of it (``OutputStat.COUNT_NORM``)."""
    w = site.o.weight.detach()
    return (w.double() ** 2).sum(1 if adapter.conv1d else 0)


def _base(model) -> nn.Module:
    return getattr(model, "base_model", model)


def resolve_sites(model, adapter: Optional[Adapter] = None) -> list:
    """Every attention site of ``model``, ordered block by block (for T5: encoder self,
    decoder self, decoder cross), layers in order within a block."""
    adapter = adapter or get_adapter(model)
    base = _base(model)
    _warn_unlisted_cross_attention(model, adapter)
    sites = []
    present = {b.stack for b in adapter.blocks if b.stack} & dict(base.named_children()).keys()
    for block in adapter.blocks:
        if block.stack and present and block.stack not in present:
            continue  # one stack of an encoder-decoder family (T5EncoderModel: the encoder)
        try:
            layers = base.get_submodule(block.layers)
        except AttributeError as e:
            raise ValueError(
                f"model: {type(model).__name__} has no {block.layers!r} although its model_type is "
                f"{adapter.model_type!r}; is it a supported architecture?"
            ) from e
        for i, layer in enumerate(layers):
            sites.append(Site(len(sites), block.name.format(i=i), block, i, layer, layer.get_submodule(block.module)))
    seen = {}
    for site in sites:  # one module in two layers (weights shared, ALBERT-style): pruning one prunes both
        for what, obj in _shared_parts(site):
            if (first := seen.setdefault(id(obj), (site, what)))[0] is not site:
                raise ValueError(f"model: sites {first[0].index} ({first[0].name}) and {site.index} ({site.name}) "
                                 f"share {'one attention module' if what == 'attention' else f'their {what}'}; "
                                 "headprune collects, masks and prunes each layer's attention on its own and does not "
                                 "support attention weights shared between layers")
    return sites


_WARNED = weakref.WeakSet()  # models already told of their cross-attention: once each


def _warn_unlisted_cross_attention(model, adapter: Adapter) -> None:
    """A BERT, RoBERTa or GPT-2 built with ``add_cross_attention`` has ``crossattention`` modules
    that no block of its adapter names (families whose code builds none ignore the flag)."""
    if model in _WARNED or any(b.kind == "cross" for b in adapter.blocks):
        return
    if not getattr(getattr(model, "config", None), "add_cross_attention", False):
        return
    if any(name.rpartition(".")[2] == "crossattention" for name, _ in model.named_modules()):
        _WARNED.add(model)
        warnings.warn(f"model: {type(model).__name__} has cross-attention layers (add_cross_attention), which "
                      "headprune neither collects nor masks nor prunes: only its self-attention heads are scored "
                      "and removed", stacklevel=3)


def _shared_parts(site: Site) -> list:
    """``[(what, object)]``: the attention module of ``site``, its projections and their weights,
    none of which another site may hold (a mask or a pruning of one would change both)."""
    parts = [("attention", site.module)]
    for name, module in projections(site).items():
        parts += [(name, module)] + [(f"{name}.{n}", p) for n, p in module.named_parameters(recurse=False)]
    return parts


def projections(site: Site) -> dict:
    """``{path: module}``: the q/k/v/o (or fused qkv) projections of ``site``."""
    b = site.block
    return {name: site.sub(name) for name in dict.fromkeys(p for p in (b.q, b.k, b.v, b.o, b.qkv) if p)}


def projection_parameters(sites: list) -> list:
    """The parameters of every projection of ``sites``: what masks and prunings edit."""
    return [p for s in sites for m in projections(s).values() for p in m.parameters(recurse=False)]


def head_dim(site: Site, adapter: Adapter) -> int:
    return int(getattr(site.module, adapter.head_dim_attr))


def out_features(module: nn.Module, conv1d: bool) -> int:
    return module.weight.shape[1] if conv1d else module.weight.shape[0]


def head_counts(site: Site, adapter: Adapter) -> tuple:
    """``(query heads, KV heads)`` of a site as its forward will see them."""
    d = head_dim(site, adapter)
    b = site.block
    if b.qkv is None:
        return out_features(site.sub(b.q), adapter.conv1d) // d, out_features(site.sub(b.k), adapter.conv1d) // d
    total = out_features(site.sub(b.qkv), adapter.conv1d) // d
    if adapter.kv_heads_attr is None:  # equal thirds (GPT-2)
        return total // 3, total // 3
    kv = int(getattr(site.module, adapter.kv_heads_attr))
    return total - 2 * kv, kv


def check_layout(model) -> None:
    """Raise ``ValueError`` if a site's weights do not match its head layout."""
    adapter = get_adapter(model)
    for site in resolve_sites(model, adapter):
        hq, hkv = head_counts(site, adapter)
        o_in = site.o.weight.shape[0 if adapter.conv1d else 1]
        d = head_dim(site, adapter)
        if hkv == 0 and hq != 0 or (hkv and hq % hkv) or o_in != hq * d:
            raise ValueError(f"model: site {site.name} has an inconsistent head layout ({hq} q, {hkv} kv, o in {o_in})")
