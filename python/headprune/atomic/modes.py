"""The modes a staged output directory takes before it replaces its target (see the package
doc): its files as readable as the user's umask makes them, the directory itself with the mode
and group of the empty folder (or the directory) it replaces."""

from __future__ import annotations

import os
import stat


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask sets it process-wide, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def usual_modes(root: str) -> None:
    """Give files that a writer created private (0600: ``tempfile``, which transformers'
    ``save_pretrained`` and safetensors write through) the mode ``open`` would have given
    them under the umask, so a saved model is as readable as any other file its user writes."""
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 != mode:
                os.chmod(p, mode)


def modes_of(target: str, new: str) -> None:
    """Give ``new`` the permission bits (setgid included) and group of the directory ``target``
    it will replace, where one exists: an empty folder made for the output (a shared group's)
    keeps what its owner gave it."""
    try:
        st = os.stat(target, follow_symlinks=False)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        if os.stat(new).st_gid != st.st_gid:
            os.chown(new, -1, st.st_gid)
        os.chmod(new, stat.S_IMODE(st.st_mode))
    except OSError:  # a group this process is not in: the new directory keeps its own
        pass
