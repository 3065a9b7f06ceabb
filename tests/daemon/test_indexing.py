"""vnpd/daemon/indexing.py: new files indexed in real spawned processes.

What a process builds equals what a thread builds; bad input fails with the same error,
record and line; a process that dies is replaced and the file indexed again; a second
death fails the file; ``close`` stops a process in the middle of a file; and an index
process exits by itself when the daemon is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_sequences
from tests.inputs.test_nucleotide_source import contigs, write_dna
from vnpd.daemon.indexing import NICE_STEP, IndexProcessDied, Indexer
from vnpd.inputs.fasta import FastaError
from vnpd.inputs.kinds import SOURCE_KINDS
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.protein import ProteinSource
from vnpd.inputs.source import SequenceSource, SourceSettings
from vnpd.lifeline import alive

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def protein_file(path: Path, count: int = 3000) -> Path:
    distinct = random_sequences([5 + i % 1200 for i in range(count)], seed=9)
    rows = distinct + distinct[: count // 3]  # a third repeated
    path.write_text("".join(f">r{i} x\n{s}\n" for i, s in enumerate(rows)))
    return path


def build(indexer: Indexer, source_type: type[SequenceSource], path: Path, directory: Path,
          settings: SourceSettings, truncation: int | None = 1022) -> tuple:
    async def go() -> tuple:
        try:
            return await indexer.build(source_type, path, directory, settings, truncation)
        finally:
            indexer.close()
    return asyncio.run(go())


def as_arrays(source: SequenceSource, plan: object) -> dict[str, np.ndarray]:
    out = {"lengths": np.asarray(source.lengths),
           "ids": np.array([r.id for r in source.rows()]),
           "residues": np.array([r.sequence for r in source.rows()])}
    out.update({k: np.asarray(v) for k, v in source.row_fields().items()})
    out.update({f"plan.{k}": np.asarray(getattr(plan, k))
                for k in ("keys", "leaders", "follower_offsets", "followers")})
    return out


@pytest.mark.parametrize("kind", ["protein", "six_frame", "genes"])
def test_a_process_builds_what_a_thread_builds(tmp_path: Path, kind: str) -> None:
    if kind == "protein":
        path, settings = protein_file(tmp_path / "in.fasta"), SourceSettings()
    else:
        path = write_dna(tmp_path / "in.fna", contigs())
        settings = SourceSettings(kind="nucleotide", proteins=kind, chunk_length=300)
    source_type = SOURCE_KINDS[settings.kind]
    in_thread = build(Indexer(0), source_type, path, tmp_path / "t", settings)
    in_process = build(Indexer(2), source_type, path, tmp_path / "p", settings)
    assert in_process[0].num_rows == in_thread[0].num_rows > 0
    assert in_process[1].duplicate_rows == in_thread[1].duplicate_rows
    if kind == "protein":
        assert in_process[1].duplicate_rows == 1000
    want, got = as_arrays(*in_thread), as_arrays(*in_process)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert in_process[0].sha256 == in_thread[0].sha256
    assert in_process[0].attributes() == in_thread[0].attributes()


def test_bad_input_fails_with_its_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.fasta"
    path.write_text(">a\nMKV\n>b\nMK1V\n")
    with pytest.raises(FastaError) as info:
        build(Indexer(1), ProteinSource, path, tmp_path / "p", SourceSettings())
    assert info.value.record_id == "b" and info.value.line == 4
    with pytest.raises(FileNotFoundError):
        build(Indexer(1), ProteinSource, tmp_path / "missing.fasta", tmp_path / "m",
              SourceSettings())


class DiesOnce(ProteinSource):
    """Kills its own process while building (``build_keyed``: what the indexer calls),
    the first ``deaths`` times (counted in files beside the input, since each try runs in
    a fresh process)."""

    deaths = 1

    @classmethod
    def build_keyed(cls, path: Path, directory: Path, settings: SourceSettings,
                    truncation: int | None) -> tuple[ProteinSource, np.ndarray]:
        tries = sorted(path.parent.glob("try-*"))
        (path.parent / f"try-{len(tries)}").write_text(str(os.getpid()))
        if len(tries) < cls.deaths:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().build_keyed(path, directory, settings, truncation)


class DiesTwice(DiesOnce):
    deaths = 2


def test_a_dead_process_is_replaced_and_the_file_indexed_again(tmp_path: Path) -> None:
    path = protein_file(tmp_path / "in.fasta", 500)
    source, _ = build(Indexer(1), DiesOnce, path, tmp_path / "p", SourceSettings())
    assert source.num_rows == 500 + 500 // 3
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("try-*"))]
    assert len(pids) == 2 and pids[0] != pids[1] != os.getpid()


def test_a_second_death_fails_the_file(tmp_path: Path) -> None:
    path = protein_file(tmp_path / "in.fasta", 100)
    with pytest.raises(IndexProcessDied):
        build(Indexer(1), DiesTwice, path, tmp_path / "p", SourceSettings())
    assert len(list(tmp_path.glob("try-*"))) == 2


class Slow(ProteinSource):
    @classmethod
    def build_keyed(cls, path: Path, directory: Path, settings: SourceSettings,
                    truncation: int | None) -> tuple[ProteinSource, np.ndarray]:
        (path.parent / "pid").write_text(str(os.getpid()))
        time.sleep(120)
        return super().build_keyed(path, directory, settings, truncation)


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_close_stops_a_process_in_the_middle_of_a_file(tmp_path: Path) -> None:
    path = protein_file(tmp_path / "in.fasta", 10)
    indexer = Indexer(1)

    async def go() -> None:
        task = asyncio.ensure_future(indexer.build(Slow, path, tmp_path / "p", SourceSettings(),
                                                   1022))
        assert await asyncio.to_thread(wait_for, (tmp_path / "pid").exists, 60)
        started = time.monotonic()
        indexer.close()
        assert time.monotonic() - started < 10
        pid = int((tmp_path / "pid").read_text())
        assert not alive(pid)
        with pytest.raises(Exception):
            await task
    asyncio.run(go())


ORPHAN_SCRIPT = """
import asyncio, os, sys, time
from pathlib import Path
from tests.daemon.test_indexing import Slow
from vnpd.daemon.indexing import Indexer
from vnpd.inputs.source import SourceSettings
path = Path(sys.argv[1])
async def go():
    await Indexer(1).build(Slow, path, path.parent / "p", SourceSettings(), 1022)
