"""pin_mmap_threshold: a large buffer freed is given back, and the next is mmapped too.

Each case runs in a fresh interpreter, whose allocator has not adjusted anything yet.
glibc's ``mallinfo2().hblkhd`` counts the bytes in mmapped blocks: a 16 MB array that
glibc serves from the heap leaves it unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vnpd.malloc import pin_mmap_threshold

PROBE = r"""
import ctypes, json, sys
import numpy as np
from vnpd.malloc import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
first = np.ones(16 << 20, dtype=np.uint8)   # mmapped either way (over 128 KiB)
del first                                    # unpinned: the threshold becomes 16 MB
before = libc.mallinfo2().hblkhd
second = np.ones(16 << 20, dtype=np.uint8)
print(json.dumps({"pinned": pinned, "mmapped_growth": libc.mallinfo2().hblkhd - before}))
"""


def _probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    import ctypes

    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_pinned_threshold_keeps_large_buffers_mmapped() -> None:
    pinned, adjusting = _probe("pin"), _probe("none")
    assert pinned["pinned"] is True
    assert pinned["mmapped_growth"] >= 16 << 20     # the second buffer: mmapped again
    assert adjusting["mmapped_growth"] < 16 << 20   # glibc raised its threshold: heap


def test_a_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False
