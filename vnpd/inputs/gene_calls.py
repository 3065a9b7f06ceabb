"""Gene calling for a whole file on several threads, with the proteins in input order.

pyrodigal-gv's ``find_genes`` runs Prodigal's dynamic programming with the GIL released,
and one ``ViralGeneFinder`` may be shared by threads (pyrodigal's docs: "Parallelism"). So
threads are enough to use several cores: no process pool, no second copy of the gene
finder (~230 MB) per worker, and no contig text pickled to another process.

:func:`call_genes` takes the checked records of a file, in order, and a function that calls
the genes of one record (:func:`vnpd.inputs.nucleotide_source.record_genes` with a finder),
and yields each record with its proteins, in the same order, exactly as a loop over the
records would. With ``workers == 1`` it is that loop, in the calling thread, as vnpd always
did. With more, records go to a thread pool in batches of about ``BATCH_BASES`` bases, and
at most ``2 * workers`` batches, and ``IN_FLIGHT_BASES`` bases of text, are in flight:
memory stays bounded whatever the file size. A longer record goes alone.

Example::

    genes_of = functools.partial(record_genes, finder=make_gene_finder())
    for record, proteins in call_genes(checked_records, genes_of, workers=8):
        for protein in proteins:   # Protein("phage1_1", "MKV...", "phage1", 1, 104, 1337)
            ...
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module runs no vnpd code of its own
    from vnpd.inputs.fasta import FastaRecord
    from vnpd.inputs.nucleotide import Protein

GenesOf = Callable[["FastaRecord"], "list[Protein]"]
"""Calls the genes of one record; it must be safe to call from several threads at once."""

BATCH_BASES = 50_000
"""Bases per batch sent to a thread: about 0.1 s of gene calling on one core (~530 kbp/s,
docs/BENCHMARKS.md), a thousand times the pool's cost per batch, and small enough that a
file of a few Mbp keeps every thread busy to its end. A longer contig is a batch alone."""

BATCH_RECORDS = 1_000
"""Records per batch at most, whatever their length."""

IN_FLIGHT_BASES = 64_000_000
"""Bases of record text sent to the threads and not yet collected, at most (a single record
longer than this goes alone). Viral contigs, giant viruses' included (up to ~2.5 Mbp), run
on every thread at once; 100-Mbp chromosomes run one at a time."""

MAX_AUTO_WORKERS = 32
"""``gene_workers = 0`` (auto) uses one thread per usable core, at most this many: 8 GPUs of
ESM-2 3B need about 5 to 12 cores of gene calling (docs/BENCHMARKS.md)."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(configured: int, key: str = "gene_workers") -> int:
    """``[nucleotide] gene_workers`` (or the ``key`` named, ``six_frame_workers``) as a
    thread or process count: 0 = one per usable core, at most ``MAX_AUTO_WORKERS``; any
    other value is taken as it is.

    Raises ValueError, naming ``key``, if ``configured`` is negative.
    Example: ``resolve_workers(0)`` is 16 on a 16-core machine; ``resolve_workers(1)`` is 1.
    """
    if configured < 0:
        raise ValueError(f"{key} must be 0 (one per core) or more, not {configured}")
    return configured or max(1, min(usable_cores(), MAX_AUTO_WORKERS))


def call_genes(records: Iterable[FastaRecord], genes_of: GenesOf,
               workers: int) -> Iterator[tuple[FastaRecord, list[Protein]]]:
    """Yield every record of ``records`` with ``genes_of(record)``, in the order of ``records``.

    ``workers`` (≥ 1) is the number of threads calling ``genes_of`` (1: the calling thread,
    no pool). Errors come in input order, as from a serial loop: if ``records`` raises (the
    reader found bad input) or ``genes_of`` raises on a record, the records before it are
    yielded first, then its error is raised. Closing the generator early cancels the
    batches not yet started and waits for the running ones (at most ``workers``).

    Raises ValueError if ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if workers == 1:
        for record in records:
            yield record, genes_of(record)
        return
    yield from _call_in_threads(records, genes_of, workers)


@dataclass
class _Batch:
    records: list[FastaRecord]
    bases: int


_Done = tuple[list["list[Protein]"], "Exception | None"]
"""What a pool thread returns for a batch: the proteins of its records up to the first
that failed, and that record's error (None if none failed)."""


def _call_in_threads(records: Iterable[FastaRecord], genes_of: GenesOf,
                     workers: int) -> Iterator[tuple[FastaRecord, list[Protein]]]:
    max_batches = 2 * workers
    pending: deque[tuple[_Batch, Future[_Done]]] = deque()
    in_flight = 0  # bases of the records in ``pending``
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vnpd-genes")
    try:
        batches = _batches(records)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                # The reader's error comes after every record before it, as in a serial loop.
                while pending:
                    yield from _collect(*pending.popleft())
                raise
            while pending and (len(pending) >= max_batches or pending[0][1].done()
                               or in_flight + batch.bases > IN_FLIGHT_BASES):
                in_flight -= pending[0][0].bases
                yield from _collect(*pending.popleft())
            pending.append((batch, pool.submit(_batch_genes, batch.records, genes_of)))
            in_flight += batch.bases
        while pending:
            yield from _collect(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(records: Iterable[FastaRecord]) -> Iterator[_Batch]:
    """Consecutive records, about ``BATCH_BASES`` bases and at most ``BATCH_RECORDS`` each.
    If ``records`` raises, the records read before the error come first, then the error."""
    batch: list[FastaRecord] = []
    bases = 0
    try:
        for record in records:
            batch.append(record)
            bases += len(record.sequence)
            if bases >= BATCH_BASES or len(batch) >= BATCH_RECORDS:
                yield _Batch(batch, bases)
                batch, bases = [], 0
    except Exception:
        if batch:
            yield _Batch(batch, bases)
        raise
    if batch:
        yield _Batch(batch, bases)


def _batch_genes(records: list[FastaRecord], genes_of: GenesOf) -> _Done:
    """Run in a pool thread: the proteins of each record of one batch, up to an error."""
    done: list[list[Protein]] = []
    for record in records:
        try:
            done.append(genes_of(record))
        except Exception as exc:  # noqa: BLE001 -- re-raised by _collect, in input order
            return done, exc
    return done, None


def _collect(batch: _Batch, result: Future[_Done]
             ) -> Iterator[tuple[FastaRecord, list[Protein]]]:
    """The records of a finished batch with their proteins, then its error if it had one."""
    done, error = result.result()
    yield from zip(batch.records, done)
    if error is not None:
        raise error
