"""``headprune eval MODEL``: quality and speed of a model on held-out text. An encoder's
quality is its embeddings' fidelity to the unpruned model's, so an encoder is compared with
``--teacher`` or, for a directory written by ``prune`` or ``recover``, with the model its
``report.json`` names; a causal LM's perplexity needs no other model (``--teacher`` adds the
unpruned model's, and the ratio)."""

from __future__ import annotations

import sys
from typing import Optional

from . import commands as C
from . import evaluate as E
from . import texts
from .inputs import check_teacher, load_as, teacher_refusals, text_inputs
from .load import SAVE_TYPES, load_model, stored_type_name
from .locate import locate, prune_folder
from .report import number, to_json


def evaluate(args) -> int:
    folder, report, unread = _read_folder(args.model)
    data = args.data if args.data is not None else _pruned_with(report)
    _check_inputs(args)
    try:
        _, held = texts.load_split(data)  # a mistyped --data before the model loads
    except FileNotFoundError:
        if data == args.data:
            raise
        C._warn(f"MODEL was pruned or recovered with {data}, which is not found here: evaluating on the default "
                f"text `{texts.DEFAULT_TEXT}` (--data chooses another)")
        data = None
        _, held = texts.load_split(data)
    if data is not None and data != args.data and not args.quiet:  # on stderr: stdout may be --json's
        print(f"headprune: evaluating on the held-out part of `{data}`, the text MODEL was pruned or recovered "
              "with (--data chooses another)", file=sys.stderr, flush=True)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, accept=tuple(C.DEFAULTS))
    C.warn_thin(data, loaded, held)
    _warn_unreproduced(args, loaded, report)
    named = _named_teacher(folder, report, unread) if args.teacher is None and loaded.kind != "causal" else None
    teacher, spec = None, args.teacher
    if spec is not None:
        teacher = _load(args, spec, loaded, held)
    elif named:
        spec, bundled = named
        try:
            teacher = _load(args, spec, loaded, held, bundled=bundled)
        except FileNotFoundError:
            C._warn(f"no fidelity: {spec}, the unpruned model that its report.json names, is not found here; "
                    "pass --teacher")
    reference = None
    if teacher is not None:  # the teacher's metric only: its retrieval score is not what is asked
        reference = E.quality(teacher, held, eval_windows=args.eval_windows, progress=not args.quiet, metric_only=True)
        _warn_pooling(report, reference)
    from ..hf import measure

    kv = SAVE_TYPES[stored_type_name(loaded)]  # the KV cache sized in the type the weights are kept in, as prune does
    sizes = C.speed(loaded, kv) if args.speed else measure(loaded.model, dtype=kv)
    result = {"model": args.model, **C._public(C.quality(args, loaded, held, reference)), **sizes}
    if teacher is not None:
        result["teacher"] = spec
        if loaded.kind == "causal":
            result["teacher_perplexity"] = reference["perplexity"]
            result["perplexity_vs_teacher"] = result["perplexity"] / reference["perplexity"]
    elif loaded.kind != "causal":
        result.pop("fidelity", None)  # 1.0 by definition without a reference model
        if named is None:
            C._warn("no fidelity: an encoder's is measured against the unpruned model; pass --teacher MODEL")
    if args.json:
        print(to_json(result))
    else:
        text = {k: number(v) if isinstance(v, float) else str(v) if isinstance(v, bool) or not isinstance(v, int)
                else f"{v:,}" for k, v in result.items() if v is not None}  # as the report writes them
        if "tokens_per_s_low" in text:
            text["tokens_per_s"] += (f" (quartiles of {C.SPEED_REPEATS} repeats {text.pop('tokens_per_s_low')}-"
                                     f"{text.pop('tokens_per_s_high')}; another run on a shared machine can differ)")
        for k, v in text.items():
            print(f"{k:28s} {v}")
    return 0


def _read_folder(model: str) -> tuple:
    """``(folder, report, error)``: the prune or recover folder MODEL is (or whose ``model/`` it
    is; ``None`` for another model), its ``report.json`` (``None`` where there is none or it
    cannot be read) and why it cannot be read (``None`` where it can)."""
    from .recover_command import read_report

    folder = prune_folder(model)
    if folder is None:
        return None, None, None
    try:
        return folder, read_report(folder, "MODEL"), None
    except (OSError, ValueError) as e:  # the model itself may load: evaluate it, without a fidelity
        return folder, None, e


