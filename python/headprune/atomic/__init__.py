"""Outputs that are never half-written: a directory or file is written under a temporary
sibling name and replaces its target in one step, and what a killed process left behind is
removed by the next process writing into the same folder.

A layer-0 utility: the standard library only, nothing from headprune outside this package.

* :class:`Staged` (directories): the caller writes into ``stage.path``, inside a staging
  directory ``.<name>.tmp-<owner>-<random>`` beside the target; when the block succeeds the
  new directory and the target are swapped in one ``renameat2(RENAME_EXCHANGE)`` call
  (Linux), so the target is old-complete or new-complete at every instant, even under
  ``SIGKILL``; the old contents, now inside the staging directory, are deleted afterwards.
  Where the exchange is unsupported (another OS or file system), the old target is renamed
  aside into the staging directory first, then the new one renamed in: a kill between the
  two leaves no target for an instant, and :func:`remove_leftovers` puts the old one back.
* :func:`write_file` (files): a temporary ``.<name>.tmp-<owner>-<random>``, flushed to disk,
  then ``os.replace``.
* :func:`remove_leftovers`: a temporary name carries its creator (``<owner>``: host, boot,
  PID namespace, PID and the process's start time) and a staging directory also holds a
  marker file naming it; an entry is removed only when that process is provably gone (same
  host, boot and PID namespace; PID not running, a zombie, or reused by a later process).
  Leftovers of processes on other hosts or in other PID namespaces are never touched.
* :func:`check_target`: refuses what cannot become the target (a symbolic link, a file, a
  non-empty directory unless replacing, a folder this process cannot write in) up front,
  before any slow work.

A target that is a symbolic link is refused rather than followed: replacing the link by a
directory, or writing through it while deleting around it, would both surprise someone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from typing import Optional

from .modes import modes_of, usual_modes
from .owners import TOKEN, owner_gone, owner_token

__all__ = ["Staged", "short_name", "check_replace", "check_target", "check_folder", "write_file", "temp_sibling", "commit_file", "remove_leftovers", "leftovers", "owner_token", "MARKER"]

#: the marker file inside each staging directory: JSON ``{"owner": token, "target": path}``
MARKER = ".headprune-owner"
_TEMP = re.compile(rf"^\..*\.tmp-(?P<owner>{TOKEN})-[0-9a-f]{{8}}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def short_name(name: str, limit: int) -> str:
    """``name``, or, where it is longer than ``limit`` bytes, its digest's first 16 hex digits: for
    names built on a file name (a valid one of up to 255 bytes) that add to it."""
    return name if len(os.fsencode(name)) <= limit else hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _temp_name(name: str) -> str:
    """``.<name>.tmp-<owner>-<random>`` (the suffix adds about 60 bytes: a long name goes by its
    :func:`short_name`)."""
    return f".{short_name(name.lstrip('.'), 96)}.tmp-{owner_token()}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- leftovers


def leftovers(folder, *, mine: bool = False) -> list:
    """Temporary entries in ``folder`` left by processes that have ended (with ``mine``: those
    of this process instead), as absolute paths."""
    folder = os.path.abspath(os.fspath(folder))
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    me, out = owner_token(), []
    for name in names:
        m = _TEMP.match(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path) and _marker(path) not in (None, m["owner"]):
            continue  # a marker naming someone else: not ours to judge
        if (m["owner"] == me) if mine else owner_gone(m["owner"]):
            out.append(path)
    return out


def _marker(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as f:
            return str(json.load(f).get("owner"))
    except (OSError, ValueError, AttributeError):
        return None


def remove_leftovers(folder) -> list:
    """Remove the temporary files and staging directories that ended processes left in
    ``folder``; a target that such a process had moved aside and not yet replaced (only
    possible without ``RENAME_EXCHANGE``) is moved back first. Returns the paths removed."""
    removed = []
    for path in leftovers(folder):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                _restore_aside(path)
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove after all
    return removed


def _restore_aside(root: str) -> None:
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as f:
            target = json.load(f)["target"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    old = os.path.join(root, "old")
    if os.path.isdir(old) and not os.path.lexists(target):
        os.rename(old, target)


# ------------------------------------------------------------------------------ checking


def check_replace(replace, arg: str) -> bool:
    """``replace`` (argument ``arg``) if it is ``True`` or ``False``: any other truthy value (the
    string "no") would replace the user's files."""
    if not isinstance(replace, bool):
        raise TypeError(f"{arg}: expected True or False, got {replace!r}")
    return replace


