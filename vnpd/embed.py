"""`vnpd embed`: one FASTA file to one HDF5 file, in-process, with the daemon's engine.

The file is validated and indexed first, through the :class:`SequenceSource` of its
input kind (nothing is computed for a bad file; a nucleotide file is translated into a
temp directory beside the output), then its rows are read again in windows of
sequences; each window is packed by token budget and its batches stream through the
engine with two in flight. Rows land at their input positions in a partial file beside
the output, which is renamed over ``out`` only when complete.

Example::

    embed_file(Path("in.fasta"), Path("out.h5"), engine)
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
from pathlib import Path
from typing import TextIO

import structlog
from tqdm import tqdm

from vnpd.compute.engine import Engine, PendingResult
from vnpd.compute.packing import build_batch, pack_batches
from vnpd.compute.tokenizer import tokens_for
from vnpd.inputs.kinds import SOURCE_KINDS
from vnpd.inputs.source import SourceSettings
from vnpd.output.hdf5 import OutputMeta, PartialOutput
from vnpd.output.outbox import fsync_dir

log = structlog.get_logger()

WINDOW_SEQUENCES = 100_000


def progress_bar(total: int, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar over ``total`` sequences on ``stream`` (default stderr), silent unless a TTY.

    ``embed_file`` adds the token rate (``tok/s``) as the bar's postfix.
    """
    return tqdm(total=total, unit="seq", file=sys.stderr if stream is None else stream,
                disable=None, dynamic_ncols=True)  # None: disabled where not a TTY


def embed_file(src: Path, out: Path, engine: Engine, *, output_dtype: str = "float32",
               in_flight: int = 2, progress_stream: TextIO | None = None,
               settings: SourceSettings = SourceSettings()) -> int:
    """Embed every row of ``src`` (read as ``settings.kind``) into ``out`` atomically;
    returns the row count.

    A progress bar goes to ``progress_stream`` (default stderr) when it is a TTY.
    Raises :class:`vnpd.inputs.fasta.FastaError` (before any compute) for invalid input; ``out``
    is then untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.source-{os.getpid()}")
    try:
        return _embed_source(src, out, engine, work, output_dtype=output_dtype,
                             in_flight=in_flight, progress_stream=progress_stream,
                             settings=settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _embed_source(src: Path, out: Path, engine: Engine, work: Path, *, output_dtype: str,
                  in_flight: int, progress_stream: TextIO | None,
                  settings: SourceSettings) -> int:
    started = time.monotonic()
    partial_path = out.with_name(f".{out.name}.partial-{os.getpid()}")
    source = SOURCE_KINDS[settings.kind].build(src, work, settings)
    lengths_all = source.lengths
    n = source.num_rows
    progress = progress_bar(n, progress_stream)
    progress_started, tokens_done = time.monotonic(), 0
    partial = PartialOutput.create(partial_path, n, engine.embed_dim, output_dtype)
    written = 0
    try:
        pending: deque[PendingResult] = deque()

        def drain_one() -> None:
            nonlocal written, tokens_done
            done = pending.popleft()
            rows = done.result()
            partial.write_rows(done.positions, rows)
            written += rows.shape[0]
            tokens_done += int(tokens_for(lengths_all[done.positions], engine.truncation).sum())
            elapsed = max(time.monotonic() - progress_started, 1e-9)
            progress.set_postfix_str(f"{tokens_done / elapsed:,.0f} tok/s", refresh=False)
            progress.update(rows.shape[0])

        rows_left = source.rows()
        for start in range(0, n, WINDOW_SEQUENCES):
            records = list(itertools.islice(rows_left, WINDOW_SEQUENCES))
            lengths = lengths_all[start:start + len(records)]
            partial.write_ids_lengths(start, [r.id for r in records], lengths)
            for local in pack_batches(lengths, engine.max_tokens, engine.truncation):
                batch = build_batch(local + start, [records[i].sequence for i in local],
                                    engine.truncation)
                pending.append(engine.submit(batch))
                while len(pending) > in_flight:
                    drain_one()
        while pending:
            drain_one()
        if written != n:  # count in, count out
            raise RuntimeError(f"internal error: {n} sequences in, {written} rows out")
        partial.finalize(OutputMeta(
            model=engine.model_name, layer=engine.layer,
            dtype=str(engine.dtype).removeprefix("torch."), truncation=engine.truncation,
            attention_backend=engine.attention_backend, source_name=src.name,
            source_sha256=source.sha256),
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

