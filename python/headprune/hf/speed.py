"""Speed of models compared where head pruning pays: prefill and decode, timed interleaved.

Head pruning removes attention FLOPs (which grow with the context) and, when whole KV
groups go, KV cache. Prefill at a short context barely moves; decode at a long context,
where every new token reads the whole KV cache, moves most. So the comparison has two kinds
of shape:

* ``prefill`` ``(batch, tokens)``: one forward over ``tokens`` random token ids without a
  cache, keeping the last position's logits only (what ``generate`` runs on a prompt).
* ``decode`` ``(batch, context)``: ``steps`` steps of one (random, drawn in advance) token each after a KV cache
  of ``context`` tokens. The cache is filled with zeros in each layer's own KV shape instead
  of by a prefill (the time of a decode step does not depend on what the cache holds, and a
  prefill of 16 x 8,192 tokens would take minutes on a CPU), so long contexts cost only their
  memory. It is transformers' ``DynamicCache``: what ``generate`` uses by default.

The models are timed in rotation (one call of each per round, each round starting with the
next model, so none always runs first), so a burst of load on a shared machine lands on all
of them; each round gives each model's speed-up over the first
(the reference), and the summary is the median of those with their quartiles. A model whose
quartiles include 1.0 shows "no measurable difference": a signed percentage inside the
spread would be noise read as a result. Wall time and the process's CPU time are both kept.
"""

from __future__ import annotations

import inspect
import itertools
import math
import statistics
import time
from typing import Optional

import torch

from ..core.modules import execution_device, input_device
from .adapters import get_adapter, head_counts, head_dim, resolve_sites
from .empty import headless_kv

__all__ = ["compare", "filled_cache", "max_positions", "position_limit", "quartiles", "verdict", "parse_shape"]

#: names of learned absolute position tables (BERT/RoBERTa/DistilBERT, GPT-2, OPT)
_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def parse_shape(spec: str, arg: str = "shape") -> tuple:
    """``"16x512"`` -> ``(16, 512)``; a clear error for anything else."""
    try:
        b, s = (int(v) for v in str(spec).lower().split("x"))
    except ValueError:
        raise ValueError(f"{arg}: expected BATCHxTOKENS such as 1x512, got {spec!r}") from None
    if b < 1 or s < 1:
        raise ValueError(f"{arg}: expected positive batch and tokens, got {spec!r}")
    return b, s


def position_tables(model) -> list:
    """``(rows, offset, padding_idx)`` of each learned absolute position table: OPT's adds an
    offset to the positions it numbers, RoBERTa's numbers from past its padding row."""
    return [(module.num_embeddings, int(getattr(module, "offset", 0) or 0), module.padding_idx)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Embedding) and name.rpartition(".")[2] in _POSITION_TABLES]


def table_positions(rows: int, offset: int, padding_idx: Optional[int]) -> int:
    """The positions a table of :func:`position_tables` numbers: its rows less those its offset
    or padding row skips (OPT's 2, RoBERTa's ``padding_idx + 1``)."""
    return rows - max(offset, -1 if padding_idx is None else padding_idx + 1)


def position_limit(model) -> Optional[int]:
    """The most positions a model with a learned absolute position table can take (the
    table's rows less the ones its offset or padding row skips: OPT's 2, RoBERTa's
    ``padding_idx + 1``), or ``None`` for rotary, relative and ALiBi positions, which have
    no table to run past (beyond the trained length they still compute, as fast)."""
    limits = [table_positions(*table) for table in position_tables(model)]
    return min(limits) if limits else None


def max_positions(model, default: int) -> int:
    """The longest input the model takes: its config's ``max_position_embeddings`` (``default``
    if it has none), and no more than its learned position table's usable rows
    (:func:`position_limit`: RoBERTa's 514 rows take 512 tokens)."""
    n = getattr(model.config, "max_position_embeddings", None) or default
    limit = position_limit(model)
    return n if limit is None else min(n, limit)


def _check_positions(models: dict, shapes: list, steps: int) -> None:
    """Refuse, before any timing, a shape that runs past a model's learned positions."""
    for name, m in models.items():
        limit = position_limit(m)
        for kind, batch, tokens in shapes:
            need = tokens if kind == "prefill" else tokens + steps
            if limit is not None and need > limit:
                what = f"{batch}x{tokens}" + (f" with {steps} decode steps" if kind == "decode" else "")
                raise ValueError(f"{kind}: {what} needs {need} positions, more than the {limit} learned positions "
                                 f"of model {name!r} ({getattr(m.config, 'model_type', type(m).__name__)})")