def _pruned_with(report: Optional[dict]) -> Optional[str]:
    """The calibration text (its files' absolute paths where it names files) that a prune or
    recover folder's ``report`` names; ``None`` (the default text) otherwise."""
    from .recover_command import calibrated_on

    settings = report.get("settings") if isinstance(report, dict) else None
    return calibrated_on(settings) if isinstance(settings, dict) else None


def _warn_pooling(report: Optional[dict], reference: dict) -> None:
    """Said where the teacher's embeddings are pooled otherwise than the folder's report pooled
    them (a report written before pooling followed the sentence-transformers pipeline: the mean)."""
    taken = _taken(report)  # a prune's encoder figures were by the mean before reports said; a recovery's, unknown
    then = taken.get("pooling", "mean_tokens" if "fidelity" in taken else None)
    if then is not None and reference.get("pooling") is not None and then != reference["pooling"]:
        C._warn(f"MODEL's report.json pooled its embeddings by {then}; the teacher pools them by "
                f"{reference['pooling']} (as its sentence-transformers pipeline names, the mean without one), which "
                "this evaluation follows, so its figures can differ from the report's")


def _taken(report) -> dict:
    """Where a folder's report says how its figures were taken: a prune report's ``after``, a
    recovery's report itself (``{}``: neither)."""
    after = report.get("after", report) if isinstance(report, dict) else None
    return after if isinstance(after, dict) else {}


def _warn_unreproduced(args, loaded, report: Optional[dict]) -> None:
    """Said for each setting this evaluation takes otherwise than the folder's report did: the
    float type ``prune`` or ``recover`` computed in (where no ``--dtype`` chose one), the
    perplexity windows (where this evaluation would read another number of them): the report's
    figures are not reproduced then, and the flag that would is named."""
    report = report if isinstance(report, dict) else {}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    dtype, now = report.get("compute_dtype"), str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    windows = settings.get("eval_windows")
    differ = []
    if args.dtype is None and isinstance(dtype, str) and dtype != now:
        differ.append((f"MODEL was evaluated in {dtype} when it was pruned or recovered (its report.json); this "
                       f"evaluation computes in {now}", f"--dtype {dtype}"))
    taken = _taken(report)
    read = taken.get("windows") if isinstance(taken.get("windows"), int) else None  # (none in older reports)
    short = isinstance(windows, int) and read is not None and read < windows  # all its text gives
    if loaded.kind == "causal" and isinstance(windows, int) and windows != args.eval_windows \
            and not (short and args.eval_windows >= read):
        said = f"{read} windows (all its text gives)" if short else f"{windows} windows"
        differ.append((f"MODEL's report.json measured perplexity over {said}; this evaluation takes up to "
                       f"{args.eval_windows}", f"--eval-windows {windows}"))
    for why, flag in differ:
        C._warn(f"{why}, so its figures can differ from the report's: pass {flag} to reproduce them")


def _check_inputs(args) -> None:
    """A bundled --data name that is also a path here is refused, as the other commands do, and a
    mistyped --teacher before MODEL loads."""
    if args.data is not None:
        text_inputs("--data", args.data)
    if args.teacher is not None:
        locate(args.teacher, arg="--teacher")


def _named_teacher(folder, report, unread: Optional[Exception]) -> Optional[tuple]:
    """``(spec, bundled)`` of the unpruned model that the ``report`` of the prune or recover
    ``folder`` (:func:`_read_folder`) names; ``None`` for no such folder, ``False`` (with a
    warning) for a report that names none or cannot be read (``unread``)."""
    from .recover_command import named_model

    if folder is None:
        return None
    if unread is not None:  # the model itself loaded: evaluate it, without a fidelity
        C._warn(f"no fidelity: {unread}; pass --teacher")
        return False
    spec, bundled = named_model(report) if isinstance(report, dict) else (None, False)
    if not isinstance(spec, str):
        C._warn(f"no fidelity: {folder / 'report.json'} names no unpruned model; pass --teacher")
        return False
    return spec, bundled


def _load(args, spec: str, loaded, held: list, bundled: bool = False):
    """The teacher, of MODEL's kind, tokenizer, family and class: another tokenizer reads the
    held-out text as other tokens, another model's outputs do not compare."""
    teacher = load_as("--teacher" if args.teacher else "the unpruned model", spec, device=args.device,
                      dtype=args.dtype, accept=tuple(C.DEFAULTS), bundled=bundled,
                      check=teacher_refusals(spec, loaded, named=args.teacher is None))
    check_teacher(spec, teacher, loaded, named=args.teacher is None, sample=held[:8])
    return teacher
