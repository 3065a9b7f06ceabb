"""vnpd/lifeline.py: who is alive, and a helper process that ends with its owner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vnpd.lifeline import alive

HELPER = """
import os, sys, time
from vnpd.lifeline import exit_with
exit_with(int(sys.argv[1]))
time.sleep(60)
"""


def test_alive_tells_a_process_from_a_zombie_and_from_nothing() -> None:
    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while alive(child.pid) and time.monotonic() < deadline:  # exited, not reaped: a zombie
        time.sleep(0.05)
    assert not alive(child.pid)
    child.wait()
    assert not alive(child.pid)


def test_a_helper_exits_once_its_owner_is_gone() -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    helper = subprocess.Popen([sys.executable, "-c", HELPER, str(owner.pid)],
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    time.sleep(2.5)
    assert helper.poll() is None  # the owner lives: so does the helper
    owner.kill()
    owner.wait()
    assert helper.wait(15) == 1
