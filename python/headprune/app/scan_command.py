"""``headprune scan``: collect and report per-head entropies (no pruning), resumable from a
checkpoint written after every batch."""

from __future__ import annotations

from . import commands as C
from . import plots
from .inputs import check_out, inputs
from .report import scores_markdown


def scan(args) -> int:
    out = C._out(args, "scan")
    check_out(out, args.force, inputs(args))  # fail before the slow part
    loaded, batches, _, settings = C._setup(args)
    from .removal_stage import remove_zeroed

    remove_zeroed(args, loaded, settings)  # a masked directory's heads add nothing: not live heads to report
    checkpoint = C._checkpoint(out)
    scores = C._collect(args, loaded, batches, settings, checkpoint=checkpoint)
    if not C._is_writer():
        return 0
    try:
        with C.output_dir(out, args.force, C._stages(args)) as tmp:
            C._write_json(tmp / "scores.json", scores.to_dict() | {"settings": settings}, strict=False)
            plots.heatmap(scores, tmp / "heatmap.png", title=f"{args.model}: mean attention entropy")
            (tmp / "summary.md").write_text(scores_markdown(args.model, scores, settings))
    finally:
        if any(s.committed for s in C._stages(args)):  # even if interrupted after: the scores are in out
            C._remove_checkpoints(checkpoint)
    C._say(args, f"wrote {out}/scores.json, summary.md, heatmap.png")
    return 0
