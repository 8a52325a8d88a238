"""What a command reads, for the checks that its output never replaces it: the model and the
teacher where they are read from, each text of ``--data``; and a teacher's tokenizer against
the model's."""

from __future__ import annotations

import os
from pathlib import Path

from .. import atomic
from . import texts
from .load import Loaded, load_model
from .locate import BUNDLED_MODELS, bundled_path, model_dir


def inputs(args) -> tuple:
    """The paths a command reads, for :func:`check_out`: the model and the teacher (each also
    where it is read from, see :func:`model_inputs`) and each text of ``--data``."""
    model = "DIR" if getattr(args, "command", None) == "recover" else "MODEL"
    return (*model_inputs(model, args.model), *model_inputs("--teacher", getattr(args, "teacher", None)),
            *text_inputs("--data", getattr(args, "data", None)))


def model_inputs(flag: str, spec) -> list:
    """``(flag, path)`` of where :func:`load_model` reads ``spec``: the path, and a prune
    folder's ``model/``; a bundled model's installed directory (the name is no path then)."""
    if spec and str(spec) in BUNDLED_MODELS:
        try:
            return [(flag, bundled_path(str(spec))[0])]
        except (FileNotFoundError, ValueError):  # not installed: nothing there to replace
            return []
    read = model_dir(spec) if spec else None
    return [(flag, spec)] + ([(flag, read)] if read is not None and read != Path(spec) else [])


def text_inputs(flag: str, spec) -> list:
    """``(flag, path)`` of each text of a ``--data`` value that is read from a file: a bundled
    name is read as the bundled text, and given as ``--data`` it is refused where it is also a
    path here (which the user may mean, and ``--out`` could then replace)."""
    names = texts.spec_names(spec) if spec else []
    for n in names:
        if flag == "--data" and n in texts.BUNDLED_TEXTS and os.path.lexists(n):
            raise ValueError(f"--data: {n!r} names both a bundled text and a path here; pass ./{n} for the path, or "
                             "run from another directory for the bundled text")
    return [(flag, n) for n in names if n not in texts.BUNDLED_TEXTS]


#: text both tokenizers read, with the held-out paragraphs: case, accents, digits, code, spacing
PROBE = "The Quick brown fox, 1,234.5 times: naïve CAFÉ d'Été.\n\tdef f(x):  return x ** 2  # 日本語 ok"


def check_teacher(spec: str, teacher, loaded, model: str = "MODEL", named: bool = False, sample=()) -> None:
    """A teacher must read text as ``loaded`` does: another tokenizer gives other tokens, so
    neither its perplexity per token nor its embeddings nor its next-token distributions compare.
    Its vocabulary, the ids it gives :data:`PROBE` and the paragraphs of ``sample`` (its
    special tokens, case and normalisation) and the longest input it takes (a causal LM's
    perplexity windows) must be ``loaded``'s. ``named``: the teacher is the one ``model``'s
    report.json names, not ``--teacher``."""
    from ..hf.training import check_teacher as check_models
    from .evaluate import FIDELITY_TOKENS, max_positions, perplexity_window

    who, lead, advice = _teacher_words(spec, model, named)
    theirs, ours = teacher.tokenizer.get_vocab(), loaded.tokenizer.get_vocab()
    if theirs != ours:
        raise ValueError(f"{who} has another tokenizer than {model} ({len(theirs):,} tokens against "
                         f"{len(ours):,}{', other ids' if len(theirs) == len(ours) else ''}), so it does not "
                         f"compare; {advice}")
    for text in (PROBE, *sample):
        if teacher.tokenizer(text)["input_ids"] != loaded.tokenizer(text)["input_ids"]:
            raise ValueError(f"{who} reads text as other tokens than {model} (its tokenizer has the same vocabulary "
                             f"but other special tokens, case or normalisation: {text[:40]!r}...), so it does not "
                             f"compare; {advice}")
    reach = [perplexity_window(m.model) if loaded.kind == "causal" else
             min(FIDELITY_TOKENS, max_positions(m.model, FIDELITY_TOKENS)) for m in (teacher, loaded)]
    if reach[0] != reach[1]:  # a causal LM's perplexity windows, an encoder's truncation
        raise ValueError(f"{who} takes inputs of up to {reach[0]:,} tokens where {model} is evaluated on "
                         f"{reach[1]:,}, so it would be evaluated on other windows; {advice}")
    width = [getattr(m.model.config, "hidden_size", None) for m in (teacher, loaded)]
    if loaded.kind != "causal" and width[0] != width[1]:  # embeddings of other widths have no cosine
        raise ValueError(f"{who} gives embeddings of {width[0]} values, {model} of {width[1]}, so they do not "
                         f"compare; {advice}")
    try:  # another family, class or labels: the distillation's refusal, and eval's
        check_models(loaded.model, teacher.model)
    except ValueError as e:
        raise ValueError(f"{lead} {str(e).removeprefix('teacher: ')}; {advice}") from None


