"""``headprune prune``: collect, choose, remove, evaluate, save and report, stage by stage, each
stage labelled while it runs and timed in the report."""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import torch

from .. import atomic
from ..ranking import DEFAULT_RECIPE, select_heads, unit_counts, unit_sizes
from ..ranking.layouts import has_grouped_queries
from . import commands as C
from . import evaluate as E
from . import plots
from .inputs import check_out, inputs
from .load import (SAVE_TYPES, check_saved_type, round_to_saved, stored_type_name, tokenizer_as_loaded, type_bits,
                   weight_bytes)
from .prune_checks import check_model, check_options, refuse_no_head, with_scope
from .recipe_text import describe_recipe
from .recover_command import recover_after_prune, recover_validation, recovers, recovery_split
from .removal_stage import refits_values, remove, remove_zeroed
from .report import report_markdown, summary_table
from .selection_panel import protected_layers, selection_label, selection_values
from .sweep import refit_bias_of, removal_kwargs, removal_of
from .sweep_reach import learned_budget, learned_protection, learned_selection


def prune(args) -> int:
    from ..hf import measure, save_pruned

    out = C._out(args, "prune")
    check_out(out, args.force, inputs(args))  # fail before the slow part
    check_options(args)
    stage = C.Stages(args)
    with stage("loading the model and the calibration text", "load"):
        loaded, batches, held, settings = C._setup(args, evaluates=True)
    remove_zeroed(args, loaded, settings)
    check_model(args, loaded)  # resolves --steps auto: the rounds the model's heads ask for
    saved_as = _saved_type(args, loaded)
    recovery = recovery_split(args, loaded, settings)  # a split that leaves nothing to train on: refused now
    removal = removal_of(args)
    values = refits_values(args, loaded, removal)
    with stage("collecting entropies and output statistics in one forward pass", "collect"):
        scores = C._collect(args, loaded, batches, settings,
                            moments=removal == "refit" or args.score in (None, "reconstruction"))
    kw = _learned_protection(with_scope(args, C._selection_kwargs(args), scores, removal), scores)
    if C._is_writer():
        C._warn_as_written(kw, loaded.kind)
    heads, last = _choose(args, stage, loaded, batches, scores, kw, removal, settings)
    if not C._is_writer():
        return 0
    recipe = _recipe(args, kw, removal, scores, values, settings["refit_bias"])
    n, total = sum(len(h) for h in heads.values()), sum(scores.num_heads)
    _check_layout_rounded(args, n, total, scores, measured=kw.get("scope") == "measured")
    C._say(args, f"headprune: {n} of {total} heads chosen: {recipe}")
    metric, _ = E.metric_of(loaded.kind)
    with stage("evaluating the unpruned model on held-out text", "evaluate_before"):
        before_q = C.quality(args, loaded, held)
    reference = copy.deepcopy(loaded.model) if args.speed or recovers(args) else None
    sizes_before = measure(loaded.model, dtype=SAVE_TYPES[saved_as])  # KV bytes in the type saved
    how, mode = removal_kwargs(removal, last, args.damping, settings["refit_bias"]), args.mode or "physical"
    remove(args, stage, loaded, batches, heads, how, values, mode)
    recovered = recover_after_prune(args, stage, loaded, reference, recovery)
    gguf = _export_gguf(args, stage, loaded)  # from the float weights, before the cast below
    try:
        round_to_saved(loaded, saved_as)
        report = _evaluate(args, stage, loaded, held, before_q, reference, saved_as, {
            "model": args.model, "recipe": recipe, "pruned_heads": {str(k): v for k, v in heads.items()},
            "heads_pruned": n, "heads_total": total, "before": {**C._public(before_q), **sizes_before},
            "recover": recovered, "compute_dtype": settings["dtype"]})  # rounding keeps the loaded type
        del reference
        settings.update({"mode": mode, "ratio": args.ratio, "count": args.count, "steps": args.steps,
                         "removal": removal, "refit_values": values, "damping": args.damping,
                         "sequential": args.sequential, "saved_dtype": saved_as, "recover_steps": args.recover_steps,
                         "recover_seconds": args.recover_seconds, **C.windows_setting(args, loaded),
                         **({"recover_lr": recovered["lr"], "recover_validation": recover_validation(args)}
                            if recovered else {}), **kw, "scope": kw.get("scope") or DEFAULT_RECIPE["scope"]})
        report.update(settings=settings, **_absolute(args.model, settings))
        _warn_if_kv_grew(report)
        with stage("saving the model and the report", "save"):
            _write(args, out, loaded, scores, heads, settings, report, metric, save_pruned, gguf)
    finally:
        _drop_gguf(gguf)
    print(f"pruned model: {out / 'model'}\nreport: {out / 'report.md'} (also report.json, scores.json, heatmap.png"
          f"{f', model.gguf for llama.cpp ({gguf[1]} architecture)' if gguf else ''})\n")
    print(summary_table(report, metric))
    return 0


