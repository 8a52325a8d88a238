"""The CLI's commands: scan, prune, eval, sweep (argument parsing lives in :mod:`.cli`)."""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from .. import atomic
from ..ranking import DEFAULT_RECIPE, natural_order
from ..stats.scores import HeadScores
from . import evaluate as E
from . import plots, texts
from .inputs import check_out, config_refusals
from .fingerprints import resumable_fingerprint
from .load import load_model
from .report import to_json

#: calibration sequences and their length by kind of model. Encoders take 512 paragraphs: on
#: all-MiniLM-L6-v2 the refit of the default recipe, fitted on 512 instead of 256, kept held-out
#: fidelity 0.9780 / 0.9484 at 30% / 50% of heads on the Python tutorial (0.9764 / 0.9428 on
#: 256), 0.9833 / 0.9550 on the prose (0.9822 / 0.9541) and 0.9721 / 0.9331 calibrated on the
#: prose and evaluated on the tutorial (0.9708 / 0.9278), for about 5 s more of collection with
#: moments (5 s -> 10 s on 2 cores); the Debian licences 0.9808 / 0.9529 (0.9814 / 0.9539);
#: 768 measured within 0.0004 of 512 on the tutorial.
#: Those figures are the output refit alone with 128 reference sequences: the 512 runs are
#: benchmarks/results/quality_default_minilm*.json at 2643f3b (the same files at 4783ba0 the 256);
#: those files now hold the value refit's runs under the current reference share.
DEFAULTS = {"causal": {"samples": 64, "seq_len": 256}, "encoder": {"samples": 512, "seq_len": 128}}


# ------------------------------------------------------------------------------- helpers


def _say(args, *msg, end="\n"):
    if not args.quiet:  # one write, its end included: the lines of torchrun's ranks do not interleave
        sys.stdout.write(" ".join(map(str, msg)) + end)
        sys.stdout.flush()


def _warn(message: str) -> None:
    from ..distributed import first_process

    if first_process():  # under --distributed every rank would say the same
        print(f"headprune: warning: {message}", file=sys.stderr, flush=True)


def model_path(model: str) -> dict:
    """``{"model_path": absolute path}`` where MODEL names a file, a folder or a cached repository (its
    snapshot), recorded beside the name as given so another working directory finds it; else ``{}``."""
    from .locate import cached_snapshot

    if Path(str(model)).exists():
        return {"model_path": str(Path(model).absolute())}
    snapshot = cached_snapshot(str(model))
    return {"model_path": str(snapshot)} if snapshot is not None else {}


@contextmanager
def output_dir(out: Path, force: bool, stages: Optional[list] = None):
    """A temporary sibling directory that takes ``out``'s place in one step if the block
    succeeds (:class:`headprune.atomic.Staged`): ``out`` holds the old output or the new one at
    every instant. The stage is appended to ``stages`` (for the interrupt message); a write
    error becomes one ``OSError`` naming ``out`` and the cause."""
    out = Path(out)
    check_out(out, force)  # again: the slow part may have given things time to change
    stage = atomic.Staged(out, replace=force)
    if stages is not None:
        stages.append(stage)
    try:
        with stage:
            yield Path(stage.path)
    except OSError as e:
        raise OSError(e.errno, f"--out: cannot write {out.absolute()} ({_cause(e)})") from e


def _cause(e: OSError) -> str:
    """The cause of a write error (the one in parentheses when the library already named a path)."""
    text = e.strerror or str(e)
    m = re.fullmatch(r"[\w-]+: cannot write .* \((.*)\)", text)
    return m[1] if m else text


def _stages(args) -> list:
    return vars(args).setdefault("stages", [])


def interrupted(args) -> str:
    """What an interrupted command leaves: whether ``--out`` changed, and where anything left over is."""
    if getattr(args, "out", False) is False:
        return "interrupted"
    out = _out(args, args.command).absolute()
    stages = _stages(args)
    parts = [f"{out} was written" if any(s.committed for s in stages) else f"{out} was not changed"]
    left = [s.leftover for s in stages if s.leftover]
    if left:
        parts.append(f"temporary files left in {', '.join(left)} are removed by the next run into {out.parent}")
    if kept := resumable(args):
        parts.append(kept)
    held = getattr(args, "checkpoint", None) if args.command == "recover" else None
    if isinstance(held, str) and os.path.exists(held):
        parts.append(f"--checkpoint {held} keeps the recovery's steps saved: the same command again goes on from them")
    return "interrupted; " + "; ".join(parts)


