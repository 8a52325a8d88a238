"""Tiny random configs of every supported family, built in code (nothing is downloaded).

Sizes are chosen so a forward pass takes milliseconds on a CPU: hidden 32-64, 2 layers,
vocab 100. GQA families get 4 query heads over 2 KV heads; the sliding-window families
get a window shorter than the test sequences so the window actually masks something.
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 100

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)

_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **_COMMON
)

# model_type -> (config class name, kwargs)
_CONFIGS = {
    "bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, **_COMMON)),
    "roberta": (
        "RobertaConfig",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, pad_token_id=1, **_COMMON),
    ),
    "distilbert": (
        "DistilBertConfig",
        dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_heads=4, n_layers=2, max_position_embeddings=64),
    ),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=64)),
    "opt": (
        "OPTConfig",
        dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, **_COMMON),
    ),
    "llama": ("LlamaConfig", dict(_LLAMA_LIKE)),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE, sliding_window=4)),
    "qwen2": (
        "Qwen2Config",
        dict(_LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(_LLAMA_LIKE, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=30.0),
    ),
    "phi3": ("Phi3Config", dict(_LLAMA_LIKE, pad_token_id=0)),
    "vit": (
        "ViTConfig",
        dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            image_size=16, patch_size=4, num_channels=3,
        ),
    ),
    "t5": (
        "T5Config",
        dict(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
            num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0,
        ),
    ),
}

FAMILIES = tuple(_CONFIGS)
#: transformers refuses SDPA for these (Gemma 2's logit soft-capping)
EAGER_ONLY = ("gemma2",)
GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")


def tiny_config(model_type: str, **overrides):
    name, kwargs = _CONFIGS[model_type]
    cfg = getattr(transformers, name)(**{**kwargs, **overrides})
    return cfg


def tiny_model(model_type: str, *, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A randomly initialised base model (``AutoModel``) in eval mode, float32."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    if model_type in EAGER_ONLY:
        attn_implementation = "eager"
    model = transformers.AutoModel.from_config(cfg, attn_implementation=attn_implementation)
    _spread_weights(model, seed)
    return model.eval()


def _spread_weights(model, seed):
    """Random init gives near-uniform attention at these sizes; larger weights make the heads
    differ, so rankings and pruning tests have something to distinguish."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(1.0 + 2.0 * torch.rand(p.shape[0], 1, generator=g))


def tiny_batch(model_type: str, *, batch: int = 3, seq: int = 9, seed: int = 0, pad: bool = True):
    """A batch dict for ``model_type``: right-padded token ids with an attention mask (rows
    of different lengths), or ``pixel_values`` for ViT; T5 also gets decoder inputs."""
    g = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            mask[b, seq - 2 * b :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if model_type == "t5":
        dec = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
        dmask = torch.ones_like(dec)
        if pad:
            dmask[-1, -2:] = 0
        out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    return out


def save_tiny_bert(path) -> None:
    """A tiny random BERT with a word-level tokenizer built in code, saved to ``path`` as a
    model directory the command line reads."""
    import tokenizers
    import transformers

    words = "the a of and to in was her she it he had not be".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    tiny_model("bert").save_pretrained(path)
    tok.save_pretrained(path)
