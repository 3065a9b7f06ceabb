"""`vnpd embed`: one FASTA file to one HDF5 file, in-process, with the daemon's engine.

The file is validated and indexed first, through the :class:`SequenceSource` of its
input kind (nothing is computed for a bad file; a nucleotide file is translated into a
temp directory beside the output), then its rows are read again in windows of
sequences; each window is packed by token budget and its batches stream through the
engine with two in flight. Rows land at their input positions in a partial file beside
the output, which is renamed over ``out`` only when complete.

With ``EmbedOptions(long_sequences="window")`` a sequence longer than the truncation runs
as several windows (:mod:`vnpd.compute.windows`), possibly in different batches; their
residue rows are summed here until the last window arrives, then the row is written.

Example::

    embed_file(Path("in.fasta"), Path("out.h5"), engine)
    embed_file(Path("in.fasta"), Path("out.h5"), engine,
               options=EmbedOptions(per_residue=True, long_sequences="window"))
    embed_file(Path("in.fna"), Path("out.h5"), engine,
               settings=SourceSettings(kind="nucleotide", proteins="genes"))
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import structlog
from tqdm import tqdm

import numpy as np

from vnpd.compute.engine import Engine, PendingResult
from vnpd.compute.packing import build_batch, pack_batches
from vnpd.compute.tokenizer import tokens_for
from vnpd.compute.windows import (LONG_SEQUENCES, Pieces, WindowSum, default_stride,
                                  plan_windows, split_into_windows)
from vnpd.inputs.fasta import FastaRecord
from vnpd.inputs.kinds import SOURCE_KINDS
from vnpd.inputs.source import SourceSettings
from vnpd.output.background import QUEUE_BYTES
from vnpd.output.hdf5 import OutputMeta, PartialOutput
from vnpd.output.outbox import fsync_dir
from vnpd.output.schema import residue_counts

log = structlog.get_logger()

WINDOW_SEQUENCES = 100_000


def progress_bar(total: int, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar over ``total`` sequences on ``stream`` (default stderr), silent unless a TTY.

    ``embed_file`` adds the token rate (``tok/s``) as the bar's postfix.
    """
    return tqdm(total=total, unit="seq", file=sys.stderr if stream is None else stream,
                disable=None, dynamic_ncols=True)  # None: disabled where not a TTY


@dataclass(frozen=True)
class EmbedOptions:
    """What to compute besides one mean row per sequence (docs/OUTPUT.md).

    ``per_residue``: also every residue's rows. ``long_sequences``: "truncate" (as
    fair-esm extract.py) or "window" (sequences over the truncation are covered by
    overlapping windows, ``window_stride`` residues apart, 0 = truncation // 2; see
    :mod:`vnpd.compute.windows`).
    """

    per_residue: bool = False
    long_sequences: str = "truncate"
    window_stride: int = 0

    def stride(self, truncation: int) -> int:
        return self.window_stride or default_stride(truncation)