def resumable(args) -> str:
    """Where a scan stopped midway (interrupted, another rank failed) keeps the batches done, or a
    sweep the points measured ("": none)."""
    from ..distributed import checkpoint_files

    if args.command == "sweep":  # what this run's journal holds (none before it was opened)
        return args.sweep_journal.hint() if getattr(args, "sweep_journal", None) is not None else ""
    kept = [p for p in checkpoint_files(_checkpoint(_out(args, args.command).absolute())) if os.path.exists(p)]
    if args.command != "scan" or not kept:
        return ""
    return f"the checkpoint {', '.join(kept)} keeps the batches done: run again with --resume to continue"


def beside(out: Path, suffix: str = ".checkpoint.json") -> Path:
    """``.<out's name><suffix>`` beside ``out`` (a collection checkpoint, a sweep's journal); a long name (up to 255
    bytes, to which this and a rank's suffix add about 35) by its digest's first 16 hex digits."""
    out = Path(out).absolute()
    return out.parent / f".{atomic.short_name(out.name, 200)}{suffix}"


_checkpoint = beside


#: what :func:`_setup` (and ``prune``'s absolute ``data_path``) record of the calibration text
TEXT_SETTINGS = ("data", "data_path", "samples", "samples_requested", "seq_len", "reference",
                 "calibration_paragraphs", "held_out_paragraphs", "calibration_tokens", "generated")


def _setup(args, evaluates: bool = False):
    """Model, calibration batches and held-out paragraphs for a command (one that ``evaluates``
    them warns when they are too few: :func:`warn_thin`)."""
    parts, held = texts.load_split(args.data)
    plots.check_available(args.command)  # the picture is drawn last: not after all the work
    if getattr(args, "distributed", False):  # before the model loads: the backend and this rank's GPU
        from ..distributed import join

        args.device = join(args.device)
    asked = getattr(args, "eval_paragraphs", None) if evaluates else None
    if asked and asked > len(held):  # before the work: every paragraph is evaluated, fewer than asked
        _warn(f"--eval-paragraphs: {asked} asked, the held-out part of {args.data or texts.DEFAULT_TEXT} has "
              f"{len(held)}; all {len(held)} are evaluated")
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, accept=tuple(DEFAULTS),
                        check=config_refusals(args))
    _say(args, f"loaded {loaded.source} ({loaded.kind}) in {time.perf_counter() - t0:.1f} s")
    if loaded.tokenizer is None:
        raise ValueError(f"MODEL: {args.model} has no tokenizer files")
    if evaluates:  # the paragraphs evaluated: sweep's --eval-paragraphs takes the first ones
        warn_thin(args.data, loaded, held[: getattr(args, "eval_paragraphs", None) or len(held)])
    d = DEFAULTS[loaded.kind]
    samples, seq_len = args.samples or d["samples"], seq_len_for(args, loaded, d["seq_len"])
    batches, reference = texts.calibration_set(loaded.tokenizer, parts, args.data, causal=loaded.kind == "causal",
                                               samples=samples, seq_len=seq_len,
                                               reference=getattr(args, "reference", 0.0), batch_size=args.batch_size)
    got, real = texts.sequences(batches), texts.tokens(batches)
    generated = getattr(args, "generated", 0)
    if generated:
        batches += _generated(args, loaded, generated, seq_len)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    if got < samples:  # the report counts the sequences used
        _warn(texts.shortfall(samples, got, seq_len, causal=loaded.kind == "causal", reference=bool(reference)))
    settings = {"data": args.data or texts.DEFAULT_TEXT, "samples": got, "seq_len": seq_len, "calibration_tokens": real,
                **({"samples_requested": samples} if got < samples else {}),
                **({"generated": generated} if generated else {}),
                **reference,
                "calibration_paragraphs": sum(map(len, parts)), "held_out_paragraphs": len(held),
                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "device": args.device,
                "fused": _fused(args), **_processes(args), **_moments_dtype(args)}
    return loaded, batches, held, settings


