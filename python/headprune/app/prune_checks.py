"""``headprune prune``'s checks of its options, against each other and against the model's
attention sites, before the collection (``select_heads`` checks the selection's options again
against the statistics)."""

from __future__ import annotations

import math

from ..ranking import default_allocation
from . import commands as C
from .inputs import no_groups, refuse_inside_out
from .recover_command import check_recovery
from .sweep import check_removal_options, refit_bias_of, removal_of


def check_options(args) -> None:
    """Options that contradict each other, refused before anything slow runs: --uniform chooses
    one layout for every layer in one round, --sequential re-chooses every layer's heads; the
    recovery's options (``check_recovery``)."""
    check_recovery(args)
    check_removal_options(args)
    if not args.speed and (args.speed_prefill is not None or args.speed_decode is not None):
        raise ValueError("--speed-prefill/--speed-decode: shapes --speed times; drop them, or --no-speed")
    rounds = _rounds(args)
    if args.score == "learned" and rounds:
        raise ValueError("--steps: iterative pruning is not supported with --score learned; use --steps 1")
    if args.score == "learned" and args.order is not None:
        raise ValueError("--order: learned gates prune the lowest log alpha first; drop --order")
    if args.score != "learned" and (args.learn_checkpoint is not None or args.learn_seconds or args.learn_steps):
        raise ValueError("--learn-steps/--learn-seconds/--learn-checkpoint: only --score learned trains gates")
    _refuse_unused(args)
    refuse_inside_out(C._out(args, "prune"), args.learn_checkpoint, "--learn-checkpoint")
    if args.learn_checkpoint is not None:  # a file that is no such checkpoint: refused before the collection
        from ..hf.learned import FORMAT
        from ..hf.training import refuse_other_kind

        refuse_other_kind(args.learn_checkpoint, FORMAT, "learned-gates", "--learn-checkpoint")
    if args.scope == "measured" and (rounds or getattr(args, "uniform", False) or args.kv_ratio):
        raise ValueError("--scope measured: chooses each layer's share in one round; drop --steps, --uniform and "
                         "--kv-ratio")
    if args.kv_ratio:
        if args.gqa != "even" or getattr(args, "uniform", False):
            raise ValueError("--kv-ratio: needs --gqa even without --uniform (--gqa group removes KV heads in the "
                             "ratio of the query heads)")
        if args.sequential:
            raise ValueError("--sequential: re-chooses heads after the selection, which may keep KV groups --kv-ratio "
                             "removed; drop one")
        if rounds:
            raise ValueError("--steps: --kv-ratio is a share of the KV heads one selection removes, which an early "
                             "round's share of the heads cannot hold; use --steps 1 or drop --kv-ratio")
    _check_sequential(args)
    if args.moments_dtype != "float64" and removal_of(args) != "refit" and args.score not in (None, "reconstruction"):
        raise ValueError(f"--moments-dtype {args.moments_dtype}: no second moments are collected with "
                         f"--no-reconstruct and --score {args.score}; drop it")
    if not getattr(args, "uniform", False):
        return
    if rounds:
        raise ValueError("--steps: iterative pruning is not supported with --uniform; use --steps 1")
    if args.sequential:
        raise ValueError("--sequential: re-chooses each layer's heads, which a --uniform layout fixes; drop one")
    if args.protect_layers:
        raise ValueError("--protect-layers: a --uniform selection prunes every layer alike; drop one")


def _refuse_unused(args) -> None:
    """--seed and --damping given where nothing reads them (they were recorded in the report as
    if they had chosen or refit something)."""
    given = getattr(args, "given", set())
    if "seed" in given and args.order != "random" and args.score != "learned":
        raise ValueError("--seed: seeds --order random and --score learned's gates, neither of which this run uses; "
                         "drop it")
    if "damping" in given and not args.reconstruct and args.score not in (None, "reconstruction") \
            and args.scope != "measured" and not getattr(args, "uniform", False):
        raise ValueError(f"--damping: damps the refit and the reconstruction score, neither of which --no-reconstruct "
                         f"--score {args.score} uses; drop it")


def _rounds(args) -> bool:
    """Whether --steps asks for iterative rounds ("auto" is resolved on the model by check_model,
    which checks the options again)."""
    return args.steps not in (1, "auto")


def _check_sequential(args) -> None:
    """--sequential keeps only each layer's count from the selection and re-chooses every
    layer's heads by the refit's error on the unpruned model's calibration, pruned layer by
    layer: what would change the heads before it is refused."""
    if not args.sequential:
        return
    if removal_of(args) != "refit":
        raise ValueError("--sequential: calibrates the least-squares refit; drop --no-reconstruct")
    if _rounds(args):
        raise ValueError("--steps: --sequential calibrates the unpruned model layer by layer, so earlier rounds "
                         "would be discarded; drop one")
    if args.order is not None:
        raise ValueError("--order: --sequential re-chooses each layer's heads by the refit's error; drop --order")
    if args.score == "learned":
        raise ValueError("--score learned: --sequential re-chooses each layer's heads by the refit's error, so "
                         "the trained gates would decide only each layer's count; drop one")