def _absolute(model: str, settings: dict) -> dict:
    """The model and the calibration files as absolute paths (``model_path``,
    ``settings["data_path"]``) beside the names as given, so ``headprune recover DIR`` finds
    them from another working directory; bundled names stay names."""
    from .texts import data_paths

    paths = data_paths(settings["data"]) if settings.get("data") else None
    if paths is not None and paths != settings["data"]:
        settings["data_path"] = paths
    return C.model_path(model)


def _evaluate(args, stage, loaded, held, before_q, reference, saved_as: str, report: dict) -> dict:
    """The pruned model's quality (and speed against ``reference``) into ``report``: its
    weights as saved, computed in the type the unpruned model was (see load.round_to_saved)."""
    from ..hf import measure
    from ..hf.saved import declared_bias_parameters

    with stage("evaluating the pruned model on held-out text", "evaluate_after"):
        after_q = C.quality(args, loaded, held, reference=before_q)
    speed = None
    if args.speed:
        with stage("measuring speed, unpruned and pruned interleaved", "speed"):
            shapes = {k: v for k, v in (("prefill", args.speed_prefill), ("decode", args.speed_decode)) if v is not None}
            speed = E.compare_speed(reference, loaded.model, **shapes)  # not given: compare_speed's defaults
    sizes = measure(loaded.model, dtype=SAVE_TYPES[saved_as])
    sizes["parameters"] += declared_bias_parameters(loaded.model)  # the zero biases the save declares: as loaded
    report.update({"after": {**C._public(after_q), **sizes}, "speed": speed, "seconds": stage.seconds})
    return report


def _export_gguf(args, stage, loaded):
    """A GGUF input is also written as GGUF (see :mod:`headprune.hf.gguf_export`: llama.cpp's
    ``llama`` architecture for a uniform layout, ``deci`` for per-layer head counts): to a
    temporary file beside ``--out``, moved into the output with the rest. ``(path, the
    architecture written, the folders made for it)``, or ``None`` (and a note why) when none is
    written."""
    if loaded.checkpoint_dtype != "gguf":
        return None
    from ..hf.gguf_export import export_architecture, export_gguf

    source = Path(loaded.source)
    tmp, made = atomic.temp_sibling(C._out(args, "prune").absolute().parent / "model.gguf"), []
    try:
        atomic.make_folders(os.path.dirname(tmp), made)  # as the output's staging does (a first run's headprune-out/)
        with stage("writing the GGUF (attention in the input's quantisation)", "gguf"):
            export_gguf(loaded.model, tmp, source=source)
            arch = export_architecture(loaded.model)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        atomic.remove_folders(made)
        if not isinstance(e, ValueError):
            raise
        C._warn(f"no model.gguf written: {e}")
        return None
    return tmp, arch, made


def _drop_gguf(gguf) -> None:
    """The temporary GGUF removed (moved into the output if it was written), and the folders
    made for it (empty unless the output was written there)."""
    if gguf is not None:
        if os.path.lexists(gguf[0]):
            os.unlink(gguf[0])
        atomic.remove_folders(gguf[2])


