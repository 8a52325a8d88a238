"""The prune report: the before/after table and report.md."""

from __future__ import annotations

import json
import math

from ..stats.scores import HeadScores

#: what a metric measures, in the table's words
METRIC_WORDS = {"perplexity": "perplexity on held-out text",
                "fidelity": "embedding fidelity on held-out text (mean cosine similarity to the unpruned model's "
                            "embedding of each paragraph, pooled as its sentence-transformers pipeline pools it: "
                            "the mean over the tokens by default)"}


def number(v: float) -> str:
    """A metric for a table: four significant digits, five below 1 (a fidelity of 0.99997
    read as 1 at four) and more where five still round to 1 (0.999996 is not the unpruned
    model's 1), whole numbers from 10,000 to 10^15 (beyond: four digits and an exponent)."""
    if 9999.5 <= abs(v) < 1e15:  # whole: .4g would write 41,150 as 4.115e+04 (and 9,999.6 as 1e+04)
        return f"{v:,.0f}"
    if not abs(v) < 1:
        return f"{v:,.4g}"
    digits = 5
    while digits < 17 and abs(float(f"{v:.{digits}g}")) >= 1:
        digits += 1
    return f"{v:,.{digits}g}"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return number(v) if isinstance(v, float) else f"{v:,}"


def _change(x, y) -> str:
    if x is None or y is None or not x:
        return ""
    return f"{(y - x) / x:+.1%}"


def summary_table(report: dict, metric: str) -> str:
    """Markdown rows of what pruning cost and bought; the speed row says "no measurable
    difference" when the interleaved measurement's spread covers no change."""
    b, a = report["before"], report["after"]
    rows = [(METRIC_WORDS.get(metric, metric), b.get(metric), a.get(metric)),
            ("query heads", b["query_heads"], a["query_heads"]), ("KV heads", b["kv_heads"], a["kv_heads"])]
    if b.get("kv_cache_bytes_per_token"):
        kind = f" ({a['kv_cache_dtype']})" if a.get("kv_cache_dtype") else ""
        if n := b.get("kv_cache_window_sites"):  # their cache stops at the window: not per token
            kind += f", {n} sliding-window layer{'s' * (n != 1)} left out"
        rows.append((f"KV cache bytes per token{kind}", b["kv_cache_bytes_per_token"], a["kv_cache_bytes_per_token"]))
    if b.get("kv_cache_window_bytes_per_token"):  # windowed layers (all of Mistral 7B v0.1's: the row above is 0)
        n, kind = b["kv_cache_window_sites"], f" ({a['kv_cache_dtype']})" if a.get("kv_cache_dtype") else ""
        which = "the sliding-window layer, until its window fills" if n == 1 else \
            f"the {n} sliding-window layers, until their windows fill"
        rows.append((f"KV cache bytes per token{kind} of {which}", b["kv_cache_window_bytes_per_token"],
                     a.get("kv_cache_window_bytes_per_token")))
    rows += [("parameters", b["parameters"], a["parameters"]),
             ("attention FLOPs/token" + (f" (at {b['context']:,} tokens of context, a fixed point of comparison: the "
                                         "score and value products grow with the context)" if b.get("context") else ""),
              b["attention_flops_per_token"], a["attention_flops_per_token"])]
    lines = ["| | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} | {_change(x, y)} |" for name, x, y in rows]
    if b.get("retrieval_top1") is not None:
        lines.insert(3, retrieval_row(b, a))
        if b.get("retrieval_mrr") is not None:  # the true paragraph's mean reciprocal rank among all of them
            lines.insert(4, f"| retrieval MRR (mean of 1 / the rank of the true rest of each paragraph) | "
                            f"{_fmt(b['retrieval_mrr'])} | {_fmt(a.get('retrieval_mrr'))} | "
                            f"{_change(b['retrieval_mrr'], a.get('retrieval_mrr'))} |")
    lines += [speed_row(row) for row in report.get("speed") or []]
    return "\n".join(lines)


