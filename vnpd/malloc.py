"""Give freed row buffers back to the system: pin glibc's mmap threshold.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at first) with
its own ``mmap`` and unmaps it on free. But each time such a block is freed, glibc raises
the threshold to the block's size, up to 32 MiB. The daemon moves rows in numpy arrays of
a few MB to tens of MB (a batch of results, a window of rows): after the first one is
freed, every later one comes from the heap, whose freed blocks stay in the process and
fragment across the threads' arenas. Setting the threshold explicitly turns that
adjustment off, so a large buffer is returned when it is freed.

Measured with ``bench/parent.py --workers 2 --sequences 200000 --dim 2560 --cache off``
on 2 cores: the parent's peak RSS 865 MB as glibc adjusts, 559 MB with the threshold
pinned at 1 MiB, at the same sequences per second (10.5k, 10.2k: within the noise).

A user's own ``MALLOC_MMAP_THRESHOLD_`` wins; on a C library without ``mallopt``
(musl, macOS) this does nothing.

Example::

    pin_mmap_threshold()   # True on glibc
"""

from __future__ import annotations

import ctypes
import os

import structlog

log = structlog.get_logger()

M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
DEFAULT_THRESHOLD = 1 << 20


def pin_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of ``nbytes`` or more with mmap, always. True if it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, nbytes))
    if not done:
        log.warning("malloc_threshold_not_set", nbytes=nbytes)
    return done
