"""The checkpoint files of a distributed collection: one per rank, named by its rank and the
number of processes (:func:`rank_checkpoint`), and the refusal of a resume whose files another
number of processes wrote (:func:`refuse_other_runs`)."""

from __future__ import annotations

import os
import re
from typing import Optional

import torch.distributed as dist


def rank_checkpoint(path: str, rank: int, world_size: int) -> str:
    """``scan.ckpt.json`` -> ``scan.ckpt.rank1-of-4.json``: one checkpoint file per rank."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}-of-{world_size}{ext}"


def checkpoint_files(path) -> list:
    """The checkpoint files a collection of this process writes for ``path``: ``path`` itself,
    and under a process group (of any size, one process too) every rank's file."""
    if not (dist.is_available() and dist.is_initialized()):
        return [os.fspath(path)]
    world = dist.get_world_size()
    return [os.fspath(path)] + [rank_checkpoint(path, r, world) for r in range(world)]


def written_by_other_runs(path, world_size: Optional[int]) -> list:
    """Checkpoint files for ``path`` that a run of another number of processes wrote: the rank
    files of another world size, and ``path`` itself for a run under a process group
    (``world_size`` set); under ``world_size=None`` (one process, no group) every rank file."""
    path = os.fspath(path)
    root, ext = os.path.splitext(os.path.basename(path))
    folder = os.path.dirname(path) or "."
    pattern = re.compile(re.escape(root) + r"\.rank(\d+)-of-(\d+)" + re.escape(ext))
    found = [os.path.join(os.path.dirname(path), n) for n in sorted(os.listdir(folder)) if
             (m := pattern.fullmatch(n)) and int(m.group(2)) != world_size] if os.path.isdir(folder) else []
    return ([path] if world_size is not None and os.path.exists(path) else []) + found


def refuse_other_runs(path, world_size: Optional[int]) -> None:
    """A resume whose only checkpoint another number of processes wrote is refused: this run
    would not read it, and would collect everything again without a word. Where this run's own
    files exist too (a run started over with another number of processes, interrupted in its
    turn), it resumes those."""
    others = written_by_other_runs(path, world_size)
    own = [os.fspath(path)] if world_size is None else [rank_checkpoint(path, r, world_size) for r in range(world_size)]
    if others and not any(os.path.exists(p) for p in own):
        sizes = {int(m.group(1)) if (m := re.search(r"\.rank\d+-of-(\d+)", os.path.basename(p))) else None
                 for p in others}
        by = _run_of(next(iter(sizes))) if len(sizes) == 1 else "runs of other numbers of processes"
        files = others[0] if len(others) == 1 else f"{others[0]} (and {', '.join(map(os.path.basename, others[1:]))})"
        raise ValueError(f"checkpoint: {files} {'was' if len(others) == 1 else 'were'} written by {by}, and this one is "
                         f"{_run_of(world_size)}; resume as that run was launched, or delete "
                         f"{'it' if len(others) == 1 else 'them'} to start over")


def _run_of(world_size: Optional[int]) -> str:
    """A run's processes in words: a process group of one process is not a run without one."""
    if world_size is None:
        return "a run of one process without a process group"
    return f"a run of {world_size} process{'es' * (world_size != 1)} in a process group (torchrun)"