def embed_file(src: Path, out: Path, engine: Engine, *, output_dtype: str = "float32",
               in_flight: int = 2, progress_stream: TextIO | None = None,
               settings: SourceSettings = SourceSettings(),
               options: EmbedOptions = EmbedOptions()) -> int:
    """Embed every row of ``src`` (read as ``settings.kind``) into ``out`` atomically;
    returns the row count.

    A progress bar goes to ``progress_stream`` (default stderr) when it is a TTY.
    Raises :class:`vnpd.inputs.fasta.FastaError` (before any compute) for invalid input; ``out``
    is then untouched. Raises ValueError for options the engine cannot honour.
    """
    if options.long_sequences not in LONG_SEQUENCES:
        raise ValueError(f"long_sequences must be one of {LONG_SEQUENCES}, "
                         f"not {options.long_sequences!r}")
    if options.long_sequences == "window":
        plan_windows(0, engine.truncation, options.stride(engine.truncation))  # checks stride
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.source-{os.getpid()}")
    try:
        return _embed_source(src, out, engine, work, output_dtype=output_dtype,
                             in_flight=in_flight, progress_stream=progress_stream,
                             settings=settings, options=options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _embed_source(src: Path, out: Path, engine: Engine, work: Path, *, output_dtype: str,
                  in_flight: int, progress_stream: TextIO | None, settings: SourceSettings,
                  options: EmbedOptions) -> int:
    started = time.monotonic()
    partial_path = out.with_name(f".{out.name}.partial-{os.getpid()}")
    source = SOURCE_KINDS[settings.kind].build(src, work, settings)
    lengths_all = source.lengths
    n = source.num_rows
    progress = progress_bar(n, progress_stream)
    progress_started, tokens_done = time.monotonic(), 0
    window = options.long_sequences == "window"
    stride = options.stride(engine.truncation)
    counts = (residue_counts(np.asarray(lengths_all), engine.truncation, options.long_sequences)
              if options.per_residue else None)
    partial = PartialOutput.create(partial_path, n, engine.embed_dim, output_dtype,
                                   num_layers=len(engine.layers), residue_counts=counts)
    partial.write_in_background(QUEUE_BYTES)  # rows are written while the device computes
    assembler = _Assembler(partial, engine.row_shape, options.per_residue)
    try:
        pending: deque[tuple[PendingResult, _Chunk]] = deque()

        def drain_one() -> None:
            nonlocal tokens_done
            done, chunk = pending.popleft()
            finished = assembler.take(done, chunk)
            tokens_done += int(tokens_for(chunk.pieces.lengths[done.positions],
                                          engine.truncation).sum())
            elapsed = max(time.monotonic() - progress_started, 1e-9)
            progress.set_postfix_str(f"{tokens_done / elapsed:,.0f} tok/s", refresh=False)
            progress.update(finished)

        rows_left = source.rows()
        for start in range(0, n, WINDOW_SEQUENCES):
            records = list(itertools.islice(rows_left, WINDOW_SEQUENCES))
            lengths = np.asarray(lengths_all[start:start + len(records)])
            partial.write_ids_lengths(start, [r.id for r in records], lengths)
            chunk = _Chunk.plan(start, records, lengths, engine.truncation,
                                stride if window else None)
            for local in pack_batches(chunk.pieces.lengths, engine.max_tokens,
                                      engine.truncation):
                batch = build_batch(local, chunk.sequences(local), engine.truncation)
                residues = ("float32" if chunk.windowed[local].any() else
                            output_dtype if options.per_residue else None)
                pending.append((engine.submit(batch, residues=residues), chunk))
                while len(pending) > in_flight:
                    drain_one()
        while pending:
            drain_one()
        if assembler.written != n:  # count in, count out
            raise RuntimeError(f"internal error: {n} sequences in, {assembler.written} rows out")
        partial.finalize(OutputMeta(
            model=engine.model_name, layer=engine.layer, layers=engine.layers,
            dtype=str(engine.dtype).removeprefix("torch."), truncation=engine.truncation,
            attention_backend=engine.attention_backend, source_name=src.name,
            source_sha256=source.sha256, long_sequences=options.long_sequences,
            window_stride=stride if window else 0),
            row_fields=source.row_fields(), attributes=source.attributes())
        os.replace(partial_path, out)
        fsync_dir(out.parent)
    except BaseException:
        partial.close()
        partial_path.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    tokens = int(tokens_for(lengths_all, engine.truncation).sum())
    log.info("embed_done", source=str(src), output=str(out), sequences=n, tokens=tokens,
             seconds=round(elapsed, 3), tokens_per_s=round(tokens / max(elapsed, 1e-9), 1))
    return n


@dataclass
class _Chunk:
    """One read window of records and the pieces (sequences or their windows) it runs as."""

    start: int
    records: list[FastaRecord]
    pieces: Pieces
    windowed: np.ndarray        # (P,) bool: the piece is one of several of its sequence
    windows_of_row: np.ndarray  # (rows,) pieces per row

    @classmethod
    def plan(cls, start: int, records: list[FastaRecord], lengths: np.ndarray,
             truncation: int, stride: int | None) -> "_Chunk":
        if stride is None:  # truncate: each sequence is one piece (cut by build_batch)
            rows = np.arange(len(records), dtype=np.int64)
            pieces = Pieces(rows, np.zeros_like(rows), lengths.astype(np.int64))
        else:
            pieces = split_into_windows(lengths, truncation, stride)
        windows_of_row = np.bincount(pieces.row, minlength=len(records))
        return cls(start, records, pieces, windows_of_row[pieces.row] > 1, windows_of_row)

    def sequences(self, local: np.ndarray) -> list[str]:
        p = self.pieces
        return [self.records[p.row[k]].sequence[p.start[k]:p.stop[k]] for k in local.tolist()]


class _Assembler:
    """Turns finished batches of pieces into rows of the output, by position.

    A sequence that ran whole is written at once; the windows of a longer one are summed
    until the last arrives (:class:`vnpd.compute.windows.WindowSum`), then written.
    """

    def __init__(self, partial: PartialOutput, row_shape: tuple[int, ...],
                 per_residue: bool) -> None:
        self.partial = partial
        self.row_shape = row_shape
        self.per_residue = per_residue
        self.sums: dict[int, tuple[WindowSum, int]] = {}  # row -> (sums, windows seen)
        self.written = 0

    def take(self, done: PendingResult, chunk: _Chunk) -> int:
        """Write what ``done`` completes; returns the number of rows completed."""
        means = done.result()
        residues = done.residues()
        offsets = done.residue_offsets() if residues is not None else None
        rows: list[int] = []
        row_means: list[np.ndarray] = []
        row_residues: list[np.ndarray] = []
        p = chunk.pieces
        for i, k in enumerate(done.positions.tolist()):
            row = int(p.row[k])
            if not chunk.windowed[k]:
                rows.append(row)
                row_means.append(means[i])
                if self.per_residue:
                    assert residues is not None and offsets is not None
                    row_residues.append(residues[offsets[i]:offsets[i + 1]])
                continue
            assert residues is not None and offsets is not None
            total = int(chunk.windows_of_row[row])
            sums, seen = self.sums.get(row) or (
                WindowSum(len(chunk.records[row].sequence), self.row_shape), 0)
            sums.add(int(p.start[k]), int(p.stop[k]), residues[offsets[i]:offsets[i + 1]])
            if seen + 1 < total:
                self.sums[row] = (sums, seen + 1)
                continue
            self.sums.pop(row, None)
            per_residue, mean = sums.result()
            rows.append(row)
            row_means.append(mean)
            if self.per_residue:
                row_residues.append(per_residue)
        if not rows:
            return 0
        positions = np.asarray(rows, dtype=np.int64) + chunk.start
        self.partial.write_rows(positions, np.stack(row_means))
        if self.per_residue:
            self.partial.write_residues(
                positions, np.concatenate(row_residues),
                np.fromiter((r.shape[0] for r in row_residues), dtype=np.int64,
                            count=len(row_residues)))
        self.written += len(rows)
        return len(rows)
