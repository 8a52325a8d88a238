"""``headprune recover DIR``: distil a model pruned by ``headprune prune`` toward the model it was
pruned from, on calibration text, and save it with a report of its quality before and after on
held-out text and on the calibration text (a gain there only is overfitting).

Also the ``--recover-steps``/``--recover-seconds`` stage of ``headprune prune``
(:func:`recover_after_prune`).
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from . import commands as C
from . import evaluate as E
from . import texts
from .arguments import RECOVER_VALIDATION
from .inputs import check_out, check_teacher, inputs, load_as, model_inputs, refuse_inside_out, teacher_refusals, text_inputs
from .load import SAVE_TYPES, check_saved_type, load_model, round_to_saved, tokenizer_as_loaded
from .locate import locate, prune_folder
from .report import finite, number, sequences_text, validation_sentence

#: the report's quality columns, in order
MODELS = ("unpruned", "pruned", "recovered")
#: calibration sequences per distillation step by default: on SmolLM2-135M at 50% of heads, 10 minutes of steps of one
#: sequence over the pruning's 64 windows closed 37% of the held-out gap (benchmarks/results/recover_smollm2_64.json);
#: steps of 8, in an earlier run, managed 6 steps in 12 minutes and closed 20% (recover.json). On all-MiniLM-L6-v2 at
#: 50%, 3 minutes of steps of 2 paragraphs added 0.0067 held-out fidelity, steps of 8 added 0.0030
#: (recover_minilm_batch2.json, recover_minilm_batch8.json)
STEP_SEQUENCES = {"causal": 1, "encoder": 2}


def recovery_batches(loaded, parts: list, samples, seq_len: int, batch_size: int, device, names=None) -> list:
    """What recovery trains on, on ``device``: ``samples`` sequences shared equally by the texts
    in ``parts``, or, with ``samples=None`` (the default), every calibration sequence of every
    text (every paragraph for encoders, every window of ``seq_len`` tokens for causal LMs), the
    texts' batches interleaved so that a run stopped early has trained on each. More text
    generalises better: on all-MiniLM-L6-v2 at 50%, 3 minutes of steps over the default text's
    806 paragraphs reached 0.9607 held-out fidelity (benchmarks/results/recover_minilm.json at edfe701),
    against 0.9530 over the 256 the selection calibrates on (that file at 9bc6772); on
    SmolLM2-135M, 10 minutes over its 217 windows closed 64% of the held-out perplexity gap
    (recover_smollm2_batch1.json at 74cb3bc), over the pruning's 64 windows 37% (recover_smollm2_64.json).
    Teacher targets are cached per batch when first used, so their memory grows with the steps
    run, not with the text. ``names``: the texts of ``parts``, for a refusal of a short one."""
    causal = loaded.kind == "causal"
    if samples is None:
        per_text = [texts.named_text(names, i, lambda part=part: texts.calibration_batches(
            loaded.tokenizer, part, causal=causal, samples=sys.maxsize, seq_len=seq_len, batch_size=batch_size))
            for i, part in enumerate(parts)]
        batches = texts.interleave(per_text)
    else:
        batches = texts.mixed_calibration_batches(loaded.tokenizer, parts, causal=causal, samples=samples,
                                                  seq_len=seq_len, batch_size=batch_size, names=names)
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def split_validation(batches: list, fraction: float, flag: str = "--validation",
                     more: str = "calibrate on more samples") -> tuple:
    """``(training batches, validation batches or None)``: ``fraction`` of the batches (at least
    one), spread evenly over them, kept out of training; ``flag`` gave it, ``more`` says how to
    have more batches (for the refusal of a split that leaves none to train on)."""
    if not fraction:
        return batches, None
    n = len(batches)
    k = max(1, round(n * fraction))
    if k >= n:
        raise ValueError(f"{flag}: {fraction:g} of {n} calibration batches leaves none to train on; "
                         f"pass 0 or {more}")
    held = {int((j + 0.5) * n / k) for j in range(k)}
    return [b for i, b in enumerate(batches) if i not in held], [batches[i] for i in sorted(held)]


def recover_stage(args, student, teacher, split: tuple, *, steps, lr, seconds=None, checkpoint=None) -> dict:
    """Distil ``student`` toward ``teacher`` in float32 (half-precision students are trained in
    float32 and cast back) on the training batches of ``split`` (:func:`split_validation`), its
    validation batches choosing the best step, for ``steps`` and/or ``seconds``, keeping its
    state in ``checkpoint`` and resuming from it when it exists, with a progress bar unless
    ``--quiet``; the library's report, with the validation batches' count."""
    from ..hf import recover

    train, held = split
    report = recover(student, teacher, train, steps=steps, lr=lr, validation=held, progress=not args.quiet,
                     time_budget_s=seconds, checkpoint=checkpoint, resume=checkpoint is not None)
    return report.to_dict() | {"validation_batches": 0 if held is None else len(held)}


def recovers(args) -> bool:
    """Whether ``--recover-steps`` or ``--recover-seconds`` asks for recovery."""
    return bool(args.recover_steps or args.recover_seconds)


def budget(steps, seconds) -> str:
    """How long a recovery runs, in words (``steps`` and/or ``seconds``; 0 or None: not given)."""
    parts = ([f"{steps} distillation steps"] if steps else []) + ([f"{seconds:g} s"] if seconds else [])
    return " or ".join(parts) + (" (whichever ends first)" if len(parts) == 2 else "")


def check_recovery(args) -> None:
    """``prune``'s recovery options, before anything slow runs: training needs a physical pruning."""
    if recovers(args) and args.mode == "mask":
        raise ValueError(f"{'--recover-steps' if args.recover_steps else '--recover-seconds'}: needs --physical "
                         "(training would revive the masked heads)")
    if not recovers(args) and (args.recover_lr is not None or args.recover_validation is not None):
        raise ValueError("--recover-lr/--recover-validation: only --recover-steps or --recover-seconds recovers")


