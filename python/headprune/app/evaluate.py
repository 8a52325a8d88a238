"""Quality and speed of a model on held-out text, label-free.

* Causal LMs: perplexity over the held-out token stream in sliding windows (``window``
  tokens, advancing ``stride``; each token is scored at most once, with up to ``window -
  stride`` tokens of left context after the first window, and the tokens after the last full
  window in one more window that ends the stream, unless ``max_windows`` stops first). Where
  the tokenizer starts every text with a BOS token, each window starts with it and holds one
  token of the stream fewer.
* Encoders: fidelity to the unpruned model (mean cosine similarity of the embeddings of
  held-out paragraphs, pooled as the model's sentence-transformers pipeline pools them) and a
  retrieval score: each held-out paragraph's first sentence must find the rest of its own
  paragraph among all of them (top-1 accuracy, MRR).
* Both: tokens/s of a forward pass (median of repeats) and, through the adapters, parameters
  and attention FLOPs per token.
"""

from __future__ import annotations

import math
import re
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.modules import input_device
from ..hf.pooling import pool, pooling_of
from ..ranking.units import count_arg
from .texts import bos_token, stream_ids, token_windows

WINDOW = 256
FIDELITY_TOKENS = 128  # each text's first tokens that fidelity embeds
STRIDE = 256


def metric_of(kind: str) -> tuple:
    """``(metric name, lower is better)`` of a model kind ("causal" or "encoder")."""
    return ("perplexity", True) if kind == "causal" else ("fidelity", False)


#: Below this many paragraphs a held-out fidelity is mostly noise (:func:`thin_held_out`); a
#: perplexity, below one window of tokens.
THIN_PARAGRAPHS = 16


def thin_held_out(loaded, held: list) -> str | None:
    """Why the held-out paragraphs are too few for a figure worth comparing (perplexity over
    fewer tokens than one of :func:`perplexity`'s windows, :func:`perplexity_window`; fidelity
    over fewer than :data:`THIN_PARAGRAPHS` paragraphs), or ``None``."""
    if loaded.kind == "causal":
        window = perplexity_window(loaded.model) - (bos_token(loaded.tokenizer) is not None)  # the text's share
        tokens = len(stream_ids(loaded.tokenizer, held, window))  # all of them where fewer
        if tokens < window:
            return f"its held-out part has {tokens} token(s), fewer than one window of {window} for the perplexity"
        return None
    if len(held) < THIN_PARAGRAPHS:
        return f"its held-out part has {len(held)} paragraph(s), fewer than {THIN_PARAGRAPHS} for the fidelity"
    return None


def quality(loaded, held: list, reference: dict | None = None, *, eval_windows: int = 48, progress: bool = False,
            metric_only: bool = False) -> dict:
    """Label-free quality of ``loaded`` (a :class:`~headprune.app.load.Loaded`) on held-out
    paragraphs: perplexity for causal LMs, fidelity to ``reference`` (and, unless
    ``metric_only``, retrieval) for encoders."""
    if loaded.kind == "causal":
        return perplexity(loaded.model, loaded.tokenizer, held, max_windows=eval_windows, progress=progress)
    return encoder_quality(loaded.model, loaded.tokenizer, held, reference, progress=progress,
                           retrieval=not metric_only)


def max_positions(model, default: int) -> int:
    """The longest input the model takes (:func:`headprune.hf.speed.max_positions`; imported here
    on use, as transformers is)."""
    from ..hf.speed import max_positions as positions

    return positions(model, default)


def perplexity_window(model, window: int = WINDOW) -> int:
    """The window :func:`perplexity` scores: ``window`` tokens, or the model's positions if fewer."""
    return min(window, max_positions(model, window))


