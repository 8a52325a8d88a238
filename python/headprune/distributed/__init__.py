"""Data-parallel calibration: each rank collects on its own shard, then the statistics add.

``HeadScores`` statistics are sums (see :mod:`headprune.scores`), so combining ranks is one
``all_reduce(SUM)`` of the float64 ``stats`` tensor. Launch with ``torchrun``::

    from headprune import distributed as D
    D.init_from_env()                      # gloo on CPU, nccl when CUDA is available
    scores = D.collect(model, batches)     # every rank gets the scores of all batches

Only :func:`collect` needs ``transformers``; the rest imports with torch alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from .files import checkpoint_files, rank_checkpoint, refuse_other_runs, written_by_other_runs
from ..stats.moments import OutputMoments
from ..stats.scores import HeadScores

__all__ = ["init_from_env", "join", "rank_world", "first_process", "shard", "all_reduce_scores", "collect",
           "rank_checkpoint", "fingerprint_file", "checkpoint_files", "written_by_other_runs", "refuse_other_runs"]

# Variables torchrun (and torch.distributed.launch) sets for every worker.
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _launched() -> bool:
    """Whether a process group is up, or torchrun's environment describes one (``False``: none of
    it is set); a partial environment, or a torch without ``torch.distributed``, is refused."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise ValueError("--distributed: this torch build has no torch.distributed")
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(f"--distributed: environment variables {missing} are not set; launch with torchrun")
    return True


def check_launch() -> None:
    """``ValueError`` naming ``--distributed`` unless this process can join a process group
    (:func:`init_from_env` would): checked before a command loads its model."""
    if not _launched():
        raise ValueError("--distributed: not launched by torchrun (RANK/WORLD_SIZE are not set)")


def init_from_env(backend: Optional[str] = None, timeout: Optional[timedelta] = None,
                  device: Optional[torch.device] = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Returns ``False`` (and does nothing) when the process was not launched distributed
    (``RANK``/``WORLD_SIZE`` unset), ``True`` when a default group is (now) initialised.
    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``; with ``nccl``
    the current CUDA device is set to ``device``, else to ``LOCAL_RANK``.
    """
    if not _launched():
        return False
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(device if device is not None else _count("LOCAL_RANK", 0))
    kw = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, init_method="env://", **kw)
    return True


def refuse_unasked_ranks(command: str, distributed: Optional[bool]) -> None:
    """A command torchrun launched in several processes without ``--distributed`` (``None``: a
    command that has none) is refused: each process would run all of it and write its output."""
    world = _count("WORLD_SIZE", 1)
    if world == 1 or distributed:
        return
    if distributed is not None:
        raise ValueError(f"--distributed: launched by torchrun ({world} processes) without it; pass --distributed, "
                         "or run one process")
    raise ValueError(f"headprune {command} runs in one process, and torchrun launched {world}; run one process")


def join(device: str) -> str:
    """Join torchrun's process group for a command that runs on ``device``, before its model
    loads: gloo where it runs on the CPU (also on a host with GPUs), NCCL on CUDA with each rank
    on its own GPU (a bare ``cuda`` becomes ``cuda:LOCAL_RANK``; every rank on one GPU would hold
    a copy each and run one at a time). Returns the device this rank runs on."""
    check_launch()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and _count("LOCAL_WORLD_SIZE", 1) > 1:
        raise ValueError(f"--device: {device} puts every rank of this node on one GPU; give --device cuda (each rank "
                         "on its own, cuda:LOCAL_RANK)")
    if dev.type == "cuda":
        dev = torch.device("cuda", _count("LOCAL_RANK", 0) if dev.index is None else dev.index)
    init_from_env("nccl" if dev.type == "cuda" else "gloo", device=dev)
    return str(dev)


def _count(name: str, default: int) -> int:
    """torchrun's integer variable ``name`` (a rank or a number of processes), ``default`` where unset."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def rank_world(group=None) -> tuple:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def first_process() -> bool:
    """Whether this process speaks for the run (prints its warnings): the first rank of a process
    group, or, before the group is joined, of torchrun's processes (``RANK`` where
    ``WORLD_SIZE`` says there are several); a process of its own (a stray ``RANK`` alone too)."""
    rank, world = rank_world()
    if world > 1:
        return rank == 0
    try:
        return _count("WORLD_SIZE", 1) <= 1 or _count("RANK", 0) == 0
    except ValueError:  # not numbers: not torchrun's
        return True


def shard(batches: Iterable, rank: Optional[int] = None, world_size: Optional[int] = None):
    """Batches ``rank, rank + world_size, rank + 2 * world_size, ...`` of ``batches``.

    Deterministic round-robin: the shards of all ranks partition the batches. A list or
    tuple gives a list; any other iterable gives a lazy generator (every rank walks the
    whole stream and keeps its share). ``rank``/``world_size`` default to the process group's
    (``0``/``1`` without one).
    """
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError("batches: expected an iterable of batches (e.g. a list of dicts), got a single batch")
    r, w = rank_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    if isinstance(batches, (list, tuple)):
        return list(batches[rank::world_size])
    return (b for i, b in enumerate(batches) if i % world_size == rank)


def _device(group):
    """Tensors handed to a collective live where its backend wants them."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_digest(digest: bytes, group, *head: int) -> list:
    """Every rank's ``[*head, digest as 4 int64 words]`` (every backend all-gathers int64, not
    every one uint8), in rank order."""
    words = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]
    mine = torch.tensor([*head, *words], dtype=torch.int64, device=_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return gathered


def _apart(gathered: list, start: int = 0) -> list:
    """The ranks whose gathered digest (from word ``start`` on) differs from rank 0's."""
    return [r for r, t in enumerate(gathered) if not torch.equal(t[start:], gathered[0][start:])]