def recover_validation(args) -> float:
    """``--recover-validation``, or its default."""
    return RECOVER_VALIDATION if args.recover_validation is None else args.recover_validation


def recovery_split(args, loaded, settings: dict):
    """``--recover-steps``/``--recover-seconds``: the sequences and as many per step as ``headprune
    recover`` takes by default (every calibration sequence of the text), split for training and
    validation (refused before the slow stages where that leaves none to train on); else ``None``."""
    if not recovers(args):
        return None
    batches = recovery_batches(loaded, texts.load_split(args.data)[0], None, settings["seq_len"],
                               STEP_SEQUENCES[loaded.kind], args.device, texts.spec_names(args.data))
    return split_validation(batches, recover_validation(args), "--recover-validation", "a longer --data text")


def recover_after_prune(args, stage, loaded, teacher, split):
    """Distil the pruned model toward the unpruned one (before it is rounded to the saved type and
    evaluated) on ``split`` (:func:`recovery_split`); the library's report, or ``None``."""
    if split is None:
        return None
    samples = texts.sequences(split[0] + (split[1] or []))
    with stage(f"recovering: {budget(args.recover_steps, args.recover_seconds)} toward the unpruned model", "recover"):
        result = recover_stage(args, loaded.model, teacher, split, steps=args.recover_steps or None,
                               lr=args.recover_lr, seconds=args.recover_seconds)
    return result | {"samples": samples}


