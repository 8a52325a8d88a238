"""Who wrote a temporary file: a token naming a process by host, boot, PID namespace, PID and
start time, and whether that process has provably ended (see :mod:`headprune.atomic`).

Part of the layer-0 :mod:`headprune.atomic`: the standard library only."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from typing import Optional

__all__ = ["TOKEN", "owner_token", "owner_gone"]

#: the pattern of :func:`owner_token`'s tokens
TOKEN = r"[0-9a-f]{16}-\d+-\d+-\d+"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return _digest(f.read().strip())
    except OSError:
        return "0" * 8


def _pid_namespace() -> int:
    try:
        return int(re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or 0)
    except (OSError, ValueError):
        return 0


def _proc_stat(pid: int) -> Optional[tuple]:
    """``(state, start time in clock ticks after boot)`` of a running ``pid``, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_token(pid: Optional[int] = None) -> str:
    """``<host><boot>-<pid namespace>-<pid>-<start>`` naming a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return f"{_digest(socket.gethostname())}{_boot_id()}-{_pid_namespace()}-{pid}-{stat[1] if stat else 0}"


def owner_gone(token: str) -> bool:
    """Whether the process named by ``token`` has provably ended (``False`` when unsure)."""
    if not re.fullmatch(TOKEN, token):
        return False
    machine, ns, pid, start = token.split("-")
    mine = owner_token()
    my_machine, my_ns = mine.split("-")[:2]
    if machine[:8] != my_machine[:8]:
        return False  # another host: its processes are not visible here
    if machine[8:] != my_machine[8:]:
        return "0" * 8 not in (machine[8:], my_machine[8:])  # written before a reboot
    if ns != my_ns:
        return False  # another PID namespace (container): PIDs mean other processes
    pid, start = int(pid), int(start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # running, as another user
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return not os.path.exists(f"/proc/{pid}") and os.path.isdir("/proc/self")
    return stat[0] in ("Z", "X") or (start != 0 and stat[1] != start)