def _recipe(args, kw: dict, removal: str, scores, values: bool = False, refit_bias: bool = True) -> str:
    """The recipe that ran, in words (for the console and the reports)."""
    from ..ranking.layouts import has_grouped_queries
    from ..ranking.recipes import default_for, is_causal

    return describe_recipe(kw, removal, args.sequential, args.damping, values=values, refit_bias=refit_bias,
                           steps=args.steps,
                           default=default_for(scores) if kw.get("score") is None else None, causal=is_causal(scores),
                           grouped=has_grouped_queries(scores),
                           measured_first=_measures_uniform(args, kw, removal, scores))


def _measures_uniform(args, kw: dict, removal: str, scores) -> bool:
    """Whether ``--uniform`` re-chooses the first layer's heads by measurement
    (:func:`headprune.hf.uniform.measures`)."""
    from ..hf.uniform import measures

    return measures(kw, removal, scores, iterative=args.steps != 1, sequential=args.sequential)


def _choose(args, stage, loaded, batches, scores, kw: dict, removal: str, settings: dict) -> tuple:
    """The heads to prune (``--score learned``: after training the gates, kept in ``settings``;
    the default's protected layers unless ``--protect-layers`` or ``--uniform`` says otherwise;
    ``settings["refit_bias"]``: whether the refit will move the output bias, see ``refit_bias_of``;
    under --distributed, the writing rank on every batch as one process; the others in rounds only)."""
    if not C._is_writer() and args.steps == 1:  # (settings["refit_bias"]: after the collection's fingerprint)
        return {}, scores
    settings["refit_bias"] = refit_bias_of(loaded.model, args.uniform, removal, refits_values(args, loaded, removal))
    if kw.get("score") == "learned":  # the budget the selection will apply, checked before minutes of training
        budget = learned_budget(kw, scores, ratio=args.ratio, count=args.count, damping=args.damping)
        with stage("learning head gates on the calibration text", "learn"):
            learned = _learn(args, loaded, batches, scores, budget)
        settings["learned"] = learned.to_dict()
        if learned.stopped == "time_budget" and learned.open_fraction > learned.target_open + 0.05:
            C._warn(f"--learn-seconds: the gates' training stopped at step {learned.steps}, before their open fraction "
                    f"came down to the budget ({learned.open_fraction:.2f} against {learned.target_open:.2f}): "
                    "the heads are ranked by gates close to their start; give more seconds or fewer --learn-steps")
        kw = learned_selection(kw, learned.scores, scores)
    with stage("choosing heads", "select"):
        return _select(args, loaded, batches, scores, kw, removal, settings["refit_bias"])


def _learned_protection(kw: dict, scores) -> dict:
    """``--score learned`` keeps the default's protected layers (``learned_protection``): named
    in ``kw``, so the settings, the recipe text and the heatmap say so."""
    return learned_protection(kw, scores) if kw.get("score") == "learned" else kw


def _learn(args, loaded, batches, scores, budget: dict):
    """``--score learned``: hard-concrete gates trained toward the selection's budget
    (:func:`~headprune.app.sweep_reach.learned_budget`)."""
    from ..hf.learned import learn_gates
    from .arguments import LEARN_STEPS

    if not 0 < budget["ratio"] < 1:
        flag = f"--ratio {args.ratio}" if args.ratio is not None else f"--count {args.count}"
        whole = f" (layers {budget['protect_layers']} are kept whole)" if budget["protect_layers"] else ""
        raise ValueError(f"{flag}: the selection removes {'every' if budget['ratio'] else 'no'} head of the layers it "
                         f"may prune{whole}, so learned gates have nothing to rank; ask for another budget or --score")
    return learn_gates(loaded.model, list(batches), **budget, steps=args.learn_steps or LEARN_STEPS,
                       time_budget_s=args.learn_seconds, scores=scores if scores.outputs is not None else None,
                       progress=not args.quiet, checkpoint=args.learn_checkpoint,
                       resume=args.learn_checkpoint is not None, seed=args.seed)