def read_report(path: Path, arg: str):
    """The JSON of ``path/report.json`` (written by ``prune`` or ``recover``); ``arg`` names
    the argument that gave ``path`` in the error."""
    try:
        return json.loads((path / "report.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{arg}: {path / 'report.json'} is not valid JSON ({e})") from None


def _pruned_dir(path: Path) -> dict:
    """``report.json`` of a directory written by ``headprune prune``, checked."""
    if prune_folder(path) != path:
        raise FileNotFoundError(f"DIR: {path} is not a directory written by headprune prune "
                                "(it needs model/ and report.json)")
    report = read_report(path, "DIR")
    if not isinstance(report, dict) or not isinstance(report.get("model"), str):
        raise ValueError(f"DIR: {path / 'report.json'} has no 'model' field naming the unpruned model")
    settings = report.get("settings")
    report["settings"] = settings if isinstance(settings, dict) else {}
    if report["settings"].get("mode") == "mask":
        raise ValueError(f"DIR: {path} holds a masked model; training would revive its masked heads "
                         "(prune it with --physical)")
    return report


def named_model(report: dict) -> tuple:
    """``(spec, bundled)``: the unpruned model a prune or recover ``report`` names, by the path
    prune recorded where MODEL was a path; a bare bundled name there is the bundled model."""
    return report.get("model_path") or report.get("model"), "model_path" not in report


def calibrated_on(settings: dict):
    """The text a prune or recover folder's ``settings`` were calibrated on (its files' absolute
    paths where it names files), or None."""
    data = settings.get("data_path") or settings.get("data")
    return data if isinstance(data, str) else None


def _data_spec(args, settings: dict):
    """The text recovery reads: ``--data``, else what the directory was pruned with, else the
    default."""
    return args.data or calibrated_on(settings)


def _batches(args, loaded, settings: dict) -> tuple:
    """Calibration batches, calibration paragraphs (interleaved like the held-out ones) and
    held-out paragraphs, from the text and sizes the directory was pruned with unless given."""
    data = _data_spec(args, settings)
    parts, held = texts.load_split(data)
    d = C.DEFAULTS[loaded.kind]
    seq_len = C.seq_len_for(args, loaded, settings.get("seq_len") or d["seq_len"])
    batch_size = args.batch_size or STEP_SEQUENCES[loaded.kind]
    batches = recovery_batches(loaded, parts, args.samples, seq_len, batch_size, args.device, texts.spec_names(data))
    samples = texts.sequences(batches)
    calib = texts.interleave(parts)
    used = {"data": data or texts.DEFAULT_TEXT, "samples": samples, "seq_len": seq_len, "batch_size": batch_size,
            "calibration_tokens": texts.tokens(batches),
            "calibration_paragraphs": sum(map(len, parts)), "held_out_paragraphs": len(held)}
    paths = texts.data_paths(used["data"])
    used.update({"data_path": paths} if paths != used["data"] else {})
    return batches, {"held_out": held, "calibration": calib}, used


def _quality(args, loaded, paragraphs: dict, references: dict) -> dict:
    """The metric on each text (``references``: the unpruned model's results, for fidelity)."""
    return {name: E.quality(loaded, p, references.get(name), eval_windows=args.eval_windows, metric_only=True)
            for name, p in paragraphs.items()}


def recover(args) -> int:
    from ..hf import save_pruned
    from ..stats.scores import HeadScores

    src = Path(args.model)
    prune_report = _pruned_dir(src)  # DIR first: a mistyped directory is the likelier fault
    if args.steps is None and args.seconds is None:
        raise ValueError("--steps/--seconds: say how long to recover (either or both)")
    out = C._out(args, "recover")
    named, bundled = named_model(prune_report)
    teacher_spec = args.teacher or named
    data = _data_spec(args, prune_report["settings"])
    read = [*model_inputs("the teacher", teacher_spec), *text_inputs("the calibration text", data)]
    check_out(out, args.force, inputs(args) + tuple(read))  # also what DIR's report.json names
    _check_before_load(args, out, teacher_spec, not args.teacher and bundled)
    stage = C.Stages(args)
    with stage("loading the pruned and the unpruned model", "load"):
        student = load_model(str(src / "model"), device=args.device, dtype=args.dtype, accept=tuple(C.DEFAULTS))
        if student.tokenizer is None:
            raise ValueError(f"DIR: {src / 'model'} has no tokenizer files")
        teacher = _teacher(args, teacher_spec, student, bundled=not args.teacher and bundled)
        _check_distils(args, teacher_spec, teacher, student)  # distilled toward
        check_saved_type(args, student, _saved_dtype(prune_report["settings"], student), recovering=True)
        batches, paragraphs, used = _batches(args, student, prune_report["settings"])
        split = split_validation(batches, args.validation)  # refused before the models are evaluated
        _check_resumable(args, student.model, teacher.model, split)
        C.warn_thin(used["data"], student, paragraphs["held_out"])
    with stage("evaluating the unpruned and the pruned model", "evaluate_before"):
        q = {"unpruned": _quality(args, teacher, paragraphs, {})}
        q["pruned"] = _quality(args, student, paragraphs, q["unpruned"])
    with stage(f"recovering: {budget(args.steps, args.seconds)}", "recover"):
        result = recover_stage(args, student.model, teacher.model, split, steps=args.steps, lr=args.lr,
                               seconds=args.seconds, checkpoint=args.checkpoint)
    saved_as = _saved_dtype(prune_report["settings"], student)
    round_to_saved(student, saved_as)  # what is evaluated is what is saved
    with stage("evaluating the recovered model", "evaluate_after"):
        q["recovered"] = _quality(args, student, paragraphs, q["unpruned"])
    metric, lower = E.metric_of(student.kind)
    table = {t: {m: q[m][t][metric] for m in MODELS} for t in paragraphs}
    # the pruning's account of its text gives way to recovery's (no reference, no sample count asked)
    pruning = {k: v for k, v in prune_report["settings"].items() if k not in C.TEXT_SETTINGS}
    computes = str(next(student.model.parameters()).dtype).removeprefix("torch.")  # what the figures were taken in
    settings = {**pruning, **used, "recover_steps": args.steps, "recover_seconds": args.seconds,
                "recover_lr": result["lr"], "recover_validation": args.validation, "saved_dtype": saved_as,
                "dtype": computes, **C.windows_setting(args, student)}
    report = {"model": teacher_spec, **C.model_path(teacher_spec), "pruned": str(src), "metric": metric,
              "lower_is_better": lower, "quality": table, "recover": result, "settings": settings,
              "seconds": stage.seconds, "compute_dtype": computes, **_taken(q)}
    meta = student.pruned or {}
    scores = HeadScores.from_dict(meta["scores"]) if meta.get("scores") else None
    with stage("saving the model and the report", "save"), C.output_dir(out, args.force, C._stages(args)) as tmp:
        student.model.to(SAVE_TYPES[saved_as])  # exact: rounded before the evaluation
        with tokenizer_as_loaded(student.tokenizer) as tokenizer:
            save_pruned(student.model, tmp / "model", tokenizer=tokenizer, scores=scores,
                        settings=_recorded(meta.get("settings", {}), finite(result)))  # strict JSON
        C._write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report))
    print(f"recovered model: {out / 'model'}\nreport: {out / 'report.md'} (also report.json)\n")
    print(quality_table(report))
    return 0