def _check_same_layout(scores: HeadScores, group) -> None:
    differ = _apart(_gather_digest(bytes.fromhex(scores.layout_fingerprint()), group))
    if differ:
        raise ValueError(
            f"scores: ranks {differ} collected a different head layout or method than rank 0 "
            f"(this rank: {scores!r}); every rank must load the same model and use the same method"
        )


def _check_same_weights(model, group) -> None:
    """Every rank holds the same weights and config (a stale copy of the model's directory on one
    node has the layout of the others: its statistics would be summed with theirs without a word)."""
    from ..hf.checkpoint import weights_digest

    differ = _apart(_gather_digest(hashlib.sha256(weights_digest(model).encode()).digest(), group))
    if differ:
        raise ValueError(f"model: ranks {differ} loaded other weights or another config than rank 0; every rank "
                         "must load the same model")


def _hashed(batches, digest, counted: list):
    """``batches`` as they pass, each fed to ``digest`` and counted (a stream is walked once)."""
    for b in batches:
        digest.update(b, check=False)
        counted[0] += 1
        yield b


def _check_same_batches(digest, count: int, group) -> None:
    """Every rank walked the same batches (a per-rank loader, a DistributedSampler's, gives each
    rank a part: its shard of that part would leave batches out without a word)."""
    gathered = _gather_digest(bytes.fromhex(digest.hexdigest()), group, count)
    differ = _apart(gathered)
    if differ:
        counts = ", ".join(f"rank {r}: {int(t[0])}" for r, t in enumerate(gathered))
        raise ValueError(f"batches: ranks {differ} passed other batches than rank 0 ({counts} batches); every rank "
                         "passes all of the calibration batches and collects its share of them: pass the same batches "
                         "on every rank, not a per-rank part")