def refuse_below_one(flag: str, ratios: list, units: int, what: str) -> None:
    """A fraction of the model's ``units`` that rounds down to none is refused, naming the least
    one that does not (rounded up, so that it is accepted)."""
    small = [r for r in ratios if int(r * units + 1e-9) == 0]
    if small:
        raise ValueError(f"{flag}: {small[0]:g} of the model's {units} {what} is less than one; give at least "
                         f"{math.ceil(1e4 / units) / 1e4:g}")


def check_model(args, loaded) -> None:
    """--protect-layers, --kv-ratio and --sequential's --score against the model's attention sites
    and kind (the command line prunes causal LMs and encoders: one stack of layers each)."""
    from ..hf.adapters import get_adapter, head_counts, resolve_sites
    from ..hf.prune import STATE_ATTR
    from ..ranking.layouts import grouped_queries
    from ..ranking.select import SplitGroupsError
    from ..stats.scores import repeated_kv

    adapter = get_adapter(loaded.model)
    sites = resolve_sites(loaded.model, adapter)
    bad = sorted(i for i in args.protect_layers or () if not 0 <= i < len(sites))
    if bad:
        raise ValueError(f"--protect-layers: indices {bad} out of range for {len(sites)} layers (attention sites "
                         f"0-{len(sites) - 1})")
    grouped = grouped_queries(head_counts(s, adapter) for s in sites)  # a model without: a head is its group
    unit = "KV groups" if getattr(args, "gqa", None) == "group" and grouped else "query heads"  # --count's unit
    state = getattr(loaded.model, STATE_ATTR, None)
    split = repeated_kv(state and state["kv"])
    if getattr(args, "gqa", None) == "group" and split:
        raise SplitGroupsError(split, cli=True)
    units = [head_counts(s, adapter)[unit == "KV groups"] for s in sites]
    refuse_below_one("--ratio", [] if args.ratio is None else [args.ratio], sum(units), unit)
    if args.count is not None and args.count > sum(units):
        raise ValueError(f"--count: {args.count} is more than the model's {sum(units)} {unit}")
    if args.steps == "auto":  # as many rounds as select_iteratively takes; one is no iteration
        from ..hf.iterative import auto_steps
        from ..ranking.select import budget

        args.steps = auto_steps(budget(args.ratio, args.count, sum(units)), sum(units))
        check_options(args)  # the options' checks of iteration, on the rounds that run
    if (args.min_heads_per_layer or 0) >= max(units, default=0) > 0:
        raise ValueError(f"--min-heads-per-layer: {args.min_heads_per_layer} keeps all {max(units)} {unit} of every "
                         "layer, so nothing could be pruned")
    if args.kv_ratio and not grouped:
        cfg = loaded.model.config  # a pruned layout keeps the original config where no config can express it
        was = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) < cfg.num_attention_heads
        raise ValueError("--kv-ratio: " + ("the model's pruning gave every query head its own KV head (--gqa query "
                                           "repeats them), so no group is left to remove" if was else no_groups(args.model)))
    if getattr(args, "uniform", False) and args.gqa == "query" and grouped:
        raise ValueError("--gqa query: a --uniform layout keeps every KV group even (a config declares one layout); "
                         "drop --gqa query")  # it was taken as even layouts, and recorded as query
    if args.sequential and args.score is not None and (
            args.scope == "per_layer" or args.scope is None and loaded.kind == "causal"):
        raise ValueError("--score: with --sequential each layer's heads are re-chosen by the refit's error, and "
                         "per layer the selection's counts do not depend on the score; drop --score, or give "
                         "--scope global")
    check_reach(args, loaded)


