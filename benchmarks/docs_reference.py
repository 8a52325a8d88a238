"""The tables of docs/quality.md on the reference share of the calibration (bench_reference.py;
see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import num, pct, table, x

def _points(res: dict) -> dict:
    """``{(model, evaluated): {"baseline": b, "lower": bool, share: [values by ratio]}}``."""
    out = {}
    for r in res["rows"]:
        p = out.setdefault((r["model"], r["evaluated_on"]), {"baseline": r["baseline"], "lower": r["lower_is_better"]})
        p[r["share"]] = r["values"]
    return out


def _bundled(res: dict, text: str) -> bool:
    return text not in res["texts"]


def _cell(v: float, base: float, lower: bool) -> str:
    return f"{num(v, 4)} ({x(v / base)})" if lower else num(v, 4)


def reference_table(ctx, name: str = "quality_reference") -> str:
    """Per model and evaluation text, the default recipe's quality at each share and ratio."""
    res = ctx["R"][name]
    ratios = res["rows"][0]["ratios"]
    shares = sorted({r["share"] for r in res["rows"]})
    rows = []
    for (model, text), p in _points(res).items():
        kind = "bundled" if _bundled(res, text) else "not bundled"
        rows.append([model, f"`{text}` ({kind})", num(p["baseline"], 4),
                     *[_cell(p[s][i], p["baseline"], p["lower"]) for i in range(len(ratios)) for s in shares]])
    head = [f"{pct(r)}: " + ("alone" if s == 0 else f"{s:g}" + (" (default)" if s == res["default_share"] else ""))
            for r in ratios for s in shares]
    return table(["model", "evaluated on", "unpruned", *head], rows)


def reference_summary(ctx, name: str = "quality_reference") -> str:
    """Per model: what the default share costs on the calibration's own kind of text and what
    it buys on the kinds no bundled text is."""
    res = ctx["R"][name]
    calib, share = res["rows"][0]["calibrated_on"], res["default_share"]
    ratios = res["rows"][0]["ratios"]
    parts = []
    for model in dict.fromkeys(r["model"] for r in res["rows"]):
        pts = {t: p for (m, t), p in _points(res).items() if m == model}
        own, lower = pts[calib], pts[calib]["lower"]
        change = (lambda a, b: f"{num(a, 4)} -> {num(b, 4)}")
        cost = ", ".join(f"{pct(r)} {change(own[0][i], own[share][i])}" for i, r in enumerate(ratios))
        gains = []
        for text, p in pts.items():
            if _bundled(res, text):
                continue
            gains += [(p[0][i] / p[share][i] if lower else p[share][i] - p[0][i]) for i in range(len(ratios))]
        span = (f"{min(gains):.2f}x to {max(gains):.2f}x lower perplexity" if lower
                else f"{min(gains):+.4f} to {max(gains):+.4f} fidelity")
        parts.append(f"on {model}, the calibration's own kind of text (`{calib}`) goes {cost}, and the texts no "
                     f"bundled text is ({', '.join(f'`{t}`' for t in pts if not _bundled(res, t))}) gain {span} "
                     f"over the {len(gains)} points")
    return "; ".join(parts)


def reference_targets(ctx, name: str = "quality_reference") -> str:
    """Against the targets for text of another kind, on the texts no bundled text is: the
    default share and calibration on the text alone."""
    from docs_tables import TARGETS  # docs_tables imports this module

    res = ctx["R"][name]
    share = res["default_share"]
    rows = []
    for (model, text), p in _points(res).items():
        if _bundled(res, text):
            continue
        lower = p["lower"]
        show = (lambda v: x(v / p["baseline"])) if lower else (lambda v: num(v, 4))
        for i, r in enumerate(res["rows"][0]["ratios"]):
            bound, v = TARGETS.get((model, False), {}).get(r), p[share][i]
            met = "" if bound is None else ("met" if (v / p["baseline"] <= bound if lower else v >= bound)
                                            else "**not met**")
            rows.append([model, f"`{res['rows'][0]['calibrated_on']}` -> `{text}`", pct(r), show(p[0][i]), show(v),
                         "" if bound is None else (f"<= {x(bound)}" if lower else f">= {num(bound, 3)}") + f" {met}"])
    return table(["model", "calibrated -> evaluated", "pruned", "alone (x unpruned / fidelity)",
                  "default share (x unpruned / fidelity)", "target"], rows)