def all_reduce_scores(scores: HeadScores, group=None) -> HeadScores:
    """Scores of the union of every rank's batches: the ``stats`` summed over ``group``.

    Collective: every rank of ``group`` must call it. Raises ``ValueError`` on every rank
    when the ranks' layouts (model, pruning, method) differ. Returns a new ``HeadScores``
    (float64 on CPU) equal on all ranks; without a process group it returns ``scores``.
    """
    if not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores, got {type(scores).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return scores
    _check_same_layout(scores, group)
    stats = scores.stats.to(_device(group), copy=True).contiguous()
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    outputs = None
    if scores.outputs is not None:
        outputs = scores.outputs.to(_device(group), copy=True).contiguous()
        dist.all_reduce(outputs, op=dist.ReduceOp.SUM, group=group)
        outputs = outputs.cpu()
    return scores.with_sums(stats.cpu(), outputs, _all_reduce_moments(scores.moments, group))


def _all_reduce_moments(moments: Optional[OutputMoments], group) -> Optional[OutputMoments]:
    """The second moments summed over ``group`` (one collective per site, in float64 whatever
    the moments' type, so that every rank sends the same bytes; a rank whose shard missed a
    site contributes zeros), in the type the ranks that saw tokens keep them in."""
    if moments is None:
        return None
    _check_same_moments(moments, group)
    narrow = torch.tensor([int(any(g is not None and g.dtype != torch.float64 for g in moments.gram))],
                          dtype=torch.int64, device=_device(group))
    dist.all_reduce(narrow, op=dist.ReduceOp.MAX, group=group)  # a rank with an empty shard has no type of its own
    dtype = torch.float32 if int(narrow) else torch.float64
    gram = []
    for g, p in zip(moments.gram, moments.projection or [None] * moments.num_sites):
        if g is None:  # the shape is known from the projection: [out, D + 1]
            g = torch.zeros(p.shape[1], p.shape[1], dtype=torch.float64)
        t = g.to(_device(group), torch.float64, copy=True).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        gram.append(t.to("cpu", dtype))
    out = OutputMoments(gram, moments.projection, _all_gather_sequences(moments.sequences, group))
    out.unmasked = moments.unmasked  # the same on every rank (its weights are checked equal)
    return out


def _check_same_moments(moments: OutputMoments, group) -> None:
    """Every rank's moments in one float type (a rank without tokens has none of its own) and
    taken under the same output projections: the sums would take one type, or mix two models."""
    from ..hf.checkpoint import tensor_bytes

    kinds = {g.dtype for g in moments.gram if g is not None}
    code = 0 if not kinds else 1 if kinds == {torch.float32} else 2 if kinds == {torch.float64} else 3
    digest = hashlib.sha256()
    for p in moments.projection or []:
        if p is not None:
            digest.update(tensor_bytes(p))
    gathered = _gather_digest(digest.digest(), group, code)
    if len({int(t[0]) for t in gathered} - {0}) > 1 or code == 3:
        raise ValueError("moments: the ranks collected second moments in different float types; pass the same "
                         "moments= on every rank")
    differ = _apart(gathered, 1)
    if differ:
        raise ValueError(f"moments: ranks {differ} collected under other output-projection weights than rank 0; "
                         "every rank must load the same model")


def _all_gather_sequences(sequences: Optional[torch.Tensor], group) -> Optional[torch.Tensor]:
    """Every rank's sequence digests in rank order (``None`` where a rank recorded none)."""
    size = torch.tensor([-1 if sequences is None else len(sequences)], dtype=torch.int64, device=_device(group))
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(n) for n in sizes]
    if min(sizes) < 0 or max(sizes) == 0:
        return None if min(sizes) < 0 else torch.zeros(0, dtype=torch.int64)
    mine = torch.zeros(max(sizes), dtype=torch.int64, device=_device(group))
    mine[: sizes[dist.get_rank(group)]] = sequences.to(mine.device)
    gathered = [torch.empty_like(mine) for _ in sizes]
    dist.all_gather(gathered, mine, group=group)
    return torch.cat([g[:n].cpu() for g, n in zip(gathered, sizes)])


class RanksFailed(RuntimeError):
    """Raised on the ranks of a distributed collection that did not fail themselves when another
    rank failed or left the process group (its own error is raised on that rank)."""


def _what(e: BaseException) -> str:
    """A collective's error in a line: its type and the start of its message (gloo's run long)."""
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