def _moments_dtype(args) -> dict:
    """``{"moments_dtype": "float32"}`` where ``--moments-dtype`` asks for it (float64, the
    default, is not recorded, so earlier checkpoints and journals still resume)."""
    dtype = getattr(args, "moments_dtype", "float64")
    return {} if dtype == "float64" else {"moments_dtype": dtype}


def _processes(args) -> dict:
    """``{"distributed": processes}`` of a ``--distributed`` run (the statistics summed over them),
    else nothing."""
    if not getattr(args, "distributed", False):
        return {}
    from ..distributed import rank_world

    return {"distributed": rank_world()[1]}


def seq_len_for(args, loaded, default: int) -> int:
    """``--seq-len`` (refused where the model takes fewer positions), else ``default`` capped to them."""
    limit = E.max_positions(loaded.model, 1 << 30)
    if args.seq_len and args.seq_len > limit:
        raise ValueError(f"--seq-len: {args.seq_len} tokens is more than the {limit} positions {args.model} takes")
    return args.seq_len or min(default, limit)


def _generated(args, loaded, n: int, seq_len: int) -> list:
    """``--generated N``: N sequences sampled from the model (seed 0), in calibration batches."""
    from ..hf.generated import generated_batches
    from .texts import bos_token

    t0 = time.perf_counter()  # an encoder was refused before it loaded (inputs.config_refusals)
    bos = bos_token(loaded.tokenizer)  # where text windows start with it, so do these (from it)
    out = generated_batches(loaded.model, samples=n, seq_len=seq_len, batch_size=args.batch_size, seed=0,
                            start=bos, keep_start=bos is not None, progress=not args.quiet)
    _say(args, f"sampled {n} calibration sequences of {seq_len} tokens from the model in "
               f"{time.perf_counter() - t0:.1f} s")
    return out


def _fused(args) -> bool:
    """``--fused/--no-fused`` (commands without the switch collect fused)."""
    return getattr(args, "fused", True)


def _collect(args, loaded, batches, settings, checkpoint=None, moments: bool = False) -> HeadScores:
    """Collection, data-parallel under ``--distributed`` and resumable with a checkpoint;
    ``moments``: with the second moments a least-squares refit needs."""
    from .. import distributed

    t0 = time.perf_counter()
    many = getattr(args, "distributed", False)
    if many:  # _setup refused a process torchrun did not launch
        distributed.init_from_env()
    rank, world = distributed.rank_world()
    # one process: headprune.hf.collect, after refusing to resume a --distributed run's rank files
    resume = checkpoint is not None and getattr(args, "resume", False)  # (sweep's --resume: its own journal)
    where, key = distributed.fingerprint_file(checkpoint) if resume else (None, None)  # (a rank's file, under torchrun)
    fingerprint = resumable_fingerprint(where, args, batches, settings, key=key)
    moments = moments and getattr(args, "moments_dtype", "float64")
    if moments and rank == 0:
        from ..hf.collect import moments_size

        size, sites = moments_size(loaded.model, moments)
        _say(args, f"second moments of {sites} output projections' inputs: {size / 2**20:,.1f} MiB in {moments}")
    scores = distributed.collect(loaded.model, batches, checkpoint=checkpoint, resume=resume,
                                 fingerprint=fingerprint, progress=not args.quiet and rank == 0,
                                 fused=_fused(args), moments=moments)
    _say(args, f"{f'rank {rank}/{world}: ' if many else ''}collected entropies over {texts.sequences(batches)} "
               f"sequences in {time.perf_counter() - t0:.1f} s")
    return scores


def _is_writer() -> bool:
    from ..distributed import rank_world

    return rank_world()[0] == 0


def warn_thin(data, loaded, held: list) -> None:
    """A warning, before the work, where the held-out text (the paragraphs evaluated) is too
    short for its figure to mean much (:func:`headprune.app.evaluate.thin_held_out`)."""
    why = E.thin_held_out(loaded, held) if loaded.tokenizer is not None else None
    if why:
        _warn(f"--data: {data or texts.DEFAULT_TEXT}: {why}: the quality figures will be mostly noise; a longer "
              "text gives figures worth comparing")