def retrieval_row(b: dict, a: dict) -> str:
    """The retrieval score's row: the share of held-out paragraphs whose first sentence finds the
    rest of its own paragraph among all of them, and the change as a count of those paragraphs
    (a relative change of a few of them read as a large gain or loss)."""
    pairs = a.get("retrieval_pairs") or b.get("retrieval_pairs") or 0
    x, y = b["retrieval_top1"], a.get("retrieval_top1")
    change = ""
    if pairs and x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
        change = f"{round(y * pairs) - round(x * pairs):+d} of {pairs:,}"
    name = (f"retrieval top-1 (share of the {pairs:,} held-out paragraphs of two sentences or more whose first "
            "sentence finds the rest of its own paragraph among all of them)")
    return f"| {name} | {_fmt(x)} | {_fmt(y)} | {change} |"


def speed_row(speed: dict) -> str:
    """tokens/s before and after, and the change only when it lies outside the spread of the
    interleaved rounds (``headprune.hf.speed.verdict``)."""
    where = f"{speed['tokens']:,}-token context" if speed["kind"] == "decode" else f"{speed['tokens']:,} tokens"
    name = f"{speed['kind']} tokens/s (batch {speed['batch']}, {where}, interleaved)"
    return (f"| {name} | {_fmt(speed['tokens_per_s_before'])} | {_fmt(speed['tokens_per_s_after'])} | "
            f"{speed['verdict']} |")


def report_markdown(report: dict, table: str) -> str:
    s = report["settings"]
    seconds = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in report.get("seconds", {}).items())
    size = ""
    if report.get("saved_bytes"):
        size = f"The saved model is {report['saved_bytes'] / 2**20:,.1f} MiB ({s.get('saved_dtype')})"
        if report.get("input_bytes"):
            weights = report.get("saved_weight_bytes", report["saved_bytes"])
            size += (f", its weights {weights / 2**20:,.1f} MiB against the input's "
                     f"{report['input_bytes'] / 2**20:,.1f} MiB")
        size += ". "
        if report.get("compute_dtype") and report["compute_dtype"] != s.get("saved_dtype"):
            how = "evaluated and timed" if report.get("speed") else "evaluated"
            size += f"Both models were {how} in {report['compute_dtype']}, the pruned one with its weights as saved. "
    if report.get("gguf"):
        arch = report.get("gguf_architecture") or "llama"
        size += (f"`{report['gguf']}` is the pruned model for llama.cpp, its attention in the input's quantisation "
                 f"(`{arch}` architecture{', per-layer head counts, which transformers does not read' * (arch == 'deci')}"
                 "); it is not the model evaluated here. ")
    return (f"# headprune report: {report['model']}\n\n"
            f"Pruned {report['heads_pruned']} of {report['heads_total']} heads "
            f"({'masked' if s['mode'] == 'mask' else 'physically removed'}): {report['recipe']}.{_whole(report)}"
            f"{masked_first(s, 'counted here nor in the table')}\n\n"
            f"Calibration: {calibration_text(s)}; "
            f"quality on {_evaluated(report.get('after') or {})}its held-out part "
            f"({s['held_out_paragraphs']} paragraphs). A model calibrated on one kind of text is evaluated best "
            f"on that kind: calibrate on text like the text it will serve.\n\n{_recovered(report)}{table}\n\n{size}"
            f"Stages: {seconds}.\n\n![heatmap](heatmap.png)\n")


def _whole(report: dict) -> str:
    """The layers that lost no head, and why, after the recipe's sentence (empty if none)."""
    whole = report.get("layers_whole") or {}
    parts = [f"{', '.join(map(str, whole[k]))} ({why})" for k, why in (
        ("protected", "the recipe keeps them whole"),
        ("none_chosen", "the selection placed none of the budget there")) if whole.get(k)]
    return f" Layers that lost no head: {'; '.join(parts)}." if parts else ""


def _evaluated(after: dict) -> str:
    """How much of the held-out text perplexity read (``--eval-windows`` stops it), before "its
    held-out part"; nothing for encoders (every held-out paragraph is embedded, its first 128 tokens)."""
    if not after.get("windows") or not after.get("tokens"):
        return ""
    return f"{after['windows']} windows of {after['window']} tokens ({after['tokens']:,} tokens scored) of "


def calibration_text(settings: dict) -> str:
    """``64 x 256 tokens of `data` (...)``: what a command calibrated on, for the report and
    the sweep's table."""
    return f"{sequences_text(settings)} of `{settings['data']}`{added_text(settings)}"


