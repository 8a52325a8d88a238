"""How ``headprune prune`` replaces the heads it removes: whether the least-squares refit
includes the kept heads' value rows, and the removal stage itself."""

from __future__ import annotations


def refits_values(args, loaded, removal: str) -> bool:
    """Whether the refit includes the kept heads' value rows: ``--refit-values``, else where
    that is the default (:func:`headprune.hf.values.refits_values_by_default`) and the refit is
    the one-shot one on one process's batches."""
    from ..hf.values import refits_values_by_default

    want = getattr(args, "refit_values", None)
    if want is False:
        return False
    other = values_conflicts(args, removal, args.steps)
    if want:
        refuse_values(loaded, other)
        return True
    return not other and refits_values_by_default(loaded.model)


def refuse_values(loaded, other: list) -> None:
    """``--refit-values`` asked for: refused with the ``other`` options that rule it out, or
    for a model without a value projection per query head (prune and sweep, before collecting)."""
    from ..hf.values import supports_values

    refuse_values_with(other)
    if not supports_values(loaded.model):
        raise ValueError("--refit-values: needs a value projection of its own for every query head (not fused "
                         "q/k/v, not grouped-query attention)")


def values_conflicts(args, removal: str, steps: int) -> list:
    """The options given that rule out the value refit (the one-shot refit; under --distributed the
    writing rank collects its moments on every calibration batch, as one process does)."""
    given = (("--no-reconstruct", removal != "refit"), ("--sequential", getattr(args, "sequential", False)),
             ("--steps", steps != 1))
    return [flag for flag, on in given if on]


def refuse_values_with(other: list) -> None:
    if other:
        raise ValueError(f"--refit-values: extends the one-shot least-squares refit; drop "
                         f"{', '.join(other)}")


def remove(args, stage, loaded, batches, heads: dict, how: dict, values: bool, mode: str) -> None:
    """Mask or prune ``heads`` with the removal ``how`` (``values``: the value moments of the
    kept heads collected first, in one more forward pass)."""
    from ..hf import mask_heads, prune_heads

    if values:
        from ..hf.values import collect_values

        with stage("collecting the kept heads' value moments in one more forward pass", "values"):
            how = {**how, "values": collect_values(loaded.model, batches, heads, progress=not args.quiet)}
    refit = ", refitting the kept heads' value rows and output columns" if values else \
        ", refitting the kept heads' output columns" if how.get("reconstruct") is not None else ""
    with stage(f"removing the heads ({'masked' if mode == 'mask' else 'physically'}{refit})", "remove"):
        (mask_heads if mode == "mask" else prune_heads)(loaded.model, heads, **how)


def remove_zeroed(args, loaded, settings: dict) -> None:
    """A masked model (``prune --mask``'s output) holds heads whose output columns are zero:
    masking again would choose them again, so that is refused; otherwise they are removed
    physically before anything is measured (exact: they add nothing), and the request applies
    to the heads left, as for any pruned input (``settings["masked_in_input"]`` counts them)."""
    from ..hf.prune import prune_heads, zeroed_heads

    zeroed = zeroed_heads(loaded.model)
    n = sum(map(len, zeroed.values()))
    if not n:
        return
    if getattr(args, "mode", None) == "mask":  # the sweep has no --mask: it masks nothing it keeps
        raise ValueError(f"MODEL: {args.model} already holds {n} masked heads (their output columns are zero), which "
                         "masking again would choose first; prune it without --mask (they are removed with the "
                         "heads chosen now), or mask the unpruned model with the total ratio")
    prune_heads(loaded.model, zeroed)
    settings["masked_in_input"] = n
    if not args.quiet:
        print(f"headprune: removed the {n} heads MODEL holds masked (zero output columns: they add nothing) before "
              "measuring the others", flush=True)