def _taken(q: dict) -> dict:
    """How the figures were taken (an encoder's pooling, a causal LM's windows), for ``eval``."""
    pooled = {r.get("pooling") for r in q["unpruned"].values()} - {None}
    held = q["recovered"]["held_out"]
    return {**({"pooling": pooled.pop()} if pooled else {}), **({"windows": held["windows"]} if "windows" in held else {})}


def _check_distils(args, spec: str, teacher, student) -> None:
    """The distillation's refusal of a teacher whose outputs its loss cannot compare (another
    family, class, width or labels), before both models are evaluated, named as it was given;
    first the command line's (another tokenizer)."""
    check_teacher(spec, teacher, student, "DIR", named=not args.teacher)


def _recorded(settings: dict, result: dict) -> dict:
    """The model's settings with this recovery's record; a recovered model's earlier ones are
    kept, oldest first, under ``recover_earlier`` (a second recovery replaced the first)."""
    earlier = [*settings.get("recover_earlier", []), *([settings["recover"]] if "recover" in settings else [])]
    return {**settings, "recover": result, **({"recover_earlier": earlier} if earlier else {})}


def _saved_dtype(settings: dict, loaded) -> str:
    """The float type DIR's model was saved in (its report's, else its weights'): the recovered
    model is rounded to it and saved in it, as ``prune`` saved the pruned one."""
    for name in (settings.get("saved_dtype"), loaded.checkpoint_dtype):
        if name in SAVE_TYPES:
            return name
    return "float32"


def _check_before_load(args, out: Path, teacher_spec: str, bundled: bool) -> None:
    """Before both models load: a --checkpoint that is no file path or inside ``out``, a teacher
    that is not there (``bundled``: its name means the bundled model), a --checkpoint that is no
    recovery's (the teacher's weights, say) or that holds more steps than --steps asks for."""
    from ..hf.training import checkpoint_steps, refuse_other_kind

    refuse_inside_out(out, args.checkpoint, "--checkpoint")
    with _teacher_found(args) as arg:
        locate(teacher_spec, bundled=bundled, arg=arg)
    refuse_other_kind(args.checkpoint, flag="--checkpoint")
    held = None if args.checkpoint is None or args.steps is None else checkpoint_steps(args.checkpoint)
    if held is not None and held > args.steps:
        raise ValueError(f"--steps: {args.steps} is fewer than the {held} steps --checkpoint {args.checkpoint} "
                         "already holds (a recovery goes on from its checkpoint); ask for at least as many, or pass "
                         "another --checkpoint to start anew")