def _select(args, loaded, batches, scores, kw: dict, removal: str, refit_bias: bool = True) -> tuple:
    if args.steps != 1:  # every rank runs the rounds: each re-collection is collective
        from .. import distributed
        from ..hf import collect, select_iteratively

        base = functools.partial(distributed.collect if getattr(args, "distributed", False) else collect,
                                 fused=C._fused(args))

        def gather(*a, moments=False, **kw):  # every round's moments in --moments-dtype, as the first's
            return base(*a, moments=moments and args.moments_dtype, **kw)
        heads, last = select_iteratively(loaded.model, batches, steps=args.steps, ratio=args.ratio, count=args.count,
                                         scores=scores, progress=not args.quiet and C._is_writer(),
                                         removal=removal, damping=args.damping, collect_fn=gather, fresh=True, **kw)
    elif kw.get("scope") == "measured":
        from ..hf.allocation import select_measured

        opts = {k: v for k, v in kw.items() if k != "scope"}
        if args.sequential:  # it re-chooses each layer's heads by the ranking: measure the ranking's
            opts.setdefault("choose", "ranking")
        heads, _ = select_measured(loaded.model, batches, scores, ratio=args.ratio, count=args.count,
                                   damping=args.damping, progress=not args.quiet, **opts)
        last = scores
    else:
        heads, last = select_heads(scores, ratio=args.ratio, count=args.count, damping=args.damping, **kw), scores
        if _measures_uniform(args, kw, removal, scores):
            from ..hf.uniform import MAX_OPTIONS, measure_uniform

            heads, measured = measure_uniform(loaded.model, batches, scores, heads, damping=args.damping,
                                              progress=not args.quiet, refit_bias=refit_bias)
            for site, r in measured["sites"].items():
                if r["method"] == "ranking":
                    C._warn(f"--uniform: layer {site} has {r['options']} sets of heads of its layout, too many to "
                            f"measure in {MAX_OPTIONS} forwards (every set, or one KV group at a time); it keeps "
                            "the ranking's heads")
    if args.sequential:
        heads, last = _sequential(args, loaded, batches, last, heads)
    return heads, last


def _sequential(args, loaded, batches, scores, heads: dict) -> tuple:
    """The selection's per-site counts, re-chosen and refit layer by layer (``--sequential``)."""
    from ..hf.sequential import calibrate_sequentially

    return calibrate_sequentially(loaded.model, batches, scores, unit_counts(heads, scores, args.gqa), gqa=args.gqa,
                                  damping=args.damping,
                                  progress=not args.quiet)


def _saved_type(args, loaded) -> str:
    """The type the model is saved in, checked against --dtype (:func:`check_saved_type`); a
    --dtype narrower than the checkpoint rounds every weight, those pruning leaves alone too: said."""
    check_saved_type(args, loaded, saved_as := _save_dtype_name(args, loaded))
    computes, stored = next(loaded.model.parameters()).dtype, SAVE_TYPES[stored_type_name(loaded)]
    if torch.finfo(computes).bits < torch.finfo(stored).bits:
        name = str(computes).removeprefix("torch.")
        C._warn(f"--dtype {name} rounds every weight of the {stored_type_name(loaded)} checkpoint, those pruning "
                f"leaves alone too: the model saved ({saved_as}) holds what was evaluated; leave --dtype out to "
                "keep the checkpoint's precision")
    return saved_as


def _save_dtype_name(args, loaded) -> str:
    """The float type the pruned model is saved in: ``--save-dtype``, or the checkpoint's own
    float type (bfloat16 for a quantised GGUF, float32 where the type is unknown or wider)."""
    return stored_type_name(loaded) if args.save_dtype == "auto" else args.save_dtype