def quality(args, loaded, held, reference=None) -> dict:
    """Label-free quality on held-out text, with progress bars unless ``--quiet``."""
    return E.quality(loaded, held, reference, eval_windows=args.eval_windows, progress=not args.quiet)


SPEED_REPEATS = 5  # eval's timed forwards


def speed(loaded, dtype=None) -> dict:
    """Sizes (KV cache bytes in ``dtype``, default the model's) and forward tokens/s."""
    from ..hf import measure

    out = measure(loaded.model, dtype=dtype)
    out.update(E.throughput(loaded.model, batch=1, seq_len=min(256, E.max_positions(loaded.model, 256)),
                            repeat=SPEED_REPEATS))
    return out


AS_WRITTEN_WARNING = {
    "causal": "on SmolLM2-135M, pruning the highest-entropy heads first over the whole model measured far worse "
              "than random (docs/quality.md); the default recipe ranks by what the least-squares refit cannot "
              "recover (score 'reconstruction') within each layer",
    "encoder": "on all-MiniLM-L6-v2, pruning the highest-entropy heads first over the whole model measured worse "
               "than random from 30% of heads on (docs/quality.md); the default recipe ranks by what the "
               "least-squares refit cannot recover (score 'reconstruction') within each layer",
}


def _warn_as_written(kw: dict, kind: str) -> None:
    """The formula as written (highest entropy first) loses to chance on the measured models."""
    as_written = (kw.get("score") == "entropy" and kw.get("order", natural_order("entropy")) == "high"
                  and kw.get("scope", DEFAULT_RECIPE["scope"]) == "global")
    if as_written and kind in AS_WRITTEN_WARNING:
        print(f"headprune: warning: {AS_WRITTEN_WARNING[kind]}", file=sys.stderr)


def windows_setting(args, loaded) -> dict:
    """The perplexity windows a report's figures took, for its settings (``eval`` of the folder
    warns when it takes others); none for an encoder, whose fidelity takes no windows."""
    return {"eval_windows": args.eval_windows} if loaded.kind == "causal" else {}


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}


def _write_json(path: Path, obj, *, strict: bool = True) -> None:
    """``obj`` as JSON (see :func:`report.to_json`; ``scores.json`` is written with
    ``strict=False``, so :meth:`HeadScores.from_dict` reads back exactly what was collected)."""
    path.write_text(to_json(obj, strict) + "\n")


def _selection_kwargs(args) -> dict:
    kw = {"gqa": args.gqa, "seed": args.seed}
    if getattr(args, "uniform", False):
        kw["uniform"] = True
    for name in ("scope", "min_heads_per_layer", "protect_layers", "score", "order", "kv_ratio"):
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    return kw


def _out(args, command: str) -> Path:
    if args.out is not None:
        if not str(args.out).strip():
            raise ValueError("--out: expected a directory, got an empty name")
        return Path(args.out)
    given = Path(str(args.model).rstrip("/\\"))
    name = given.resolve().name if given.exists() and given.name in ("", ".", "..") else given.name  # ".": its folder
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    return Path("headprune-out") / f"{command}-{stem or 'model'}"


class Stages:
    """Wall-clock seconds per stage; ``with stages("evaluating ..."):`` prints the label first."""

    def __init__(self, args):
        self.args, self.seconds = args, {}

    @contextmanager
    def __call__(self, label: str, key: str):
        _say(self.args, f"headprune: {label} ...")
        t0 = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - t0, 1)
        _say(self.args, f"headprune: {label}: {self.seconds[key]:.1f} s")


def _remove_checkpoints(checkpoint: Path) -> None:
    """This run's checkpoint files, and those a run of another number of processes left for the
    same output, by exact name (``--out`` may hold glob characters)."""
    from ..distributed import checkpoint_files, rank_world, written_by_other_runs

    world = rank_world()[1]
    for path in map(Path, checkpoint_files(checkpoint) + written_by_other_runs(checkpoint, world if world > 1 else None)):
        path.unlink(missing_ok=True)
        for side in path.parent.iterdir() if path.parent.is_dir() else ():  # moments beside it, exact prefix
            if side.name.startswith(path.name + ".moments-") and side.name.endswith(".safetensors"):
                side.unlink(missing_ok=True)