def _check_resumable(args, student, teacher, split: tuple) -> None:
    """A --checkpoint of another run refused before both models are evaluated; one of this run said."""
    from ..hf.recover import check_resume
    from ..hf.training import checkpoint_steps

    if args.checkpoint is None:
        return
    check_resume(student, teacher, split[0], checkpoint=args.checkpoint, lr=args.lr, validation=split[1],
                 arg="--checkpoint")
    if held := checkpoint_steps(args.checkpoint):  # the progress bar's count alone said so
        C._say(args, f"headprune: the recovery goes on from step {held} of --checkpoint {args.checkpoint}")


def _teacher(args, spec: str, student, bundled: bool = False):
    """The unpruned model (one of another kind or family than ``student`` refused before its
    weights are read)."""
    with _teacher_found(args) as arg:
        return load_as(arg, spec, device=args.device, dtype=args.dtype, accept=tuple(C.DEFAULTS), bundled=bundled,
                       check=teacher_refusals(spec, student, "DIR", named=not args.teacher))


@contextmanager
def _teacher_found(args):
    """The name refusals give the teacher; one named by report.json that is not found here
    points to --teacher."""
    try:
        yield "--teacher" if args.teacher else "the unpruned model"
    except FileNotFoundError as e:
        if args.teacher:
            raise
        raise FileNotFoundError(f"{e} (DIR/report.json names it as the unpruned model; pass --teacher)") from e


def gap_closed(row: dict, metric: str) -> float | None:
    """The fraction of what pruning lost that recovery won back (1: the unpruned quality);
    ``None`` where pruning lost nothing on ``metric`` (no gap: the sign would flip)."""
    lost = row["pruned"] - row["unpruned"]
    worse = lost > 0 if metric == "perplexity" else lost < 0  # perplexity: lower is better; fidelity: higher
    return (row["pruned"] - row["recovered"]) / lost if worse else None


def quality_table(report: dict) -> str:
    metric = report["metric"]
    lines = [f"| {metric} | unpruned | pruned | recovered | gap closed |", "|---|---|---|---|---|"]
    for text, row in report["quality"].items():
        closed = gap_closed(row, metric)
        lines.append(f"| {text.replace('_', '-')} text | " + " | ".join(number(row[m]) for m in MODELS)
                     + f" | {'n/a' if closed is None else f'{closed:.0%}'} |")
    return "\n".join(lines)


def _how(r: dict, s: dict) -> str:
    """How the run ended and began, where that is not plain: the time budget, a resumed run."""
    bits = []
    if r.get("stopped") == "time_budget":
        bits.append(f"stopped by the budget of {s.get('recover_seconds'):g} s")
    if r.get("resumed_from"):
        bits.append(f"resumed from step {r['resumed_from']} of a checkpoint")
    return "".join(f", {b}" for b in bits)


def _losses(r: dict) -> str:
    """The distillation loss of this call's first and last step, or that no step ran."""
    first, last = r.get("loss_first"), r.get("loss_last")
    if first is None or math.isnan(first):  # a checkpoint that held every step asked for
        return " No distillation step ran in this call: the checkpoint held every step asked for."
    return (f" Distillation loss {first:.4g} at the first step, {last:.4g} at the last (each on its own training "
            "batch, so they do not compare; the held-out figures do).")


def _drawn(s: dict) -> str:
    """What each step took from the calibration set (it read as if every step saw all of it)."""
    n = s.get("batch_size")
    return f"batches of {n} sequence{'s' if n != 1 else ''} drawn from " if n else ""


def report_markdown(report: dict) -> str:
    s, r = report["settings"], report["recover"]
    return (f"# headprune recovery: {report['pruned']}\n\n"
            f"Distilled toward `{report['model']}` for {r['steps']} steps ({r['seconds']:.0f} s{_how(r, s)}; "
            f"training {r['train']}, {r['parameters']:,} parameters, learning rate {s['recover_lr']:g}) on "
            f"{_drawn(s)}{sequences_text(s)} of `{s['data']}`.{_losses(r)}{validation_sentence(r)}\n\n"
            f"{quality_table(report)}\n\n"
            f"Held-out text is the last 30% of each text's paragraphs, never trained on; a gain on the "
            f"calibration text alone would be overfitting.\n")