@torch.no_grad()
def perplexity(model, tokenizer, paragraphs: list, *, window: int = WINDOW, stride: int = STRIDE,
               max_windows: int = 64, batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity of a causal LM on the joined paragraphs (see module doc for windows)."""
    max_windows = count_arg("max_windows", max_windows)  # (a sweep's eval_windows): how far the text is read
    window = perplexity_window(model, window)
    bos = bos_token(tokenizer)  # each window starts with it where the tokenizer adds one (and scores its first token)
    off = int(bos is not None)
    width = window - off  # the stream's tokens per window
    stride = min(stride, width)
    if not 0 < stride <= width:
        raise ValueError(f"stride: expected 0 < stride <= window ({width}), got {stride}")
    ids = token_windows(tokenizer, paragraphs, 1, limit=(max_windows - 1) * stride + width).view(-1)  # as far as read
    if len(ids) < 2 - off:  # a BOS predicts the first token: one is enough then
        raise ValueError(f"--data: the held-out text has {len(ids)} token(s); perplexity needs at least {2 - off}")
    starts = list(range(0, max(1, len(ids) - width + 1), stride))[:max_windows]
    firsts = [0 if s == 0 else max(0, width - stride - 1 + off) for s in starts]  # only tokens not scored before
    end = starts[-1] + width
    if len(starts) < max_windows and end < len(ids):  # the tokens after the last full window: one more
        starts.append(len(ids) - width)
        firsts.append(end - starts[-1] - 1 + off)
    nll, count = 0.0, 0
    device = input_device(model)
    for i in tqdm(range(0, len(starts), batch_size), desc="headprune: perplexity", unit="batch", disable=not progress,
                  leave=False):
        chunk = torch.stack([ids[s : s + width] for s in starts[i : i + batch_size]])
        chunk = (torch.cat([chunk.new_full((len(chunk), 1), bos), chunk], 1) if off else chunk).to(device)
        out = model(input_ids=chunk, attention_mask=torch.ones_like(chunk))
        if getattr(out, "logits", None) is None:
            raise ValueError(f"MODEL: {type(model).__name__} has no language-model head, and perplexity needs one "
                             "(save the ...ForCausalLM model)")
        logits = out.logits.float()
        lp = F.log_softmax(logits[:, :-1], -1).gather(-1, chunk[:, 1:, None]).squeeze(-1)
        for j, first in enumerate(firsts[i : i + batch_size]):
            nll -= lp[j, first:].sum().item()
            count += lp.shape[1] - first
    mean = nll / count  # NaN stays NaN (a model that computes NaN); exp overflows a float above ~709.8
    perplexity = mean if math.isnan(mean) else math.exp(mean) if mean < 709 else math.inf
    return {"perplexity": perplexity, "nll": mean, "tokens": count, "window": min(window, len(ids) + off),
            "stride": stride, "windows": len(starts)}


@torch.no_grad()
def embed(model, tokenizer, texts: list, *, batch_size: int = 32, max_length: int = FIDELITY_TOKENS,
          progress: bool = False, modes: tuple | None = None) -> torch.Tensor:
    """L2-normalised embeddings ``[N, hidden]`` of each text's first ``max_length`` tokens, pooled
    as the model's sentence-transformers pipeline pools them (the mean over the tokens without
    one: :func:`headprune.hf.pooling.pooling_of`), padded on the right whatever the tokenizer's
    side (left padding moves an absolute-position encoder's positions with the batch); ``modes``:
    another pooling (another model's, to compare with its embeddings)."""
    out, modes = [], tuple(modes or pooling_of(model))
    device = input_device(model)
    max_length = min(max_length, max_positions(model, max_length))
    for i in tqdm(range(0, len(texts), batch_size), desc="headprune: embedding", unit="batch", disable=not progress,
                  leave=False):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt", padding_side="right").to(device)
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out.append(F.normalize(pool(h, enc["attention_mask"], modes), dim=-1).cpu())
    return torch.cat(out)


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def retrieval_pairs(paragraphs: list) -> tuple:
    """``(queries, documents)``: first sentence of each paragraph with >= 2 sentences, and the rest."""
    queries, docs = [], []
    for p in paragraphs:
        parts = _SENTENCE.split(p, maxsplit=1)
        if len(parts) == 2 and len(parts[0].split()) >= 4 and len(parts[1].split()) >= 4:
            queries.append(parts[0])
            docs.append(parts[1])
    return queries, docs


def retrieval_score(q_emb: torch.Tensor, d_emb: torch.Tensor) -> dict:
    """Top-1 accuracy and mean reciprocal rank of each query's own document (row ``i`` of
    ``d_emb``); a document as similar as the true one ranks before it, and similarities that
    are not finite give NaN (constant or NaN embeddings used to score a perfect 1)."""
    sims = q_emb @ d_emb.T
    if not bool(torch.isfinite(sims).all()):
        return {"top1": math.nan, "mrr": math.nan, "pairs": sims.shape[0]}
    rank = (sims >= sims.diag().unsqueeze(1)).sum(1)  # the true document's rank, ties against it
    return {"top1": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item(), "pairs": len(rank)}


def encoder_quality(model, tokenizer, paragraphs: list, reference: dict | None = None, progress: bool = False,
                    retrieval: bool = True) -> dict:
    """Embedding fidelity (vs ``reference['embeddings']``, 1.0 for the model itself, pooled as the
    reference was) and, with ``retrieval``, the retrieval score."""
    given = (reference or {}).get("pooling")  # a pruned copy saved without the pipeline: pooled as its reference
    modes = tuple(given.split("+")) if isinstance(given, str) and given else pooling_of(model)
    emb = embed(model, tokenizer, paragraphs, progress=progress, modes=modes)
    queries, docs = retrieval_pairs(paragraphs) if retrieval else ([], [])
    res = (retrieval_score(embed(model, tokenizer, queries, progress=progress, modes=modes),
                           embed(model, tokenizer, docs, progress=progress, modes=modes)) if queries else {})
    fid = 1.0 if reference is None else F.cosine_similarity(emb, reference["embeddings"], dim=-1).mean().item()
    return {"fidelity": fid, "retrieval_top1": res.get("top1"), "retrieval_mrr": res.get("mrr"),
            "retrieval_pairs": res.get("pairs", 0), "embeddings": emb, "pooling": "+".join(modes)}


@torch.no_grad()
def throughput(model, *, batch: int = 1, seq_len: int = 256, repeat: int = 5, vocab: int | None = None) -> dict:
    """Median forward tokens/s on random token ids (batch x seq_len), with the quartiles of the
    repeats (``tokens_per_s_low`` / ``_high``): one figure on a shared machine varies many-fold."""
    device = input_device(model)
    vocab = vocab or getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    from ..hf.speed import cuda_devices, synchronize

    devices = cuda_devices(model)  # every GPU the model is on, not only the current one
    model(input_ids=ids, attention_mask=mask)  # warm-up
    synchronize(devices)  # its kernels done before the first timed run starts
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        synchronize(devices)
        times.append(time.perf_counter() - t0)
    med, n = statistics.median(times), batch * seq_len
    q1, q3 = (statistics.quantiles(times, n=4, method="inclusive")[i] for i in (0, 2)) if repeat > 1 else (med, med)
    return {"tokens_per_s": n / med, "tokens_per_s_low": n / q3, "tokens_per_s_high": n / q1, "median_ms": med * 1e3,
            "batch": batch, "seq_len": seq_len}


def compare_speed(before, after, *, prefill=((1, 512),), decode=((1, 2048),), steps: int = 8,
                  rounds: int = 5) -> list:
    """Prefill and (causal LMs) decode tokens/s of the unpruned and the pruned model, timed
    interleaved by :func:`headprune.hf.speed.compare` with the unpruned model a second time as a
    control: rows with both speeds, the median per-round speed-up and its quartiles (the
    spread), and the control's quartiles, which a difference must clear to be reported
    (:func:`headprune.hf.speed.verdict`). Prefill lengths, and decode contexts with their
    steps, are capped at the model's position table; encoders have no decode."""
    from ..hf.speed import compare, verdict

    cap = min(max_positions(before, 1 << 30), max_positions(after, 1 << 30))
    prefill = [(b, min(t, cap)) for b, t in prefill]
    decode = [(b, min(t, cap - steps)) for b, t in decode if cap > steps] if _causal(before) else []
    rows = compare({"before": before, "after": after, "control": before}, prefill=prefill, decode=decode,
                   steps=steps, rounds=rounds)
    out = []
    for a, b, c in zip(rows[0::3], rows[1::3], rows[2::3]):
        row = {"kind": a["kind"], "batch": a["batch"], "tokens": a["tokens"], "rounds": rounds,
               **({"steps": steps} if a["kind"] == "decode" else {}),
               "tokens_per_s_before": a["tokens_per_s"], "tokens_per_s_after": b["tokens_per_s"],
               **{k: b[k] for k in b if k.startswith("speedup")},
               **{k.replace("speedup", "control"): c[k] for k in c if k.startswith("speedup")}}
        out.append(row | {"verdict": verdict(row)})
    return out


def _causal(model) -> bool:
    from ..hf.adapters import get_adapter

    return get_adapter(model).kind == "causal"
