"""Helper processes that end with the process that owns them, even after a SIGKILL.

A ``ProcessPoolExecutor``'s processes wait on its queues for ever once their owner is
gone (they hold both ends of them). :func:`exit_with` starts a thread in such a process
that exits it when the owner has gone. The owner is named by pid, not taken from
``getppid()``: a process forked by a forkserver has the server as its parent, and the
server outlives the pool's owner.

Example (a pool's initializer)::

    ProcessPoolExecutor(4, mp_context=ctx, initializer=exit_with, initargs=(os.getpid(),))
"""

from __future__ import annotations

import os
import threading
import time

CHECK_S = 1.0  # how often a helper process checks on its owner


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def exit_with(owner: int) -> None:
    """In a helper process: exit it (status 1, no clean-up) once process ``owner`` is gone."""
    def watch() -> None:
        while alive(owner):
            time.sleep(CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="vnpd-lifeline").start()