def _write(args, out: Path, loaded, scores, heads, settings, report, metric, save_pruned, gguf=None) -> None:
    with C.output_dir(out, args.force, C._stages(args)) as tmp:
        if gguf is not None:
            os.replace(gguf[0], tmp / "model.gguf")
            report.update(gguf="model.gguf", gguf_architecture=gguf[1])
        loaded.model.to(SAVE_TYPES[settings["saved_dtype"]])  # exact: rounded before the evaluation
        with tokenizer_as_loaded(loaded.tokenizer) as tokenizer:
            save_pruned(loaded.model, tmp / "model", tokenizer=tokenizer, scores=scores, settings=settings)
        report["saved_bytes"] = sum(p.stat().st_size for p in (tmp / "model").rglob("*") if p.is_file())
        report["saved_weight_bytes"] = weight_bytes(tmp / "model")
        report["input_bytes"] = loaded.input_bytes  # the input's weight files
        protected = list(protected_layers(scores, settings))
        report["layers_whole"] = {"protected": protected, "none_chosen": [  # said in report.md: none of the budget
            i for i in range(scores.num_sites) if scores.num_heads[i] and not heads.get(i) and i not in protected]}
        C._write_json(tmp / "report.json", report)
        C._write_json(tmp / "scores.json", scores.to_dict(), strict=False)
        (tmp / "report.md").write_text(report_markdown(report, summary_table(report, metric)))
        plots.heatmap(scores, tmp / "heatmap.png", pruned=heads, title=f"{args.model}: pruned heads",
                      selection=selection_values(scores, settings), selection_label=selection_label(scores, settings),
                      protected=protected)
    if loaded.input_bytes and report["saved_weight_bytes"] > loaded.input_bytes and \
            _wider(settings["saved_dtype"], loaded.checkpoint_dtype):  # weights against weights, in a wider type
        C._warn(f"the saved model's weights ({report['saved_weight_bytes'] / 2**20:,.0f} MiB, {settings['saved_dtype']}) "
                f"are larger than its input's ({loaded.input_bytes / 2**20:,.0f} MiB); --save-dtype chooses the float "
                "type")


def _wider(saved: str, stored) -> bool:
    """Whether the saved float type holds more bits than the input's (a quantised GGUF, float32
    of a 16-bit checkpoint; unknown: yes). In the input's own type a larger file holds only what
    the pruning added: the zero q/k/v/o biases a declared output bias brings, which no type saves."""
    return type_bits(stored) is None or (type_bits(saved) or 32) > type_bits(stored)


def _check_layout_rounded(args, n: int, total: int, scores, measured: bool = False) -> None:
    """--uniform and --gqa even round the request to whole layouts, and a measured allocation
    to what the layers may give: say so when they did, and refuse a selection that rounds to no
    head (the output would be the unpruned model)."""
    grouped = has_grouped_queries(scores)
    sizes = set(unit_sizes(scores, args.gqa))  # a unit's query heads at each site (--gqa group: whole groups)
    if n == 0:
        refuse_no_head(args, grouped)
    if len(sizes) != 1:
        return  # groups of several sizes: the request has no one size in heads
    (size,) = sizes
    units = int(args.ratio * (total // size) + 1e-9) if args.ratio is not None else args.count
    want = units * size
    if n == want:
        return
    even = args.gqa == "even" and grouped
    if getattr(args, "uniform", False):  # the layouts every layer may take: --min-heads-per-layer caps them
        what = "--uniform" + (f" with --min-heads-per-layer {args.min_heads_per_layer}"
                              if (args.min_heads_per_layer or 1) > 1 else "") + ": the nearest layout"
    elif measured or not even:  # a measured allocation takes the nearest total the layers it may prune reach
        layouts = ", in --gqa even layouts" if even else ""
        what = f"the layers --protect-layers and --min-heads-per-layer leave open{layouts}: the nearest allocation"
    else:
        what = "--gqa even: the nearest layout"
    C._warn(f"{what} removes {n} heads ({n / total:.1%}), not the {want} requested ({want / total:.1%})")


def _warn_if_kv_grew(report: dict) -> None:
    kv = (report["before"].get("kv_heads"), report["after"].get("kv_heads"))
    if None not in kv and kv[1] > kv[0]:
        print(f"headprune: warning: KV heads grew from {kv[0]} to {kv[1]}: --gqa query repeats the KV head of a "
              "partly pruned group, so the KV cache grows; --gqa even (the default) keeps every group even and "
              "never grows it, --gqa group prunes whole groups and shrinks it most (docs/quality.md)",
              file=sys.stderr)