def check_reach(args, loaded) -> None:
    """What the selection can reach on the model's layout alone (protected layers, the heads
    every layer keeps, the layouts --gqa even and --uniform allow), checked before the
    collection as ``select_heads`` checks it after: on the layout without statistics, every
    head ranked alike (a measured allocation takes the nearest total it reaches, warned, up to
    the most any allocation reaches)."""
    from ..ranking import select_heads
    from ..ranking.layouts import has_grouped_queries
    from .sweep_reach import learned_protection, model_layout, on_layout

    removal = removal_of(args)  # moments where they are collected: the default resolves alike
    layout = model_layout(loaded.model, moments=removal == "refit" or args.score in (None, "reconstruction"))
    kw = with_scope(args, C._selection_kwargs(args), layout, removal)
    measured = kw.get("scope") == "measured"  # it takes the nearest total it reaches: only more than the
    if measured:                                # most any allocation reaches is refused here
        kw = {**kw, "scope": "global"}
    if kw.get("score") == "learned":
        kw = learned_protection({k: v for k, v in kw.items() if k != "score"}, layout)
    kw, recipe = on_layout(layout, kw)
    try:
        chosen = select_heads(layout, ratio=args.ratio, count=args.count, damping=args.damping, **kw)
    except ValueError as e:  # with why the recipe protects its layers, as the selection says it afterwards
        if "protect_layers" not in str(e) or recipe.why_protected in str(e):
            raise
        raise ValueError(f"{e}{recipe.why_protected}") from None
    if measured:
        return
    if not any(chosen.values()):  # no layout is small enough, whatever the ranking
        refuse_no_head(args, has_grouped_queries(layout))
    if kw.get("uniform"):
        from .removal_stage import refits_values

        values = refits_values(args, loaded, removal)
        adds_bias = removal != "zero" and refit_bias_of(loaded.model, True, removal, values)  # as prune removes
        warn_not_plain(loaded.model, layout, chosen, adds_bias, getattr(args, "mode", None) == "mask")


def warn_not_plain(model, layout, chosen: dict, adds_bias: bool, masked: bool = False) -> None:
    """--uniform promises a directory plain ``from_pretrained`` loads: say before the work where
    the family's config cannot describe the layout (no head size of its own, or a validation
    that refuses the count: Llama and Gemma 2 want the heads to divide ``hidden_size``), or an
    output bias the removal ``adds_bias`` (mean compensation, the value refit; the output refit
    alone leaves it out there: ``refits_bias``) where the config declares none. A ``masked``
    model keeps its shapes: only the bias can make it not plain."""
    from ..hf.adapters import get_adapter
    from ..hf.configs import config_accepts
    from ..hf.uniform import refits_bias

    adapter, site = get_adapter(model), 0
    hq, hkv, d = layout.num_heads[site], layout.num_kv_heads[site] or layout.num_heads[site], layout.head_dim[site]
    kept = [p for p in range(hq) if p not in set(layout.positions(site, chosen.get(site, [])))]
    n, groups = len(kept), len({p // (hq // hkv) for p in kept})
    mask, why = " (--mask keeps the shapes and saves plainly)", None
    if not masked and adapter.config_head_dim is None:
        why = f"{adapter.model_type}'s config derives the head size from hidden_size"
    elif not masked and not config_accepts(model.config, adapter, n, groups, d):
        why = (f"{adapter.model_type}'s config refuses {n} attention heads (transformers' validation: hidden_size "
               f"{getattr(model.config, 'hidden_size', '?')} must be a multiple of them)")
    if why is None and adds_bias and not refits_bias(model):
        why = (f"{adapter.model_type}'s config declares no attention output bias, which mean compensation "
               "(--no-reconstruct) and the value refit (--refit-values) add (the output refit alone leaves it out "
               "and saves plainly)")
        mask = ""
    if why is None:
        return
    C._warn(f"--uniform: {why}, so the directory loads with headprune.load_pruned, not plain from_pretrained{mask}")


def refuse_no_head(args, grouped: bool) -> None:
    """A selection that rounds to no head: the output would be the unpruned model. ``grouped``:
    whether the model has grouped queries (only then do --gqa's layouts round)."""
    ask = f"--ratio: {args.ratio:g}" if args.ratio is not None else f"--count: {args.count}"
    if getattr(args, "uniform", False):
        why = " (--uniform: every layer loses the same number of heads, and the nearest such layout is none)"
    elif args.gqa == "even" and grouped:
        why = " (--gqa even keeps the query heads of every KV group a layer keeps equal)"
    else:
        why = ""
    raise ValueError(f"{ask} rounds to no head in the layouts the selection allows{why}; ask for more")


def with_scope(args, kw: dict, scores, removal: str) -> dict:
    """``kw`` with the scope that runs: ``--scope``, else measured where that is the default
    (encoders with the refit, see ``default_allocation``) and nothing rules it out (iterative
    rounds, one layout, a KV budget). Under ``--distributed`` the writing rank measures on every
    calibration batch, as one process does."""
    if kw.get("scope") == "measured":
        if removal != "refit":
            raise ValueError("--scope measured: measures what removing heads with the refit costs; drop "
                             "--no-reconstruct")
        return kw
    if kw.get("scope") is None and default_allocation(
            scores, removal, iterative=args.steps != 1, uniform=bool(kw.get("uniform")),
            kv_ratio=kw.get("kv_ratio")) == "measured":
        return {**kw, "scope": "measured"}
    return kw