def _raise_if_any_failed(error: Optional[BaseException], group) -> None:
    """Every rank learns whether any rank failed, so none is left waiting in a collective. A
    rank that failed raises its own error even when the others cannot be reached (they were
    still collecting past the group's timeout, or left): the collective's error is its cause."""
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=_device(group))
    flags[dist.get_rank(group)] = error is not None
    try:
        dist.all_reduce(flags, group=group)
    except Exception as e:  # noqa: BLE001 - a timeout or a rank that left
        if error is not None:
            if error.__cause__ is not None:  # its own cause stays; the collective's failure is noted
                error.add_note(f"(the other ranks could not be told: {_what(e)})")
                raise error
            raise error from e
        raise RanksFailed(f"collect: the ranks could not tell each other whether any failed ({_what(e)}); a rank "
                          "failed or left: see its error") from e
    if error is not None:
        raise error
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise RanksFailed(f"collect: ranks {failed} failed (see their errors); this rank stops too")


def fingerprint_file(checkpoint, group=None) -> tuple:
    """``(path, key)``: the file where a resume of this process's :func:`collect` with
    ``checkpoint`` reads its fingerprint, and the part of it that holds the caller's (a rank file
    wraps it under ``"settings"``; without a process group: ``checkpoint`` itself, ``None``)."""
    rank, world = rank_world(group)
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return checkpoint, None
    return rank_checkpoint(checkpoint, rank, world), "settings"


def collect(model, batches: Iterable, *, group=None, checkpoint=None, fingerprint="", **kwargs) -> HeadScores:
    """``headprune.hf.collect`` over this rank's :func:`shard` of ``batches``, all-reduced.

    Every rank passes the same ``batches`` and gets the scores of all of them (equal to a
    single-process collection up to float64 summation order). ``checkpoint`` becomes one
    file per rank (:func:`rank_checkpoint`) and the rank and world size join
    ``fingerprint`` (:func:`fingerprint_file`), so a resume with another world size is refused. Other keyword
    arguments (``method``, ``progress``, ``checkpoint_every``, ``resume``) go to
    ``headprune.hf.collect``. A rank with an empty shard contributes zeros; if one rank
    raises an ``Exception``, the others raise :class:`RanksFailed` (a ``RuntimeError``) instead of hanging.
    Without a process group this is plain ``headprune.hf.collect``.
    """
    from ..hf.batches import check_batches
    from ..hf.checkpoint import BatchesDigest, canonical
    from ..hf.collect import collect as local_collect

    rank, world = rank_world(group)
    grouped = not (world == 1 and not (dist.is_available() and dist.is_initialized()))
    if checkpoint is not None and kwargs.get("resume"):
        refuse_other_runs(checkpoint, world if grouped else None)
    if not grouped:
        return local_collect(model, batches, checkpoint=checkpoint, fingerprint=fingerprint, **kwargs)
    check_batches(batches)
    canonical(fingerprint)  # what one process refuses (its rank's fingerprint takes it as text)
    if checkpoint is not None and os.path.isdir(checkpoint):  # each rank writes a file beside it
        raise ValueError(f"checkpoint: {checkpoint} exists and is not a headprune checkpoint; pass another path")
    if checkpoint is not None:
        checkpoint, key = fingerprint_file(checkpoint, group)
        fingerprint = json.dumps({key: fingerprint, "rank": rank, "world_size": world}, sort_keys=True, default=str)
    _check_same_weights(model, group)
    digest, counted = BatchesDigest(), [0]
    if isinstance(batches, (list, tuple)):
        batches = list(_hashed(batches, digest, counted))  # (a list keeps its length for the progress bar)
    else:
        batches = _hashed(batches, digest, counted)
    scores, error = None, None
    try:
        scores = local_collect(model, shard(batches, rank, world), checkpoint=checkpoint, fingerprint=fingerprint,
                               allow_empty=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = e
    _raise_if_any_failed(error, group)
    _check_same_batches(digest, counted[0], group)
    try:
        scores = all_reduce_scores(scores, group)
    except RuntimeError as e:  # a collective's failure: a rank that left after the check (its own error says why)
        raise RanksFailed(f"collect: the ranks' statistics could not be summed ({_what(e)}); a rank failed or left: "
                          "see its error") from e
    if not bool((scores.count > 0).any()):
        raise ValueError("batches: no attention call was recorded on any rank (empty iterable?)")
    return scores
