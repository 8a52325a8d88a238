"""``headprune sweep MODEL``: every recipe against a seeded random baseline at each fraction of
heads. What the model's layout rules out (a fraction below one head, one the random baseline
cannot reach, a recipe that cannot reach one, uniform layouts of uneven layers) is settled
before the collection."""

from __future__ import annotations

from ..ranking.select import SplitGroupsError
from . import commands as C
from . import plots
from .fingerprints import resumable_fingerprint
from .inputs import check_out, inputs
from .load import stored_type_name
from .prune_checks import refuse_below_one
from .sweep_journal import SweepJournal, journal_path, sweep_fingerprint
from .sweep import LEARNED_RECIPE, RECIPES, SweepConfig, check_removal_options, refit_only, removal_of, run_sweep
from .sweep_reach import BASELINE, NoHead, model_layout, out_of_reach
from .sweep_table import sweep_markdown


def sweep(args) -> int:
    out = C._out(args, "sweep")
    check_out(out, args.force, inputs(args))
    check_removal_options(args)
    loaded, batches, held, settings = C._setup(args, evaluates=True)
    from .removal_stage import remove_zeroed

    remove_zeroed(args, loaded, settings)  # a masked directory's heads, or the sweep would choose them again
    settings["checkpoint_dtype"] = loaded.checkpoint_dtype  # said under the table where prune would round
    settings["saved_dtype"] = stored_type_name(loaded)  # (to what: an unquantised GGUF's own type)
    if getattr(args, "refit_values", None):  # before the collection, as prune does (the options: before the load)
        from .removal_stage import refuse_values

        refuse_values(loaded, [])
    recipes = plan(args, loaded)
    journal = open_journal(args, out, loaded, batches, held, settings, recipes)  # every rank refuses alike
    scores = C._collect(args, loaded, batches, settings, moments=True)  # refits and the reconstruction score
    if not C._is_writer():
        return 0
    try:
        with C.output_dir(out, args.force, C._stages(args)) as tmp:
            C._say(args, f"headprune: evaluating the unpruned model, then {len(recipes)} recipes and "
                         f"{args.seeds} random draws at {len(args.ratios)} ratio(s)")
            result = run_sweep(SweepConfig.from_args(args), loaded, scores, held, settings, recipes, batches=batches,
                               journal=journal)
            C._write_json(tmp / "sweep.json", result)
            plots.sweep_plot(result, tmp / "sweep.png")
            (tmp / "sweep.md").write_text(sweep_markdown(result))
    finally:
        if any(s.committed for s in C._stages(args)):  # even if interrupted after: the points are in out
            journal.remove()
    print(sweep_markdown(result))
    print(f"wrote {out}/sweep.json, sweep.md, sweep.png")
    return 0


def open_journal(args, out, loaded, batches, held, settings, recipes) -> SweepJournal:
    """The sweep's journal (:mod:`.sweep_journal`), read with ``--resume``: its fingerprint is
    checked before the collection, and what it holds, or that a run without ``--resume`` writes over
    it, is said."""
    path = journal_path(out)
    fingerprint = resumable_fingerprint(path if args.resume else None, args, batches, settings, lambda collection:
                                        sweep_fingerprint(collection, loaded, held, SweepConfig.from_args(args), recipes))
    journal = SweepJournal(path, fingerprint, resume=args.resume, warn=C._warn)
    vars(args)["sweep_journal"] = journal  # for the interrupt message: what this run's journal holds
    if not C._is_writer():  # checked alike by every rank (refused by all), said and written by the first
        return journal
    if args.resume:
        C._say(args, f"headprune: resuming the sweep: {journal.resumed} points measured before, from {path}"
               if journal.resumed else f"headprune: no points in {path} to resume from: the sweep starts anew")
    elif path.exists():
        C._warn(f"{path} holds the points of an interrupted sweep into {out}; this run starts anew and writes over "
                "it (--resume goes on from it)")
    return journal


def plan(args, loaded) -> dict:
    """The recipes the sweep runs, from the model's head layout alone (before the collection):
    ``--ratios`` below one unit, or out of the random baseline's reach, are refused; recipes
    that cannot run or reach a fraction are left out, each with a warning, and the KV-layout
    recipes, which are the default on a model without grouped queries, silently."""
    layout = model_layout(loaded.model)  # the sweep collects second moments
    config = SweepConfig.from_args(args)
    group = config.gqa == "group" and any(k and k < h for h, k in zip(layout.num_heads, layout.num_kv_heads))
    units = sum((k or h) if group else h for h, k in zip(layout.num_heads, layout.num_kv_heads))
    refuse_below_one("--ratios", config.ratios, units, "KV groups" if group else "query heads")
    recipes = dict(RECIPES)
    if all(not k or k == h for h, k in zip(layout.num_heads, layout.num_kv_heads)):  # no grouped queries: a KV
        recipes = {k: kw for k, kw in recipes.items() if "gqa" not in kw}  # layout recipe is the default again
    elif config.gqa == "query":  # a config declares one layout: the uniform recipe keeps every KV group even
        recipes = {k: {**kw, "gqa": "even"} if kw.get("uniform") else kw for k, kw in recipes.items()}
    if args.learn_steps:
        recipes.update({k: {**kw, "learned": {"steps": args.learn_steps}} for k, kw in LEARNED_RECIPE.items()})
    if len({(h, k or h) for h, k in zip(layout.num_heads, layout.num_kv_heads)}) > 1:  # e.g. a pruned directory
        left = [k for k, kw in recipes.items() if kw.get("uniform")]
        recipes = {k: kw for k, kw in recipes.items() if not kw.get("uniform")}
        C._warn(f"the layers have different head counts, so no uniform layout exists: {', '.join(left)} left out")
    left = refit_only(recipes, removal_of(args))
    if left:
        recipes = {k: kw for k, kw in recipes.items() if k not in left}
        C._warn(f"without the refit (--no-reconstruct) nothing calibrates or measures it: {', '.join(left)} left out")
    far = out_of_reach(config, layout, recipes, layout_only=True)
    if BASELINE in far:
        r, e = far.pop(BASELINE)
        raise ValueError(f"--ratios: {r:g} is out of reach of the random baseline ({e}): ask for "
                         f"{'larger' if isinstance(e, NoHead) else 'smaller'} fractions")
    for name, (r, e) in far.items():
        advice = "" if isinstance(e, SplitGroupsError) else "; ask for smaller fractions to include it"
        C._warn(f"{name!r} cannot reach {r:g} ({e}): left out{advice}")
    recipes = {k: kw for k, kw in recipes.items() if k not in far}
    if config.gqa == "query" and any(kw.get("uniform") and kw.get("gqa") == "even" for kw in recipes.values()):
        C._warn("under --gqa query the uniform layout keeps every KV group even (--gqa even), unlike the other rows "
                "and the random draws")
    return recipes