asyncio.run(go())
"""


def test_an_index_process_exits_when_the_daemon_is_sigkilled(tmp_path: Path) -> None:
    path = protein_file(tmp_path / "in.fasta", 10)
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(path)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert wait_for((tmp_path / "pid").exists, 60)
        child = int((tmp_path / "pid").read_text())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    assert wait_for(lambda: not alive(child), 10), "the index process outlived the daemon"


class NeverDies(DiesOnce):
    deaths = 0


def test_start_spawns_every_process_with_the_gene_finder_loaded(tmp_path: Path) -> None:
    indexer = Indexer(3)
    genes = SourceSettings(kind="nucleotide", proteins="genes")
    paths = [protein_file(tmp_path / f"f{k}" / "in.fasta", 50 + k) for k in range(3)
             if (tmp_path / f"f{k}").mkdir() is None]

    async def go() -> tuple[set[int], list[int]]:
        try:
            warm = {future.result(120) for future in indexer.start(NucleotideSource, genes)}
            kinds, pids = {kind for kind, _ in warm}, {pid for _, pid in warm}
            assert kinds == {"nucleotide"} and len(pids) == 3 and os.getpid() not in pids
            for pid in pids:  # pyrodigal (under pyrodigal-gv) is mapped in each, before any file
                assert "/pyrodigal/" in Path(f"/proc/{pid}/maps").read_text()
            rows = [(await indexer.build(NeverDies, p, p.parent / "idx", SourceSettings(),
                                         1022))[0].num_rows for p in paths]
        finally:
            indexer.close()
        return pids, rows
    warm_pids, rows = asyncio.run(go())
    assert rows == [50 + k + (50 + k) // 3 for k in range(3)]
    assert {int(p.read_text()) for p in tmp_path.glob("f*/try-*")} <= warm_pids


class WaitsAndTellsItsNice(ProteinSource):
    """Writes the niceness of its building thread, and of a thread that thread starts, to
    ``nice`` beside the input; then waits for ``release`` there."""

    @classmethod
    def build_keyed(cls, path: Path, directory: Path, settings: SourceSettings,
                    truncation: int | None) -> tuple[ProteinSource, np.ndarray]:
        def nice() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child: list[int] = []
        thread = threading.Thread(target=lambda: child.append(nice()))
        thread.start()
        thread.join()
        (path.parent / "nice").write_text(f"{nice()} {child[0]}")
        assert wait_for((path.parent / "release").exists, 60)
        return super().build_keyed(path, directory, settings, truncation)


def test_a_file_indexed_while_another_is_runs_at_lower_cpu_priority(tmp_path: Path) -> None:
    paths = [protein_file(tmp_path / f"f{k}" / "in.fasta", 20) for k in range(3)
             if (tmp_path / f"f{k}").mkdir() is None]
    indexer = Indexer(3)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # spawned processes start at ours

    async def go() -> list[list[int]]:
        try:
            builds = []
            for p in paths:  # claimed one after another, each while the ones before run
                builds.append(asyncio.ensure_future(indexer.build(
                    WaitsAndTellsItsNice, p, p.parent / "idx", SourceSettings(), 1022)))
                assert await asyncio.to_thread(wait_for, (p.parent / "nice").exists, 120)
            for p in paths:
                (p.parent / "release").touch()
            assert [(await b)[0].num_rows for b in builds] == [20 + 20 // 3] * 3
            return [[int(x) for x in (p.parent / "nice").read_text().split()] for p in paths]
        finally:
            indexer.close()
    nices = asyncio.run(go())
    expected = [min(19, base + NICE_STEP * rank) for rank in range(3)]
    assert nices == [[n, n] for n in expected]  # the build's threads inherit its priority
    assert expected[1] > expected[0] or base == 19


POOL_SCRIPT = """
import asyncio, sys
from pathlib import Path
from vnpd.daemon.indexing import Indexer
from vnpd.inputs.nucleotide_source import NucleotideSource
from vnpd.inputs.source import SourceSettings
settings = SourceSettings(kind="nucleotide", proteins="six_frame", six_frame_workers=2)
if __name__ == "__main__":
    path = Path(sys.argv[1])
    asyncio.run(Indexer(1).build(NucleotideSource, path, path.parent / "p", settings, 1022))
"""


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            out += [child, *descendants(child)]
    return out


def test_translators_of_an_index_process_exit_when_the_daemon_is_sigkilled(
        tmp_path: Path) -> None:
    # Stop-free in all six frames: every chunk gives six proteins, a few seconds of work.
    path = write_dna(tmp_path / "big.fna", {f"c{i}": "GCC" * 20_000 for i in range(250)})
    script = tmp_path / "index_one.py"
    script.write_text(POOL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(path)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    tree: list[int] = []
    try:
        # The index process, the forkserver, and the two translators forked by it.
        assert wait_for(lambda: len(tree.__setitem__(slice(None), descendants(parent.pid))
                                    or tree) >= 4, 60), f"no pool started: {tree}"
    finally:
        parent.kill()
        parent.wait()
    assert wait_for(lambda: not any(alive(p) for p in tree), 15), \
        f"left running: {[p for p in tree if alive(p)]}"