def _ids(model, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    vocab = getattr(model.config, "vocab_size", None) or 1000
    g = torch.Generator().manual_seed(seed * 1000003 + batch * 7919 + tokens)
    return torch.randint(3 if vocab > 3 else 0, vocab, (batch, tokens), generator=g).to(input_device(model))


def filled_cache(model, batch: int, context: int):
    """A ``DynamicCache`` holding ``context`` tokens of zeros per causal self-attention layer,
    each in that layer's own (possibly pruned) KV shape (a layer with no head left: one zero per
    token, as its forward keeps, so the cache's length is the context's)."""
    from transformers import DynamicCache

    adapter = get_adapter(model)
    cache = DynamicCache(config=model.config)
    for site in resolve_sites(model, adapter):
        if not site.block.causal or site.block.kind != "self":
            continue
        # the site's own float type, on the device its attention computes on (a sharded model spans several;
        # an offloaded layer's weights are on the meta device between forwards)
        w = site.o.weight.new_empty(0, device=execution_device(model, site.module))
        kv = head_counts(site, adapter)[1]
        k = w.new_zeros(batch, kv, context, head_dim(site, adapter)) if kv else headless_kv(batch, context, w)
        cache.update(k, torch.zeros_like(k), site.depth)
    return cache


def _cache_arg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cuda_devices(*models) -> list:
    """The CUDA devices the models' parameters and buffers are on (a model spread over several
    GPUs, or on one that is not the current device)."""
    return sorted({t.device for m in models for t in itertools.chain(m.parameters(), m.buffers())
                   if t.device.type == "cuda"}, key=str)


def synchronize(devices=()) -> None:
    """Wait for the kernels queued on the current CUDA device (where CUDA is in use: an offloaded
    model computes there, its weights elsewhere) and on each of ``devices``
    (``torch.cuda.synchronize()`` alone waits for the current device only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    for d in devices:
        torch.cuda.synchronize(d)


def _clock(fn, *args, devices=()) -> tuple:
    synchronize(devices)
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    synchronize(devices)
    return time.perf_counter() - t0, time.process_time() - c0


def _prefill(model, batch: int, tokens: int):
    ids = _ids(model, batch, tokens)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params or get_adapter(model).kind == "causal":
        kw["use_cache"] = False
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1

    def setup():
        return None

    def run(_):
        model(**kw)

    return setup, run


def _decode(model, batch: int, context: int, steps: int):
    ids = _ids(model, batch, steps, seed=1)
    arg = _cache_arg(model)

    def setup():
        return filled_cache(model, batch, context)

    def run(cache):
        for i in range(steps):
            model(input_ids=ids[:, i : i + 1], **{arg: cache}, use_cache=True)

    return setup, run


@torch.no_grad()
def compare(models: dict, *, prefill=(), decode=(), steps: int = 8, rounds: int = 5, warmup: bool = True,
            progress=None) -> list:
    """Rows ``{kind, batch, tokens, model, wall_s, cpu_s, tokens_per_s, speedup, speedup_low,
    speedup_high, speedup_cpu, ..., verdict}`` for every shape, the first model of ``models``
    (``{name: model}``) being the reference; see the module doc. ``prefill`` and ``decode``
    take ``(batch, tokens)`` pairs (decode: tokens of context already cached)."""
    if not models:
        raise ValueError("models: expected at least one model")
    if rounds < 3 or steps < 1:
        raise ValueError(f"rounds, steps: expected at least 3 rounds (quartiles of fewer are no spread) and 1 "
                         f"step, got {rounds}, {steps}")
    for m in models.values():
        m.eval()
    shapes = [("prefill", *s) for s in prefill] + [("decode", *s) for s in decode]
    _check_positions(models, shapes, steps)
    rows, devices = [], cuda_devices(*models.values())
    for kind, batch, tokens in shapes:
        calls = {n: (_prefill(m, batch, tokens) if kind == "prefill" else _decode(m, batch, tokens, steps))
                 for n, m in models.items()}
        if warmup:  # one call of each at a small shape of the same kind: first-call costs out of the rounds
            for n, m in models.items():
                setup, run = _prefill(m, 1, min(tokens, 32)) if kind == "prefill" else _decode(m, 1, min(tokens, 32), 1)
                run(setup())
        wall = {n: [] for n in models}
        cpu = {n: [] for n in models}
        order = list(calls)
        for r in range(rounds):  # each round starts with the next model: no model always runs first
            for n in order[r % len(order):] + order[: r % len(order)]:
                setup, run = calls[n]
                w, c = _clock(run, setup(), devices=devices)  # the state (a filled KV cache) is freed before the next model
                wall[n].append(w)
                cpu[n].append(c)
        new_tokens = batch * (tokens if kind == "prefill" else steps)
        ref = next(iter(models))
        for n in models:
            row = {"kind": kind, "batch": batch, "tokens": tokens, "model": n, "rounds": rounds,
                   **({"steps": steps} if kind == "decode" else {}),
                   "wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n]),
                   "tokens_per_s": new_tokens / statistics.median(wall[n])}
            for clock, times in (("", wall), ("_cpu", cpu)):
                ups = sorted(a / b for a, b in zip(times[ref], times[n]))
                low, high = quartiles(ups)
                row.update({f"speedup{clock}": statistics.median(ups), f"speedup{clock}_low": low,
                            f"speedup{clock}_high": high,
                            f"speedup{clock}_of_medians": statistics.median(times[ref]) / statistics.median(times[n])})
            row["verdict"] = "reference" if n == ref else verdict(row)
            rows.append(row)
        if progress:
            progress(rows[-len(models):])
    return rows


def quartiles(values: list) -> tuple:
    """The lower and upper quartiles of per-round speed-ups (inclusive method); of fewer than
    5 rounds the least and the greatest (the quartiles of 3 or 4 values are midpoints of
    neighbours: two identical models timed in 3 rounds read as different about half the time)."""
    if len(values) < 5:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def verdict(row: dict, clock: str = "", control: Optional[str] = "the unpruned model against itself") -> str:
    """``"no measurable difference (0.97-1.04x)"`` when the quartiles of the per-round
    speed-ups include 1.0, else ``"1.31x (1.25-1.36x)"``. Where the row also holds the ratio of
    the median times (``speedup_of_medians``, what its tokens/s columns show) and that lies on
    the other side of 1.0 from the rounds' median, the rounds were too uneven to tell: no
    measurable difference either, with both figures. Where it holds a control's quartiles
    (``control_low`` / ``control_high``: the reference timed against itself in the same
    rounds), a spread that reaches into the control's, or into its mirror image about 1.0, is no
    measurable difference too: timing one model against an identical one gave 0.99x (0.99-0.99x)
    on a loaded machine, and 0.83-0.88x in another run, whose order effect of 12-17% could as well
    have run the other way. ``control`` names the control in the text (``None``: not named)."""
    s, lo, hi = row[f"speedup{clock}"], row[f"speedup{clock}_low"], row[f"speedup{clock}_high"]
    c_lo, c_hi = row.get(f"control{clock}_low"), row.get(f"control{clock}_high")
    named = c_lo is not None and control is not None

    def told(d: int = 2) -> str:  # the control's spread, as the text names it
        return f"; {control} {c_lo:.{d}f}-{c_hi:.{d}f}x" if named else ""

    if c_lo is None or not 0 < c_lo <= c_hi < math.inf:  # none, or not a spread of ratios (a results file's)
        band = (1.0, 1.0) if c_lo is None else (min(1.0, c_lo), max(1.0, c_hi))
    else:
        band = (min(1.0, c_lo, 1.0 / c_hi), max(1.0, c_hi, 1.0 / c_lo))
    if lo <= band[1] and hi >= band[0]:
        return f"no measurable difference ({lo:.2f}-{hi:.2f}x{told()})"
    medians = row.get(f"speedup{clock}_of_medians")
    if medians is not None and (medians - 1.0) * (s - 1.0) <= 0:
        return f"no measurable difference (per round {lo:.2f}-{hi:.2f}x, the median times {medians:.2f}x{told()})"
    # a bound that prints as 1.00, or as an edge of the band or of the control it clears, would read as touching it
    d, edges = 2, (1.0, *band, *((c_lo, c_hi) if named else ()))
    while d < 4 and {f"{lo:.{d}f}", f"{hi:.{d}f}"} & {f"{v:.{d}f}" for v in edges}:
        d += 1
    return f"{s:.{d}f}x ({lo:.{d}f}-{hi:.{d}f}x{told(d)})"