def check_target(path, *, replace: bool, arg: str, hint: str) -> str:
    """The absolute ``path`` of an output directory, after removing ended processes' leftovers
    beside it; raises when it cannot become the output: ``FileExistsError`` for a symbolic link,
    a file, or a non-empty directory without ``replace`` (``hint`` says what to pass), and the
    ``OSError`` of a probe when its folder (or, to replace it, the directory) is not writable.
    Messages start with ``arg``. Nothing is created: a missing folder is probed at its nearest
    existing ancestor."""
    path = os.path.abspath(os.fspath(path))
    remove_leftovers(os.path.dirname(path))  # first: it may move a target back into place
    if os.path.islink(path):
        raise FileExistsError(f"{arg}: {path} is a symbolic link (to {os.readlink(path)}); "
                              "give the directory itself")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{arg}: {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not replace:
        raise FileExistsError(f"{arg}: {path} is not empty; {hint}")
    if os.path.isdir(path) and os.path.ismount(path):  # (a container's volume): no rename moves it
        raise OSError(errno.EBUSY, f"{arg}: {path} is a mount point, which cannot be replaced in one step; write "
                                   f"into a folder inside it, such as {os.path.join(path, 'out')}")
    here, real = os.path.realpath(os.getcwd()), os.path.realpath(path)  # a path through a link names it too
    if os.path.isdir(path) and os.path.commonpath([here, real]) == real:  # replaced, it would leave this
        raise FileExistsError(f"{arg}: {path} is the working directory or holds it; replacing it would leave this "
                              "process in a deleted directory, so write elsewhere")
    check_folder(path, arg)
    if os.path.isdir(path) and os.listdir(path):
        _probe(path, f"{arg}: cannot replace {path}")
    return path


def check_folder(path, arg: str) -> str:
    """The nearest existing folder above ``path``, refused (messages start with ``arg``) where
    it is not a directory (so ``path`` cannot be made) or this process cannot write in it."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):  # a file where a folder of the path would be made
        raise NotADirectoryError(errno.ENOTDIR, f"{arg}: {folder} is not a directory, so {path} cannot be made")
    _probe(folder, f"{arg}: cannot write in {folder}")
    return folder


def _probe(folder: str, what: str) -> None:
    """Make and remove a folder in ``folder`` (whether this process can write there), leaving
    ``folder``'s access and modification times as they were (a refusal after the probe changes
    nothing the user can see)."""
    probe = os.path.join(folder, _temp_name("headprune-probe"))
    try:
        before = os.stat(folder)
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise type(e)(e.errno, f"{what} ({e.strerror or e})") from e
    try:
        os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:  # another owner's folder this process may write in: its times stay changed
        pass


# ------------------------------------------------------------------------------ writing


def write_file(path, data, *, fsync: bool = True) -> None:
    """Write ``data`` (str or bytes) to ``path`` through a temporary sibling and
    ``os.replace``: readers see the old file or the new one, never a part."""
    path = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(path), _temp_name(os.path.basename(path)))
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def temp_sibling(path) -> str:
    """A temporary name beside ``path`` for a writer that cannot take a file object (write
    there, then :func:`commit_file`); :func:`remove_leftovers` knows it."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), _temp_name(os.path.basename(path)))


