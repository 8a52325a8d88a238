"""Head layouts against the KV cache and the quality they cost: query heads freely (KV heads
repeated for partly pruned groups), even layouts (``--gqa even``: the KV cache never grows),
even layouts removing at least a quarter of the KV heads (``--kv-ratio 0.25``), whole KV groups,
and one uniform layout for every layer (``--uniform``, its first causal layer's heads chosen by
measurement as ``headprune prune --uniform`` chooses them), all with the default ranking and
the least-squares refit (of the kept heads' value rows too where that is the model's default,
as on encoders), through headprune's own pipeline.

    python benchmarks/bench_layouts.py [--models smollm2,minilm] [--ratios 0.1,0.3,0.5]
        [--calib persuasion] [--eval persuasion,python_tutorial] [--out layouts.json]

For each layout and ratio: the heads removed, the KV heads left and the KV-cache bytes per
token (float32 keys and values, every layer; the even and group layouts only for models with
grouped queries, where they differ from "query"), and the quality on the held-out text of each
evaluation text (perplexity for SmolLM2, embedding fidelity for MiniLM), masked with the
refit as bench_quality measures it. Every uniform selection is then pruned physically, saved,
and loaded with plain ``AutoModel*.from_pretrained`` where the family's config allows, and the
plain model's quality is measured on the same text: ``plain_equal`` says whether it is the
same number, bit for bit, as the physically pruned model's (``pruned_quality``; the masked
``quality`` differs from it by float rounding). Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_quality import calibration, floats  # noqa: E402

from headprune.hf.uniform import measure_uniform  # noqa: E402
from headprune.app import sweep as S  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.evaluate import quality  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect, prune_heads, save_pruned  # noqa: E402
from headprune.prune.slicing import kv_layout  # noqa: E402
from headprune.ranking import select_heads  # noqa: E402
from headprune.ranking.layouts import has_grouped_queries  # noqa: E402

LAYOUTS = {"query": {"gqa": "query"}, "even": {"gqa": "even"}, "even, KV >= 25%": {"gqa": "even", "kv_ratio": 0.25},
           "group": {"gqa": "group"}, "uniform": {"uniform": True}}
GROUPED_ONLY = ("even", "even, KV >= 25%", "group")


def kv_heads(scores, heads: dict) -> int:
    """KV heads left after pruning ``heads`` (repeated KV heads counted: they are cached)."""
    total = 0
    for i in range(scores.num_sites):
        hq, hkv = scores.num_heads[i], scores.num_kv_heads[i]
        keep = [h for h in range(hq) if h not in set(heads.get(i, []))]
        total += len(kv_layout(keep, hq // hkv)[0]) if keep else 0
    return total


def plain_quality(loaded, heads, scores, point, damping: float, values=None) -> tuple:
    """The uniform selection pruned physically (as ``headprune prune`` saves it, ``values``: the
    value moments where the refit includes value rows), saved and reloaded with plain
    from_pretrained: ``(pruned quality, plain quality)``, the second ``None`` where the saved
    directory is not plain-loadable."""
    import transformers

    def measure(model):
        return quality(dataclasses.replace(loaded, model=model), point.held, point.reference,
                       eval_windows=point.config.eval_windows, metric_only=True)[point.metric]

    model = copy.deepcopy(loaded.model)
    prune_heads(model, heads, reconstruct=scores, damping=damping, values=values)
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, tmp)
        meta = json.loads((Path(tmp) / "headprune.json").read_text())
        if not meta["plain_loadable"]:
            return measure(model), None
        cls = transformers.AutoModelForCausalLM if loaded.kind == "causal" else transformers.AutoModel
        plain = cls.from_pretrained(tmp, attn_implementation="sdpa").eval()
    return measure(model), measure(plain)


def evaluator(loaded, name: str, spec: str, args, batches, cache: dict) -> S._Evaluator:
    """The sweep's evaluator of masked selections on the held-out part of ``spec`` (a text for
    ``load_paragraphs``), with ``args``' ratios, windows and damping, and the value refit where
    it is the model's default (its moments collected on ``batches``, kept in ``cache``)."""
    _, held = texts.split(texts.load_paragraphs(spec))
    return S._Evaluator(S.SweepConfig(model=name, ratios=args.ratios, eval_windows=args.eval_windows,
                                      damping=args.damping), loaded, held, batches, cache)


def run(name: str, args) -> dict:
    loaded = load_model(name)
    batches, settings = calibration(loaded, args.calib, None)
    scores = collect(loaded.model, batches, progress=False, moments=True)
    rows, measured, cache = [], {}, {}  # value moments by selection, shared by the evaluation texts
    grouped = has_grouped_queries(scores)
    bytes_per_kv_head = 2 * scores.head_dim[0] * 4  # a key and a value row, float32
    for text in args.eval.split(","):
        point = evaluator(loaded, name, text, args, batches, cache)
        rows.append({"evaluated_on": text, "layout": "unpruned", "ratio": 0.0, "heads_pruned": 0,
                     "kv_heads": sum(scores.num_kv_heads), "quality": point.baseline_value})
        for ratio in args.ratios:
            for layout, kw in LAYOUTS.items():
                if not grouped and layout in GROUPED_ONLY:  # the same as "query" without grouped queries
                    continue
                t0 = time.perf_counter()
                heads = select_heads(scores, ratio=ratio, **kw)
                if layout == "uniform":  # as prune --uniform: the first causal layer's heads measured (once)
                    if ratio not in measured:
                        measured[ratio] = measure_uniform(loaded.model, batches, scores, heads, damping=args.damping)
                    heads = measured[ratio][0]
                row = {"evaluated_on": text, "layout": layout, "ratio": ratio,
                       "heads_pruned": sum(map(len, heads.values())), "kv_heads": kv_heads(scores, heads),
                       "quality": point(heads, scores, "refit", point.values)}
                if layout == "uniform":
                    values = point.value_moments(heads) if point.values else None  # cached by point(...)
                    pruned, plain = plain_quality(loaded, heads, scores, point, args.damping, values)
                    row.update(pruned_quality=pruned, plain_loadable=plain is not None, plain_quality=plain,
                               plain_equal=plain == pruned if plain is not None else None)
                row["kv_bytes_per_token"] = row["kv_heads"] * bytes_per_kv_head
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"model": name, "kind": loaded.kind, "metric": "perplexity" if loaded.kind == "causal" else "fidelity",
            "calibration": settings, "refit_values": point.values, "heads_total": sum(scores.num_heads),
            "eval_windows": args.eval_windows, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--ratios", type=floats, default=[0.1, 0.3, 0.5])
    ap.add_argument("--calib", default="persuasion")
    ap.add_argument("--eval", default="persuasion,python_tutorial")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--damping", type=float, default=S.DEFAULT_DAMPING)
    ap.add_argument("--out", default="layouts.json")
    args = ap.parse_args(argv)
    results = [run(m, args) for m in args.models.split(",")]
    write_results(args.out, {"results": results})


if __name__ == "__main__":
    main()