def _teacher_words(spec: str, model: str, named: bool) -> tuple:
    """``(who, lead, advice)``: how a refusal of the teacher ``spec`` names it and what it advises."""
    who = f"{model}/report.json names {spec} as the unpruned model, which" if named else f"--teacher: {spec}"
    lead = f"{model}/report.json names {spec} as the unpruned model, but" if named else f"--teacher: {spec}:"
    return who, lead, f"pass {'--teacher, ' if named else ''}the unpruned model {model} was pruned from"


def teacher_refusals(spec: str, loaded, model: str = "MODEL", named: bool = False):
    """``check`` for the teacher's :func:`~headprune.app.load.load_model`: one of another kind or
    family than ``loaded`` (the model it teaches or is compared with), refused from its config
    before its weights are read (the family as the distillation's refusal says it)."""
    from ..hf.adapters import get_adapter
    from .load import a_kind

    family = get_adapter(loaded.model).model_type
    who, lead, advice = _teacher_words(spec, model, named)

    def check(kind: str, model_type: str, config: dict) -> None:
        if kind != loaded.kind:
            raise ValueError(f"{who} is {a_kind(kind)} model, {model} {a_kind(loaded.kind)} one"
                             + (f"; {advice}" if named else ""))
        if model_type != family:
            raise ValueError(f"{lead} a {model_type} model cannot teach a {family} student; {advice}")

    return check


def load_as(arg: str, spec: str, **kw) -> Loaded:
    """:func:`~.load.load_model` of a model another argument than MODEL gives (``--teacher``): its
    refusals name that argument."""
    try:
        return load_model(spec, **kw)
    except (ValueError, FileNotFoundError) as e:
        text = str(e)
        if not text.startswith("MODEL: "):
            raise
        raise type(e)(f"{arg}: {text[len('MODEL: '):]}") from e


def check_out(out: Path, force: bool, inputs: tuple = ()) -> None:
    """Refuse ``--out`` before any slow work: a symbolic link (refused, not followed), a file, a
    non-empty directory without ``--force``, a folder this process cannot write in, and one
    that is or holds an input (``inputs``: ``(flag, path)`` pairs), which ``--force`` would
    replace. Also removes what killed runs left beside it (:func:`headprune.atomic.remove_leftovers`)."""
    for flag, path in inputs:
        if path and os.path.exists(path) and at_or_inside(path, out):
            raise ValueError(f"--out: {out} is {flag} ({path}) or a folder holding it, which writing the output "
                             "would replace; choose another --out")
    atomic.check_target(out, replace=force, arg="--out", hint="pass --force to replace it")


def at_or_inside(path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return folder.resolve() in (where := Path(path).resolve(), *where.parents)


def refuse_inside_out(out: Path, path, flag: str) -> None:
    """A state file ``path`` given by ``flag`` that is no file path (empty, a directory), is at
    or inside ``--out`` (written whole at the end, so it would make ``--out`` non-empty, or a
    file), or cannot be made (a file where its folder would be, a folder not writable) is refused
    before anything runs."""
    if path is None:
        return
    if not str(path).strip() or os.path.isdir(path):
        raise ValueError(f"{flag}: expected the path of a file, got {'a directory, ' if str(path).strip() else ''}"
                         f"{str(path)!r}")
    if at_or_inside(path, out):
        raise ValueError(f"{flag}: at or inside the output directory {out}, which is written whole at the end; "
                         "keep it elsewhere")
    atomic.check_folder(path, flag)  # a file where its folder would be, a folder this process cannot write in


def no_groups(model) -> str:
    """Why --kv-ratio has nothing to remove on ``model`` (as MODEL names it): no grouped queries."""
    return f"{model} has no grouped queries; every KV head goes with its query head"


def config_refusals(args):
    """``check`` for :func:`~headprune.app.load.load_model`: the options a model's config rules out,
    refused before its weights are read (they were refused after loading them)."""

    def check(kind: str, model_type: str, config: dict) -> None:
        if getattr(args, "speed_decode", None) and kind != "causal":  # none (an empty list) asks for none
            raise ValueError(f"--speed-decode: {args.model} is an encoder, which has no decode; drop --speed-decode")
        if getattr(args, "generated", 0) and kind != "causal":
            raise ValueError(f"--generated: sampling calibration text needs a causal LM, not {args.model} ({kind})")
        if getattr(args, "kv_ratio", None) and not _may_group(model_type, config):
            raise ValueError(f"--kv-ratio: {no_groups(args.model)}")

    return check


def _may_group(model_type: str, config: dict) -> bool:
    """Whether the config can give query heads that share KV heads (where it cannot say, yes: the
    loaded model's layout decides)."""
    from ..hf.adapters import ADAPTERS

    adapter = ADAPTERS.get(model_type)
    if adapter is not None and adapter.config_kv_heads is None:  # a family without grouped queries
        return False
    kv = None if adapter is None else config.get(adapter.config_kv_heads)  # absent: the class's default decides
    heads = config.get("num_attention_heads")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (kv, heads))
    return not ints or kv < heads