def sequences_text(settings: dict) -> str:
    """``64 x 256 tokens``, or where the sequences are shorter (an encoder's paragraphs, cut at
    ``seq_len``) ``512 sequences of up to 128 tokens (31,959 tokens)``."""
    n, length, real = settings["samples"], settings["seq_len"], settings.get("calibration_tokens")
    if real is None or real >= n * length:
        return f"{n} x {length} tokens"
    return f"{n} sequences of up to {length} tokens ({real:,} tokens)"


def added_text(settings: dict) -> str:
    """What ``--reference`` and ``--generated`` added to the calibration text, for
    :func:`calibration_text` and the scan summary."""
    ref, n = settings.get("reference"), settings.get("generated")
    out = ""
    if ref:
        out += (f" ({ref['samples']} of the {settings['samples']} sequences from the bundled "
                f"{' and '.join(f'`{t}`' for t in ref['texts'])}, `--reference`)")
    if n:
        out += f" and {n} x {settings['seq_len']} tokens sampled from the model itself (`--generated`)"
    return out


def validation_sentence(r: dict) -> str:
    """What the validation batches chose (empty without them)."""
    if not r.get("validation_batches"):
        return ""
    kept = ("the pruned model's own parameters: no step beat them" if not r["best_step"]
            else f"the parameters after step {r['best_step']}")
    return (f" On {r['validation_batches']} calibration batches kept out of training, the loss went from "
            f"{r['validation_loss_first']:.4g} to {r['validation_loss_best']:.4g} at best; the model keeps {kept}.")


def _recovered(report: dict) -> str:
    r = report.get("recover")
    if not r:
        return ""
    return (f"After the removal, distilled toward the unpruned model for {r['steps']} steps on the calibration "
            f"batches (training {r['train']}, {r['parameters']:,} parameters; distillation loss {r['loss_first']:.4g} "
            f"at the first step, {r['loss_last']:.4g} at the last, each on its own batch)."
            f"{validation_sentence(r)}\n\n")


def to_json(obj, strict: bool = True) -> str:
    """``obj`` as JSON text. ``strict``: a number that is not finite (a diverged perplexity) is
    written as ``null``, so strict parsers read the file (Python's json writes ``NaN`` and
    ``Infinity``, which are not JSON); the markdown report beside it names the value."""
    return json.dumps(finite(obj) if strict else obj, indent=2, default=float, allow_nan=not strict)


def finite(obj):
    """``obj`` with every float that is not finite replaced by ``None`` (numbers such as numpy's
    or torch's scalars are floats first, as ``default=float`` would make them)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (str, bool, int, type(None))):
        return obj
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return obj
    return value if math.isfinite(value) else None


def masked_first(settings: dict, where: str) -> str:
    """The heads a masked input held, removed before the work (nothing if none)."""
    n = settings.get("masked_in_input")
    return f" The {n} heads the model held masked (zero output columns) were removed first and are not {where}." \
        if n else ""


def scores_markdown(model: str, scores: HeadScores, settings: dict) -> str:
    H = scores.entropy
    lines = [f"# Attention entropy of {model}", "",
             f"Calibration: {settings['samples']} sequences of up to {settings['seq_len']} tokens from "
             f"`{settings['data']}`{added_text(settings)}. Entropy in nats, mean over valid query rows."
             + masked_first(settings, "in the table"), "",
             "| layer | mean | min | max | most diffuse head | sink mass (mean) |", "|---|---|---|---|---|---|"]
    sink = scores.score("sink")
    for i in range(scores.num_layers):
        row = H[i, : scores.num_heads[i]]
        if not scores.num_heads[i]:
            lines.append(f"| {scores.names[i]} | no head left | | | | |")
            continue
        lines.append(f"| {scores.names[i]} | {row.nanmean():.3f} | {row.min():.3f} | {row.max():.3f} | "
                     f"{scores.ids(i, [int(row.nan_to_num(-1).argmax())])[0]} | "
                     f"{sink[i, : scores.num_heads[i]].nanmean():.3f} |")
    return "\n".join(lines) + "\n"