def reference_sources(ctx, name: str = "quality_reference") -> str:
    """The texts the benchmark built from files of the machine, described."""
    res = ctx["R"][name]
    return "; ".join(f"`{t}`: {d['files']} files, {d['bytes']:,} bytes" for t, d in res["texts"].items())


def _row(ctx, model: str, text: str, share, name: str) -> dict:
    """The bench_reference row of one model, text and share (the default share if ``None``)."""
    res = ctx["R"][name]
    share = res["default_share"] if share is None else share
    return next(r for r in res["rows"] if (r["model"], r["evaluated_on"], r["share"]) == (model, text, share))


def ref_value(ctx, model: str, text: str, ratio: float, share=None, name: str = "quality_reference") -> float:
    """One point of bench_reference (the default share unless ``share`` is given)."""
    row = _row(ctx, model, text, share, name)
    return row["values"][row["ratios"].index(ratio)]


def ref_ratio(ctx, model: str, text: str, ratio: float, share=None, name: str = "quality_reference") -> str:
    """One point of bench_reference against its unpruned baseline (``1.23x``; fidelity as is)."""
    row = _row(ctx, model, text, share, name)
    v = row["values"][row["ratios"].index(ratio)]
    return x(v / row["baseline"]) if row["lower_is_better"] else num(v, 4)


def ref_samples(ctx, model: str, share=None, name: str = "quality_reference") -> int:
    """The reference sequences of bench_reference's calibration of ``model`` at ``share``."""
    return _row(ctx, model, ctx["R"][name]["rows"][0]["evaluated_on"], share, name)["reference"]["samples"]


def _rule_share(settings: dict) -> int:
    """The reference sequences ``prune`` takes now for an encoder's calibration ``settings``
    (texts.calibration_set: the default share of the paragraphs the text gives, when fewer)."""
    from headprune.app.texts import DEFAULT_REFERENCE, equal_shares, load_split, reference_samples, shared_reference

    samples, data = settings["samples"], settings["data"]
    n = reference_samples(samples, DEFAULT_REFERENCE, data)
    parts = load_split(data)[0]  # an encoder's calibration takes each part's first paragraphs
    got = sum(min(len(p), k) for p, k in zip(parts, equal_shares(samples - n, len(parts))))
    return shared_reference(n, got, samples - n, DEFAULT_REFERENCE)


def calibrated(ctx, settings: dict, encoder: bool = False) -> str:
    """A benchmark's calibration as the docs name it: the text, and the reference share if any.
    Fewer reference sequences than the default share of ``samples``: the text gave fewer
    sequences than the rest, and the default share was taken of those (texts.calibration_set;
    the benchmarks that name their calibration so run the default share). ``encoder``: the
    settings are an encoder's (paragraphs), so a share taken of ``samples`` before that rule
    says what ``prune`` takes now."""
    ref = settings.get("reference")
    if not ref:
        return f"`{settings['data']}` alone"
    from headprune.app.texts import DEFAULT_REFERENCE

    texts = " and ".join(f"`{t}`" for t in ref["texts"])
    default = round(settings["samples"] * DEFAULT_REFERENCE)
    if ref["samples"] < default:
        return (f"`{settings['data']}` ({ref['samples']} sequences from the bundled {texts}, the default reference "
                f"share of the sequences the text gives, fewer than {settings['samples']})")
    share = ("the default reference share" if ref["samples"] == default
             else f"a reference share of {pct(ref['samples'] / settings['samples'])}")
    if encoder and ref["samples"] == default and (now := _rule_share(settings)) < default:
        share += (f" as it was taken of `--samples` before the share was taken of the sequences the text gives: "
                  f"`prune` now takes {now}, so its default differs a little from the targets table's")
    return f"`{settings['data']}` ({ref['samples']} of the {settings['samples']} sequences from the bundled {texts}, {share})"


TABLES = {f.__name__: f for f in (reference_table, reference_summary, reference_targets, reference_sources, calibrated,
                                  ref_value, ref_ratio, ref_samples)}