def commit_file(tmp, path) -> None:
    """Flush the complete file ``tmp`` (from :func:`temp_sibling`) to disk and let it replace
    ``path`` in one step."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_folders(folder, made: list) -> None:
    """``os.makedirs(folder, exist_ok=True)`` that appends each folder it creates to ``made``
    (outermost first), for :func:`remove_folders` to take back after a failure."""
    missing, folder = [], os.path.abspath(os.fspath(folder))
    while not os.path.lexists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    for folder in missing:
        try:
            os.mkdir(folder)
        except FileExistsError:  # another writer made it meanwhile: used, not ours to remove
            continue
        made.append(folder)


def remove_folders(made: list) -> None:
    """Remove the folders :func:`make_folders` made, innermost first, while they are empty
    (something else may have written there since)."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:
            return


class Staged:
    """``with Staged(target, replace=...) as stage:`` write the new directory at ``stage.path``;
    on a clean exit it becomes ``target`` (see the module doc), on an exception it is deleted
    and ``target`` is untouched. Afterwards ``committed`` says whether ``target`` was
    replaced, and ``leftover`` names the staging directory if an interrupt stopped its
    deletion (the next :func:`remove_leftovers` in that folder removes it)."""

    def __init__(self, target, *, replace: bool = False):
        self.target = os.path.abspath(os.fspath(target))
        self.replace = replace
        self.root = os.path.join(os.path.dirname(self.target), _temp_name(os.path.basename(self.target)))
        self.path = os.path.join(self.root, "new")
        self.committed = False

    @property
    def leftover(self) -> Optional[str]:
        return self.root if os.path.lexists(self.root) else None

    def __enter__(self) -> "Staged":
        self.made = []  # the folders above the target this stage creates (removed again on failure)
        try:
            make_folders(os.path.dirname(self.target), self.made)
            os.mkdir(self.root)  # not mkdtemp: its 0o700 would survive the rename
            with open(os.path.join(self.root, MARKER), "w", encoding="utf-8") as f:
                json.dump({"owner": owner_token(), "target": self.target}, f)
            os.mkdir(self.path)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            self._unmake()
            raise
        return self

    def _unmake(self) -> None:
        remove_folders(self.made)

    def __exit__(self, exc_type, exc, tb) -> bool:
        aside = os.path.join(self.root, "old")
        try:
            if exc_type is None:
                usual_modes(self.path)
                modes_of(self.target, self.path)
                with _signals_deferred():
                    _commit(self.path, self.target, self.replace, aside)
                    self.committed = True
        finally:
            if not (os.path.isdir(aside) and not os.path.lexists(self.target)):  # never delete the only copy
                shutil.rmtree(self.root, ignore_errors=True)  # the failed attempt, or the old contents
                if not self.committed:
                    self._unmake()
        return False


def _commit(new: str, target: str, replace: bool, aside: str) -> None:
    """Put the directory ``new`` at ``target``; an existing one ends up in ``new`` or at ``aside``."""
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        raise FileExistsError(f"{target} is no longer a directory; not replaced")
    if not os.path.isdir(target):
        os.rename(new, target)
        return
    if os.listdir(target) and not replace:
        raise FileExistsError(f"{target} is no longer empty; not replaced")
    try:
        _exchange(new, target)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    os.rename(target, aside)  # no exchange here: aside first, then in (remove_leftovers undoes a kill between)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise


_libc_renameat2 = None


def _exchange(a: str, b: str) -> None:
    """Swap the paths ``a`` and ``b`` in one system call (``OSError(ENOSYS)`` where unavailable)."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            fn = False
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _libc_renameat2 = fn
    if not _libc_renameat2:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _libc_renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


@contextmanager
def _signals_deferred():
    """SIGINT, SIGTERM and SIGHUP arriving inside the block take effect when it ends, so the
    step it guards either happens and is recorded or does not happen (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, saved = [], {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not None:
            saved[sig] = signal.signal(sig, lambda n, f: caught.append(n))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)
